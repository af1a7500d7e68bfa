"""Safetensors files, checked before anything is read: never a pickle.

Safetensors layout: ``u64 little-endian N``, then an N-byte JSON header ``{key: {"dtype", "shape",
"data_offsets"}}``, then the raw bytes. The header is parsed and checked here before any tensor is
read, so a pickle (a zip file starting with ``PK``) or a truncated file is refused with its name.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .files import fsync

__all__ = ["write_tensors", "read_header", "read_tensors", "tensor_table", "DTYPES"]

_MAX_HEADER = 100 * 1024 * 1024  # the limit safetensors itself applies

#: safetensors dtype names -> torch dtypes.
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E4M3FNUZ": torch.float8_e4m3fnuz,
    "F8_E5M2FNUZ": torch.float8_e5m2fnuz,
    "C64": torch.complex64,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
}
_SAVABLE = set(DTYPES.values())


# -- safetensors ------------------------------------------------------------------------------
def write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write ``tensors`` (contiguous, no shared storage) as safetensors and fsync the file."""
    save_file(tensors, str(path), metadata={"format": "pt"})
    fsync(path)


def _check_entry(path: Path, key: str, entry: Any, data_len: int) -> tuple[torch.dtype, list[int]]:
    if not isinstance(entry, dict) or entry.get("dtype") not in DTYPES:
        raise ValueError(f"{path}: tensor {key!r} has an unknown or missing dtype")
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise ValueError(f"{path}: tensor {key!r} has an invalid shape {shape!r}")
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and 0 <= offsets[0] <= offsets[1] <= data_len
    ):
        raise ValueError(f"{path}: tensor {key!r} lies outside the file (truncated or corrupt)")
    dtype = DTYPES[entry["dtype"]]
    numel = 1
    for d in shape:
        numel *= d
    if offsets[1] - offsets[0] != numel * dtype.itemsize:
        raise ValueError(
            f"{path}: tensor {key!r} has {offsets[1] - offsets[0]} bytes for shape {shape}"
        )
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
            raise ValueError(
                f"{path} is not a safetensors file (bad header length; a pickle is never loaded)"
            )
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


def tensor_table(
    state_dict: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Make a state dict writable as safetensors: contiguous CPU tensors, none sharing storage.

    A key that is exactly the same view as an earlier key (tied weights) becomes an alias
    ``{key: earlier key}``; a tensor that only overlaps another one's storage, or is not
    contiguous, is copied.

    Returns:
        ``(tensors, aliases)``.

    Raises:
        TypeError: a value that is not a tensor, or a dtype safetensors cannot store (names the
        key).
    """
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen_views: dict[tuple[Any, ...], str] = {}
    seen_storages: set[tuple[Any, ...]] = set()
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(
                f"state_dict entry {key!r} is a {type(value).__name__}, not a tensor; it cannot be "
                "saved"
            )
        if value.dtype not in _SAVABLE:
            raise TypeError(
                f"state_dict entry {key!r} has dtype {value.dtype}, which safetensors cannot store"
            )
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
