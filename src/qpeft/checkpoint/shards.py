"""Sharded safetensors in transformers' layout: ``model-00001-of-0000N.safetensors`` files and
``model.safetensors.index.json`` (``{"metadata": {"total_size": bytes}, "weight_map": {key:
file}}``), or one ``model.safetensors`` when everything fits in one shard.

Sizes follow transformers' ``convert_file_size_to_int``: an int is bytes; a string is digits and
a unit, ``KB``/``MB``/``GB`` powers of 10, ``KiB``/``MiB``/``GiB`` powers of 2, a lower-case final
``b`` (``"5Gb"``) meaning bits. Tensors are filled into shards in order; a shard is closed when
the next tensor would take it over the limit, so a tensor larger than the limit gets a shard of
its own (as transformers does).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from .files import write_json
from .tensor_files import write_tensors

__all__ = ["DEFAULT_SHARD_SIZE", "INDEX_FILE", "WEIGHTS_FILE", "shard_size", "is_shard_name"]

DEFAULT_SHARD_SIZE = "5GB"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_SHARD = re.compile(r"model-\d{5,}-of-\d{5,}\.safetensors")
_UNITS = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9}
_SIZE = re.compile(r"(\d+)([KMG]I?B)", re.IGNORECASE)


def is_shard_name(name: str) -> bool:
    """Whether ``name`` is a shard file name this module writes."""
    return bool(_SHARD.fullmatch(name))


def shard_size(value: int | str) -> int:
    """``max_shard_size`` in bytes (see the module docstring).

    Raises:
        ValueError: not a positive int or a ``"<digits><unit>"`` string (names the value).
    """
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 1:
            raise ValueError(f"max_shard_size: {value} bytes is not positive")
        return value
    match = _SIZE.fullmatch(value) if isinstance(value, str) else None
    if match is None or int(match.group(1)) < 1:
        raise ValueError(
            f"max_shard_size: {value!r} is neither a positive number of bytes nor a size such "
            "as '5GB', '500MB' or '2GiB'"
        )
    size = int(match.group(1)) * _UNITS[match.group(2).upper()]
    if not match.group(2).upper().endswith("IB") and value.endswith("b"):
        size //= 8  # transformers: a lower-case final "b" counts bits
    return max(size, 1)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _split(tensors: dict[str, torch.Tensor], limit: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    used = 0
    for key, t in tensors.items():
        size = _nbytes(t)
        if shards[-1] and used + size > limit:
            shards.append({})
            used = 0
        shards[-1][key] = t
        used += size
    return shards


def write_weights(folder: Path, tensors: dict[str, torch.Tensor], limit: int) -> list[str]:
    """Write ``tensors`` into ``folder`` as one file or as shards plus index; returns the names."""
    shards = _split(tensors, limit)
    if len(shards) == 1:
        write_tensors(folder / WEIGHTS_FILE, shards[0])
        return [WEIGHTS_FILE]
    names = [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    weight_map = {}
    for name, shard in zip(names, shards, strict=True):
        write_tensors(folder / name, shard)
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(_nbytes(t) for t in tensors.values())
    write_json(folder / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})
    return [*names, INDEX_FILE]
