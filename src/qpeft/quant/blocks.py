"""Block layouts for block quantization on any axes (``block_sizes`` as ModelOpt spells it).

``sizes`` maps an axis (negative counts from the end) to a block size, or to None for the whole
axis (``{-1: None}``: one block per row, i.e. per token). Each blocked axis of length ``n`` with
block ``b`` is zero-padded to a multiple of ``b`` and split into ``(n / b, b)``; the amax of a
block is then a reduction over the ``b`` dims with ``keepdim``, so it broadcasts against the
blocks. ``{-1: 128}`` on ``W: [out, in]`` gives blocks ``[out, in / 128, 128]`` and a per-block
amax ``[out, in / 128, 1]``; ``{-1: 128, -2: 128}`` gives ``[out / 128, 128, in / 128, 128]`` and
``[out / 128, 1, in / 128, 1]`` (2-D 128 x 128 blocks).

Zero padding never changes a block's amax, and every element's quantized value depends only on its
own value and its block's amax, so the values are those of quantizing each block alone.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["block_layout", "to_blocks", "from_blocks", "block_amax", "fake_quant_blocks"]


def block_layout(shape: tuple[int, ...], sizes: Mapping[int, int | None]) -> dict[int, int]:
    """``{non-negative axis: block size}`` for a tensor of ``shape``.

    Raises:
        ValueError: an axis the tensor does not have, the same axis twice, or a block size that is
            not a positive integer or None.
    """
    dims, out = len(shape), {}
    for axis, size in sizes.items():
        if not -dims <= axis < dims:
            raise ValueError(f"block_sizes: axis {axis} out of range for a {dims}-D tensor")
        if size is not None and (not isinstance(size, int) or size < 1):
            raise ValueError(f"block_sizes: block size must be a positive int or None, got {size}")
        d = axis % dims
        if d in out:
            raise ValueError(f"block_sizes: axis {axis} given twice")
        out[d] = max(shape[d], 1) if size is None else size
    return out


def to_blocks(x: torch.Tensor, sizes: Mapping[int, int | None]) -> tuple[torch.Tensor, tuple]:
    """``(blocks, block dims)``: ``x`` zero-padded and split as the module docstring says."""
    layout = block_layout(tuple(x.shape), sizes)
    pad: list[int] = []
    for d in reversed(range(x.dim())):
        pad += [0, (-x.shape[d]) % layout[d] if d in layout else 0]
    padded = F.pad(x, pad) if any(pad) else x
    shape: list[int] = []
    reduce: list[int] = []
    for d, n in enumerate(padded.shape):
        if d in layout:
            shape += [n // layout[d], layout[d]]
            reduce.append(len(shape) - 1)
        else:
            shape.append(n)
    return padded.reshape(shape), tuple(reduce)


def from_blocks(blocks: torch.Tensor, like: torch.Tensor, sizes: Mapping[int, int | None]):
    """Undo :func:`to_blocks` for a tensor shaped like ``like``: merge, slice, cast to its dtype."""
    layout = block_layout(tuple(like.shape), sizes)
    padded = [n + ((-n) % layout[d] if d in layout else 0) for d, n in enumerate(like.shape)]
    merged = blocks.reshape(padded)
    return merged[tuple(slice(0, n) for n in like.shape)].to(like.dtype)


def block_amax(x: torch.Tensor, sizes: Mapping[int, int | None]) -> torch.Tensor:
    """The fp32 amax of every block of ``x``, shaped to broadcast against its blocks."""
    blocks, reduce = to_blocks(x.detach().abs().float(), sizes)
    return blocks.amax(dim=reduce, keepdim=True)


def fake_quant_blocks(
    x: torch.Tensor,
    sizes: Mapping[int, int | None],
    fn: Callable[..., torch.Tensor],
    amax: torch.Tensor,
    *args: Any,
) -> torch.Tensor:
    """``fn(block, amax of the block, *args)`` on every block of ``x`` (an elementwise fake-quant
    function such as ``fake_quant_int``), returned in ``x``'s shape and dtype."""
    blocks, _ = to_blocks(x, sizes)
    return from_blocks(fn(blocks, amax, *args), x, sizes)


def spread(amax: torch.Tensor, x: torch.Tensor, sizes: Mapping[int, int | None]) -> torch.Tensor:
    """A per-block ``amax`` expanded to one value per element of ``x`` (for the clipped STE)."""
    blocks, _ = to_blocks(x.detach().float(), sizes)
    return from_blocks(amax.to(blocks.device).expand_as(blocks), x.float(), sizes)
