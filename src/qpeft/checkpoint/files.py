"""Safe files: atomic directory swaps, JSON and safetensors only, never a pickle.

Atomic save of a directory ``path`` (one writer at a time):

1. write every file into ``.<name>.tmp-<pid>-<random>`` beside ``path``, fsync files and directory;
2. rename the old ``path`` (if any) to ``.<name>.old``;
3. rename the temporary directory to ``path``; fsync the parent;
4. delete ``.<name>.old``.

A process killed before 2 leaves the old ``path`` untouched; between 2 and 3, ``path`` is missing and
``.<name>.old`` holds the old checkpoint, complete; after 3 ``path`` is the new one. :func:`recover`
(run by every save and read) puts ``.<name>.old`` back in the second case and deletes it in the
last, and removes temporary directories of processes that no longer run.

Safetensors layout: ``u64 little-endian N``, then an N-byte JSON header ``{key: {"dtype", "shape",
"data_offsets"}}``, then the raw bytes. The header is parsed and checked here before any tensor is
read, so a pickle (a zip file starting with ``PK``) or a truncated file is refused with its name.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

__all__ = [
    "atomic_directory", "recover", "write_json", "read_json", "write_tensors", "read_header", "read_tensors", "tensor_table", "DTYPES",
]

_MAX_HEADER = 100 * 1024 * 1024  # the limit safetensors itself applies
_MAX_JSON = 256 * 1024 * 1024

#: safetensors dtype names -> torch dtypes.
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "F8_E4M3FNUZ": torch.float8_e4m3fnuz, "F8_E5M2FNUZ": torch.float8_e5m2fnuz, "C64": torch.complex64,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16,
}
_SAVABLE = set(DTYPES.values())


# -- atomic directories ------------------------------------------------------------------------
def _backup(path: Path) -> Path:
    return path.parent / f".{path.name}.old"


def _fsync(path: Path) -> None:
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
            _fsync(path.parent)
    if path.parent.is_dir():
        for tmp in path.parent.glob(f".{path.name}.tmp-*"):
            pid = tmp.name[len(f".{path.name}.tmp-"):].split("-", 1)[0]
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
            f"{path} is a non-empty directory that is not a checkpoint of this kind; refusing to replace it"
        )


def _swap(tmp: Path, path: Path) -> None:
    backup = _backup(path)
    if path.exists():
        os.rename(path, backup)
        _fsync(path.parent)
    os.rename(tmp, path)
    _fsync(path.parent)
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
            _fsync(child)
        os.chmod(tmp, mode)
        _fsync(tmp)
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


# -- safetensors ------------------------------------------------------------------------------
def write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write ``tensors`` (contiguous, no shared storage) as safetensors and fsync the file."""
    save_file(tensors, str(path), metadata={"format": "pt"})
    _fsync(path)


def _check_entry(path: Path, key: str, entry: Any, data_len: int) -> tuple[torch.dtype, list[int]]:
    if not isinstance(entry, dict) or entry.get("dtype") not in DTYPES:
        raise ValueError(f"{path}: tensor {key!r} has an unknown or missing dtype")
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise ValueError(f"{path}: tensor {key!r} has an invalid shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and 0 <= offsets[0] <= offsets[1] <= data_len):
        raise ValueError(f"{path}: tensor {key!r} lies outside the file (truncated or corrupt)")
    dtype = DTYPES[entry["dtype"]]
    numel = 1
    for d in shape:
        numel *= d
    if offsets[1] - offsets[0] != numel * dtype.itemsize:
        raise ValueError(f"{path}: tensor {key!r} has {offsets[1] - offsets[0]} bytes for shape {shape}")
    return dtype, shape


def read_header(path: str | os.PathLike) -> dict[str, tuple[torch.dtype, list[int]]]:
    """Parse and check a safetensors header without reading any tensor.

    Returns:
        ``{key: (dtype, shape)}``.

    Raises:
        FileNotFoundError: it is missing. ValueError: it is not a complete safetensors file (a
            pickle, a truncated or corrupt file); the message names the file and the first bad key.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"missing file {path}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        (n,) = struct.unpack("<Q", head) if len(head) == 8 else (None,)
        if n is None or n > min(_MAX_HEADER, size - 8):
            raise ValueError(f"{path} is not a safetensors file (bad header length; a pickle is never loaded)")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError(f"{path} is not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path} is not a safetensors file (its header is not a JSON object)")
    header.pop("__metadata__", None)
    data_len = size - 8 - n
    return {key: _check_entry(path, key, entry, data_len) for key, entry in header.items()}


def read_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load every tensor of a safetensors file onto the CPU after checking its header.

    Raises:
        FileNotFoundError, ValueError: as :func:`read_header`.
    """
    read_header(path)
    try:
        return load_file(str(path))
    except SafetensorError as err:
        raise ValueError(f"{path} is not a valid safetensors file ({err})") from None


def _storage_key(t: torch.Tensor) -> tuple[Any, ...]:
    return (t.device, t.untyped_storage().data_ptr())


def _view_key(t: torch.Tensor) -> tuple[Any, ...]:
    return (*_storage_key(t), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


def tensor_table(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Make a state dict writable as safetensors: contiguous CPU tensors, none sharing storage.

    A key that is exactly the same view as an earlier key (tied weights) becomes an alias
    ``{key: earlier key}``; a tensor that only overlaps another one's storage, or is not
    contiguous, is copied.

    Returns:
        ``(tensors, aliases)``.

    Raises:
        TypeError: a value that is not a tensor, or a dtype safetensors cannot store (names the key).
    """
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen_views: dict[tuple[Any, ...], str] = {}
    seen_storages: set[tuple[Any, ...]] = set()
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"state_dict entry {key!r} is a {type(value).__name__}, not a tensor; it cannot be saved")
        if value.dtype not in _SAVABLE:
            raise TypeError(f"state_dict entry {key!r} has dtype {value.dtype}, which safetensors cannot store")
        t = value.detach()
        if t.numel() > 0 and _view_key(t) in seen_views:
            aliases[key] = seen_views[_view_key(t)]
            continue
        shared = t.numel() > 0 and _storage_key(t) in seen_storages
        if t.numel() > 0:
            seen_views[_view_key(t)] = key
            seen_storages.add(_storage_key(t))
        t = t.to("cpu")
        if shared or not t.is_contiguous():
            t = t.contiguous().clone()  # safetensors refuses shared or strided storage
        tensors[key] = t
    return tensors, aliases
