"""Checked tensor loading: compare a model's ``state_dict`` with a safetensors header, then copy.

Every key, shape and dtype is compared before a single value is written, so a mismatch leaves the
model's tensors as they were; the error names the first mismatching key.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

import torch
from torch import nn

__all__ = ["check_tensors", "load_checked"]


def check_tensors(
    model: nn.Module,
    header: dict[str, tuple[torch.dtype, list[int]]],
    aliases: dict[str, str],
    where: Path,
    only: Collection[str] | None = None,
    cast: bool = False,
) -> None:
    """Check that the file described by ``header`` (+ ``aliases``) holds exactly the model's tensors.

    Args:
        model: the model to load into.
        header: ``{key: (dtype, shape)}`` of the file (:func:`qpeft.safeio.read_header`).
        aliases: ``{key: stored key}`` for tied tensors stored once.
        where: the file, for messages.
        only: compare only these model keys (e.g. new adapters); None compares every key.
        cast: accept a dtype that differs from the model's (values are cast on load).

    Raises:
        ValueError: naming the first missing, unexpected, mis-shaped or mis-typed key.
    """
    expected = model.state_dict()
    if only is not None:
        expected = {k: v for k, v in expected.items() if k in only}
    for key, tensor in expected.items():
        source = aliases.get(key, key)
        if source not in header:
            raise ValueError(f"{where} has no tensor {key!r}, which the model needs (another architecture or config?)")
        dtype, shape = header[source]
        if list(tensor.shape) != shape:
            raise ValueError(f"{where}: tensor {key!r} has shape {shape}, the model's has {list(tensor.shape)}")
        if not cast and dtype != tensor.dtype:
            raise ValueError(f"{where}: tensor {key!r} is {dtype}, the model's is {tensor.dtype}")
    extra = [k for k in [*header, *aliases] if k not in expected]
    if extra:
        raise ValueError(f"{where} has tensor {extra[0]!r}, which the model does not have (another architecture?)")


@torch.no_grad()
def load_checked(
    model: nn.Module, tensors: dict[str, torch.Tensor], aliases: dict[str, str], strict: bool = True
) -> None:
    """Copy checked ``tensors`` (tied keys expanded from ``aliases``) into ``model``.

    Args:
        strict: every model key must be given (a full checkpoint); False for a subset (adapters).
    """
    full = {**tensors, **{key: tensors[source] for key, source in aliases.items()}}
    result = model.load_state_dict(full, strict=strict)
    if result.unexpected_keys:  # unreachable after check_tensors; kept as a guard
        raise ValueError(f"unexpected tensor {result.unexpected_keys[0]!r}")
