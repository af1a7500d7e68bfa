"""Banded dequantization: ``Q(W)`` rebuilt into one output tensor, a band of rows at a time.

:func:`unpack_into` writes :func:`qpeft.quant.packing.unpack` of a packed weight into ``out``
(compute dtype, the spec's ``[..., rows, cols]`` shape), one band of rows (dim -2) after the other.
Every band runs the very fp32 element-wise operations of ``unpack`` on its slice of the codes and
scales and is cast once into its rows of ``out`` (fp4 without a padded last dim: the fp32 product
is written straight into them), so the result is ``unpack``'s bit for bit (each
element depends only on its own code and its group's scales), while the fp32 temporaries (codes
looked up, products) are bounded by one band (:data:`BAND_ELEMS` weights) instead of the layer.

Bands start on a multiple of the row block (``fp8_block128``: 128 rows); a tensor whose dim -2
counts rows (codes, per-row or per-block scales) or row blocks is sliced, one that broadcasts over
rows (a per-tensor scale, the nvfp4 ``scale_2``, an expert's ``[E, 1, 1]`` scales) is kept whole.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from . import blocks as bl
from .packed_layout import fp4_block
from .packing import PackSpec, fp4_into, unpack

__all__ = ["BAND_ELEMS", "unpack_into", "dequantize"]

BAND_ELEMS = 1 << 18  # weights per band: about 3 MiB of fp32 temporaries, few Python round trips


def _row_block(spec: PackSpec) -> int:
    """The block size along the rows axis (dim -2): 1 without one."""
    if spec.block_sizes is None or len(spec.shape) < 2:
        return 1
    layout = bl.block_layout(spec.shape, spec.sizes)
    return layout.get(len(spec.shape) - 2, 1)


def _band(tensors: dict[str, torch.Tensor], spec: PackSpec, start: int, stop: int, block: int):
    """The tensors of rows ``[start, stop)``: sliced along dim -2 where it counts rows or row
    blocks, kept where it broadcasts."""
    rows, ndim = spec.shape[-2], len(spec.shape)
    out = {}
    for name, t in tensors.items():
        if t.dim() == ndim and t.shape[-2] == rows:
            t = t[..., start:stop, :]
        elif t.dim() == ndim and block > 1 and t.shape[-2] == -(-rows // block):
            t = t[..., start // block : -(-stop // block), :]
        out[name] = t
    return out


def _direct(spec: PackSpec, rows_out: torch.Tensor) -> bool:
    """Whether an fp4 band can be multiplied straight into its rows of ``out`` (no padding)."""
    return (
        spec.fmt in ("nvfp4", "mxfp4")
        and spec.shape[-1] % fp4_block(spec) == 0
        and rows_out.is_contiguous()
    )


@torch.no_grad()
def unpack_into(
    out: torch.Tensor,
    tensors: dict[str, torch.Tensor],
    spec: PackSpec,
    band_elems: int = BAND_ELEMS,
) -> torch.Tensor:
    """Write ``unpack(tensors, spec, out.dtype)`` into ``out``, one band of rows at a time.

    Args:
        out: a tensor of ``spec.shape`` in the compute dtype (fp32, bf16 or fp16).
        tensors: the packed tensors of :func:`qpeft.quant.packing.pack`.
        spec: their packing spec.
        band_elems: weights per band (at least one row block).

    Returns:
        ``out``.

    Raises:
        ValueError: ``out`` is not shaped ``spec.shape``, or ``band_elems`` is not positive.
    """
    if tuple(out.shape) != tuple(spec.shape):
        raise ValueError(f"unpack_into: out has shape {tuple(out.shape)}, the spec {spec.shape}")
    if band_elems < 1:
        raise ValueError(f"unpack_into: band_elems must be positive, got {band_elems}")
    if len(spec.shape) < 2:
        return out.copy_(unpack(tensors, spec, torch.float32))
    rows = spec.shape[-2]
    block = _row_block(spec)
    per_row = math.prod(spec.shape) // max(rows, 1)
    step = max(1, band_elems // max(per_row * block, 1)) * block
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        band = replace(spec, shape=(*spec.shape[:-2], stop - start, spec.shape[-1]))
        # fp32, cast once by the copy: the same rounding as unpack(..., out.dtype)
        rows_out, codes = out[..., start:stop, :], _band(tensors, spec, start, stop, block)
        if _direct(spec, rows_out):
            fp4_into(rows_out, codes, band)
            continue
        values = unpack(codes, band, torch.float32)
        rows_out.copy_(values)
    return out


def dequantize(
    tensors: dict[str, torch.Tensor], spec: PackSpec, dtype: torch.dtype
) -> torch.Tensor:
    """``unpack(tensors, spec, dtype)`` built band by band (:func:`unpack_into`) into a fresh
    tensor on the codes' device.

    Args:
        tensors: the packed tensors of :func:`qpeft.quant.packing.pack`.
        spec: their packing spec.
        dtype: the compute dtype (fp32, bf16 or fp16).
    """
    device = tensors["packed"].device
    return unpack_into(torch.empty(spec.shape, dtype=dtype, device=device), tensors, spec)
