"""Safe files: atomic directory swaps, JSON and safetensors only, never a pickle.

Atomic save of a directory ``path`` (one writer at a time):

1. write every file into ``.<name>.tmp-<pid>-<random>`` beside ``path``, fsync files and directory;
2. rename the old ``path`` (if any) to ``.<name>.old``;
3. rename the temporary directory to ``path``; fsync the parent;
4. delete ``.<name>.old``.

A process killed before 2 leaves the old ``path`` untouched; between 2 and 3, ``path`` is missing
and
``.<name>.old`` holds the old checkpoint, complete; after 3 ``path`` is the new one. :func:`recover`
(run by every save and read) puts ``.<name>.old`` back in the second case and deletes it in the
last, and removes temporary directories of processes that no longer run.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

__all__ = ["atomic_directory", "recover", "fsync", "write_json", "read_json"]

_MAX_JSON = 256 * 1024 * 1024


# -- atomic directories ------------------------------------------------------------------------
def _backup(path: Path) -> Path:
    return path.parent / f".{path.name}.old"


def fsync(path: Path) -> None:
    """fsync a file or a directory (directories: POSIX only; elsewhere a no-op)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # directories cannot be fsynced on some platforms
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover(path: str | os.PathLike) -> None:
    """Finish or undo a swap that a killed process left half done at ``path`` (see module doc)."""
    path = Path(path)
    backup = _backup(path)
    if backup.exists():
        if path.exists():
            shutil.rmtree(backup)  # the new checkpoint is in place; the old copy is garbage
        else:
            os.rename(backup, path)  # killed between the two renames: put the old one back
            fsync(path.parent)
    if path.parent.is_dir():
        for tmp in path.parent.glob(f".{path.name}.tmp-*"):
            pid = tmp.name[len(f".{path.name}.tmp-") :].split("-", 1)[0]
            if pid.isdigit() and not _pid_alive(int(pid)):
                shutil.rmtree(tmp, ignore_errors=True)


def _default_mode() -> int:
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o777 & ~umask


def _check_replaceable(path: Path, accept: Callable[[Path], bool]) -> None:
    if not path.exists():
        return
    if not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a directory; refusing to replace it")
    if any(path.iterdir()) and not accept(path):
        raise FileExistsError(
            f"{path} is a non-empty directory that is not a checkpoint of this kind; refusing to "
            "replace it"
        )


def _swap(tmp: Path, path: Path) -> None:
    backup = _backup(path)
    if path.exists():
        os.rename(path, backup)
        fsync(path.parent)
    os.rename(tmp, path)
    fsync(path.parent)
    if backup.exists():
        shutil.rmtree(backup)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, accept: Callable[[Path], bool]) -> Iterator[Path]:
    """Yield an empty temporary directory; on a clean exit it atomically replaces ``path``.

    Args:
        path: the directory to create or replace (its parent is created if missing).
        accept: says whether an existing non-empty ``path`` may be replaced (it is one of ours).

    Raises:
        FileExistsError: ``path`` is a file, or a non-empty directory ``accept`` rejects; nothing
            is written then. Any error inside the block removes the temporary directory.
    """
    path = Path(path)
    recover(path)
    _check_replaceable(path, accept)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent))
    try:
        yield tmp
        mode = _default_mode()
        for child in tmp.iterdir():
            os.chmod(child, mode & 0o666)  # mkdtemp and safetensors create owner-only files
            fsync(child)
        os.chmod(tmp, mode)
        fsync(tmp)
        _swap(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# -- JSON -------------------------------------------------------------------------------------
def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON and fsync it."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, allow_nan=False)
        f.flush()
        os.fsync(f.fileno())


def read_json(path: str | os.PathLike) -> Any:
    """Parse a JSON file.

    Raises:
        FileNotFoundError: it is missing. ValueError: it is not UTF-8 JSON (names the file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"missing file {path}")
    if path.stat().st_size > _MAX_JSON:
        raise ValueError(f"{path} is too large to be a JSON config")
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not a valid JSON file ({err})") from None
