"""Safe files: atomic directory swaps, JSON and safetensors only, never a pickle.

Writers replace only what they wrote. Each writer names its kind of directory with an
``unexpected(dir)`` function listing the entries of ``dir`` that such a writer would not have
written; a directory is replaced only if it is empty or that list is empty, and nothing qpeft did
not write is ever deleted. Atomic save of a directory ``path`` (under the exclusive lock of
:mod:`qpeft.checkpoint.locks`, so one writer at a time):

1. write every file into ``.<name>.tmp-<pid>-<random>`` beside ``path``, which holds the marker
   ``.qpeft-tmp`` until the end; fsync files and directory;
2. rename the old ``path`` (if any) to ``.<name>.old``;
3. rename the temporary directory to ``path``; fsync the parent;
4. delete ``.<name>.old``.

A process killed before 2 leaves the old ``path`` untouched; between 2 and 3, ``path`` is missing
and ``.<name>.old`` holds the old directory, complete; after 3 ``path`` is the new one. The next
save puts ``.<name>.old`` back in the second case and deletes it in the last, and deletes the
temporary directories of processes that no longer run; a reader (:func:`reading`, under the shared
lock) only puts ``.<name>.old`` back and never deletes anything. A ``.<name>.old`` or temporary
directory is deleted only when it is one of ours (holds the marker, or only this kind's files).
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

from .locks import locked

__all__ = ["atomic_directory", "reading", "check_target", "fsync", "write_json", "read_json"]

_MAX_JSON = 256 * 1024 * 1024
TMP_MARKER = ".qpeft-tmp"

#: ``unexpected(dir)``: the entries of an existing directory that a writer of a kind did not write.
Unexpected = Callable[[Path], list[str]]


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


def _real_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink()


def _ours(path: Path, unexpected: Unexpected) -> bool:
    """Whether ``path`` is a directory this kind of writer wrote (or an empty one)."""
    return _real_dir(path) and (not any(path.iterdir()) or not unexpected(path))


def _repair(path: Path, unexpected: Unexpected) -> None:
    """Put back ``.<name>.old`` if a killed save left ``path`` missing (renames only)."""
    backup = _backup(path)
    if not os.path.lexists(path) and _ours(backup, unexpected):
        os.rename(backup, path)
        fsync(path.parent)


def _clean(path: Path, unexpected: Unexpected) -> None:
    """What a killed save left: repair, then delete our backup and dead processes' temporaries."""
    _repair(path, unexpected)
    backup = _backup(path)
    if os.path.lexists(path) and _ours(backup, unexpected):
        shutil.rmtree(backup)
    prefix = f".{path.name}.tmp-"
    for tmp in path.parent.glob(f"{glob_escape(prefix)}*"):
        pid = tmp.name[len(prefix) :].split("-", 1)[0]
        if not (pid.isdigit() and _real_dir(tmp)) or _pid_alive(int(pid)):
            continue
        if (tmp / TMP_MARKER).is_file() or _ours(tmp, unexpected):
            shutil.rmtree(tmp, ignore_errors=True)


def glob_escape(text: str) -> str:
    """``text`` with glob wildcards quoted."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in text)


def check_target(path: str | os.PathLike) -> Path:
    """Check that ``path`` may be written as a directory by a save; return it as a ``Path``.

    Raises:
        ValueError: ``path`` is empty, ``.``/``..``, a filesystem root, the current directory or
            one of its parents, or a symbolic link (save to its target instead).
    """
    text = os.fspath(path)
    p = Path(text)
    if not text.strip() or p.name in ("", ".", ".."):
        raise ValueError(
            f"cannot save to {text!r}: name a directory (not empty, '.', '..' or a root)"
        )
    resolved = p.resolve()
    if resolved == Path(resolved.anchor):
        raise ValueError(f"cannot save to {text!r}: it is a filesystem root")
    with contextlib.suppress(OSError):
        cwd = Path.cwd().resolve()
        if resolved == cwd or resolved in cwd.parents:
            raise ValueError(
                f"cannot save to {text!r}: it is the current directory or one of its parents"
            )
    if p.is_symlink():
        raise ValueError(
            f"cannot save to {text!r}: it is a symbolic link (to {os.readlink(p)!r}); qpeft "
            "replaces only real directories, save to the link's target instead"
        )
    return p


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:5])
    return shown + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def _check_writable_tree(path: Path) -> None:
    for folder, dirs, _files in os.walk(path):
        if not os.access(folder, os.W_OK | os.X_OK):
            raise PermissionError(f"cannot replace {path}: {folder} is read-only")
        dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(folder, d))]


def _check_replaceable(path: Path, kind: str, unexpected: Unexpected) -> None:
    backup = _backup(path)
    if os.path.lexists(backup):
        raise FileExistsError(
            f"{backup} is in the way of saving {path} and was not written by qpeft; move it away"
        )
    if not path.exists():
        return
    if not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a directory; refusing to replace it")
    if any(path.iterdir()):
        foreign = unexpected(path)
        if foreign:
            raise FileExistsError(
                f"{path} holds {_listing(foreign)}, which qpeft did not write as {kind}; refusing "
                "to replace it (move them away or choose another path)"
            )
    _check_writable_tree(path)


def _default_mode() -> int:
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o777 & ~umask


def _swap(tmp: Path, path: Path) -> None:
    backup = _backup(path)
    if path.exists():
        os.rename(path, backup)
        fsync(path.parent)
    os.rename(tmp, path)
    fsync(path.parent)
    if backup.exists():
        shutil.rmtree(backup)


def _make_parent(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise PermissionError(
            f"cannot create the folder {path.parent} ({err.strerror}); nothing was written"
        ) from None


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, kind: str, unexpected: Unexpected) -> Iterator[Path]:
    """Yield an empty temporary directory; on a clean exit it atomically replaces ``path``.

    Args:
        path: the directory to create or replace (its parent is created if missing).
        kind: what is written, for messages ("a qpeft checkpoint").
        unexpected: lists the entries of an existing directory that a writer of this kind would
            not have written (empty: the directory may be replaced).

    Raises:
        ValueError: ``path`` is refused by :func:`check_target`.
        FileExistsError: ``path`` is a file, or a non-empty directory holding entries
            ``unexpected`` names (the message lists them), or a ``.<name>.old`` that is not ours
            is in the way; nothing is written then.
        PermissionError: the parent or the old directory cannot be written.
        TimeoutError: another save of ``path`` is in progress for longer than the lock timeout.
        Any error inside the block removes the temporary directory and leaves ``path`` as it was.
    """
    path = check_target(path)
    _make_parent(path)
    with locked(path, shared=False):
        _clean(path, unexpected)
        _check_replaceable(path, kind, unexpected)
        try:
            tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent))
        except OSError as err:
            raise PermissionError(f"cannot write into {path.parent} ({err.strerror})") from None
        try:
            (tmp / TMP_MARKER).touch()
            yield tmp
            os.remove(tmp / TMP_MARKER)
            mode = _default_mode()
            for child in tmp.iterdir():
                if child.is_file():
                    os.chmod(child, mode & 0o666)  # mkdtemp and safetensors make owner-only files
                fsync(child)
            os.chmod(tmp, mode)
            fsync(tmp)
            _swap(tmp, path)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def reading(path: str | os.PathLike, unexpected: Unexpected) -> Iterator[Path]:
    """Hold the shared lock of ``path`` while reading it, so no save swaps it meanwhile.

    A save killed between its renames left ``path`` missing and its old copy in ``.<name>.old``:
    that copy is put back (a rename; a read never deletes anything). Yields ``path`` with its
    symbolic links resolved.

    Raises:
        TimeoutError: a save of ``path`` is in progress for longer than the lock timeout.
        ValueError: a file of the folder is a symbolic link to somewhere outside it (a checkpoint
            only ever reads its own files).
    """
    path = Path(os.path.realpath(path))
    if not path.parent.is_dir():
        yield path
        return
    with locked(path, shared=True):
        needs_repair = not os.path.lexists(path) and _ours(_backup(path), unexpected)
    if needs_repair:
        with locked(path, shared=False):
            _repair(path, unexpected)
    with locked(path, shared=True):
        _check_contained(path)
        yield path


def _check_contained(folder: Path) -> None:
    if not folder.is_dir():
        return
    for entry in folder.iterdir():
        if entry.is_symlink():
            target = Path(os.path.realpath(entry))
            if folder != target and folder not in target.parents:
                raise ValueError(
                    f"{entry} is a symbolic link to {target}, outside the checkpoint folder; "
                    "refusing to read it"
                )


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
        FileNotFoundError: it is missing. ValueError: it is not UTF-8 JSON, is too large or too
            deeply nested (names the file).
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
    except RecursionError:
        raise ValueError(f"{path} is not a usable JSON file (nested too deeply)") from None
