r"""Packed weights: codes and scales from which the fake-quantized weight is rebuilt bit for bit.

``pack(W, spec, amax)`` stores what :mod:`qpeft.quant.numerics` rounds ``W`` to, and
``unpack(tensors, spec, dtype)`` recomputes ``Q(W)`` from it with the very fp32 operations the
fake-quant functions end with, so ``unpack(pack(W)) == TensorQuantizer(W)`` bit for bit (the sign
of zero included). ``W`` is in the quantizer's orientation (``[out, in]``, or ``[E, out, in]``);
blocks run along its axes as :mod:`qpeft.quant.blocks` says. Tensors (names as a layer stores them,
prefixed ``weight_``):

* ``int`` (signed, 2..8 bits): ``packed`` the codes ``q`` (int8, same shape as ``W``; 4 bits or
  fewer: two two's-complement nibbles per uint8, element ``2i`` in the low nibble, the last dim
  zero-padded to even). ``scale`` fp32, ModelOpt's ``s = M / amax`` (1 where amax <= 2^-24),
  one per amax group (per tensor ``[]``, per row ``[out, 1]``, per block ``[out, in / b]``);
  ``y = q / s`` (a true division, as the fake quant ends). ``round`` gives ``-0.0`` for small
  negative weights, and code ``-(M + 1)`` (never produced when the amax covers the weight, as
  calibrated) stores it; if the clamp did reach ``-(M + 1)``, zeros come back as ``+0.0``
  (``spec.neg_zero`` False; equal values, outputs unchanged).
* ``fp8`` (E4M3): ``packed`` float8_e4m3fn codes, ``scale`` fp32 ``s = 448 / amax`` (groups as
  int); ``y = fp32(code) * reciprocal(s)``.
* ``nvfp4``: ``packed`` two E2M1 codes per uint8 (sign bit 3, grid index bits 0-2), the last dim
  zero-padded to the block; ``scale`` float8_e4m3fn per block ``[..., in / 16]``; ``scale_2``
  fp32 global scale ``g = amax / (6 * 448)``; ``y = e2m1 * (fp32(scale) * g)``.
* ``mxfp4``: ``packed`` as nvfp4; ``scale`` uint8 E8M0 exponents per block (``e + 127``);
  ``y = e2m1 * 2^e``.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from . import blocks as bl
from .numerics import E2M1_MAX, E4M3_MAX, TINY_AMAX, e2m1_magnitude, nvfp4_block_scale, pow2
from .packed_layout import (
    E2M1_GRID,
    PackSpec,
    bytes_per_weight,
    check_packable,
    fp4_block,
    groups_shape,
    pack_nibbles,
    packed_bytes,
    packed_layout,
    unpack_nibbles,
)

__all__ = [
    "PackSpec",
    "check_packable",
    "pack",
    "unpack",
    "packed_layout",
    "packed_bytes",
    "bytes_per_weight",
]


# ---------------------------------------------------------------------------------- pack
def _expand_groups(scale: torch.Tensor, spec: PackSpec) -> torch.Tensor:
    """A group-shaped tensor as the fake quant broadcasts it (its blocks' keepdim shape)."""
    if spec.block_sizes is None:
        return scale
    _, reduce = bl.to_blocks(torch.empty(spec.shape, device="meta"), spec.sizes)
    for d in reduce:
        scale = scale.unsqueeze(d)
    return scale


def _group_amax(amax: torch.Tensor, spec: PackSpec, device: torch.device) -> torch.Tensor:
    """The amax as one value per group (keepdim block amax reshaped), broadcast to the groups."""
    shape = groups_shape(spec)
    a = amax.detach().float().to(device)
    if a.numel() == math.prod(shape):
        return a.reshape(shape)
    return torch.broadcast_to(a, shape)


def _grouped(x: torch.Tensor, spec: PackSpec) -> torch.Tensor:
    return x if spec.block_sizes is None else bl.to_blocks(x, spec.sizes)[0]


def _ungrouped(y: torch.Tensor, spec: PackSpec, dtype: torch.dtype) -> torch.Tensor:
    if spec.block_sizes is None:
        return y.to(dtype)
    return bl.from_blocks(y, torch.empty(spec.shape, dtype=dtype, device="meta"), spec.sizes)


def _pack_int(w: torch.Tensor, spec: PackSpec, amax: torch.Tensor):
    bound = 2.0 ** (spec.num_bits - 1) - 1.0
    lowest = -bound if spec.narrow_range else -bound - 1
    a = _expand_groups(_group_amax(amax, spec, w.device), spec)
    tiny = a <= TINY_AMAX
    one = torch.ones((), device=w.device)
    s = torch.where(tiny, torch.zeros((), device=w.device), torch.full_like(a, bound) / a)
    q = torch.clamp(torch.round(_grouped(w, spec).float() * s), lowest, bound)
    q = _ungrouped(q, spec, torch.float32)  # whole numbers: exact in fp32
    neg_zero = not bool((q == -bound - 1).any())
    codes = q.to(torch.int16)
    if neg_zero:
        codes = torch.where((q == 0) & torch.signbit(q), int(-bound - 1), codes)
    divisor = torch.where(tiny, one, s)
    scale = divisor.reshape(groups_shape(spec)).contiguous()
    nibbles = pack_nibbles((codes & 0xF).to(torch.uint8)) if spec.nibbles else None
    packed = codes.to(torch.int8) if nibbles is None else nibbles
    return {"packed": packed, "scale": scale}, replace(spec, neg_zero=neg_zero)


def _pack_fp8(w: torch.Tensor, spec: PackSpec, amax: torch.Tensor):
    a = _expand_groups(_group_amax(amax, spec, w.device), spec)
    safe = torch.where(a <= TINY_AMAX, torch.ones((), device=w.device), a)
    s = torch.reciprocal(safe) * E4M3_MAX
    codes = (_grouped(w, spec).float() * s).clamp(min=-E4M3_MAX, max=E4M3_MAX)
    codes = codes.to(torch.float8_e4m3fn)
    if spec.block_sizes is not None:  # keep codes in W's shape (padding sliced off)
        codes = _ungrouped(codes.view(torch.uint8), spec, torch.uint8).view(torch.float8_e4m3fn)
    return {
        "packed": codes.contiguous(),
        "scale": s.reshape(groups_shape(spec)).contiguous(),
    }, spec


def _fp4_codes(t: torch.Tensor, negative: torch.Tensor, ties_to_even: bool) -> torch.Tensor:
    mag = e2m1_magnitude(t.abs(), ties_to_even=ties_to_even)
    grid = torch.tensor(E2M1_GRID, device=t.device)
    index = torch.searchsorted(grid, mag).to(torch.uint8)
    return index | (negative.to(torch.uint8) << 3)


def _blocks_fp4(w: torch.Tensor, spec: PackSpec) -> torch.Tensor:
    b = fp4_block(spec)
    padded = torch.nn.functional.pad(w, (0, (-w.shape[-1]) % b))
    return padded.reshape(*w.shape[:-1], -1, b)


def _pack_nvfp4(w: torch.Tensor, spec: PackSpec, amax: torch.Tensor):
    a = amax.float().to(w.device)
    g = a / torch.tensor(E2M1_MAX * E4M3_MAX, device=w.device)
    g = torch.where(g > 0, g, torch.ones((), device=w.device))
    gb = g.unsqueeze(-1) if g.dim() else g
    blocks = _blocks_fp4(w, spec)
    block_amax = blocks.float().abs().amax(dim=-1, keepdim=True)
    ratio = block_amax / (E2M1_MAX * gb)
    ratio = torch.where(ratio == 0, torch.ones((), device=w.device), ratio)
    fp8 = ratio.clamp(min=2.0**-9, max=E4M3_MAX).to(torch.float8_e4m3fn)
    t = blocks / nvfp4_block_scale(block_amax, gb)
    codes = _fp4_codes(t, t < 0, True)
    codes = codes & torch.where(codes == 8, 0, 0xF).to(torch.uint8)  # +0 (mag 0 is unsigned)
    packed = pack_nibbles(codes.reshape(*w.shape[:-1], -1))
    return {"packed": packed, "scale": fp8.squeeze(-1), "scale_2": g.contiguous()}, spec


def _pack_mxfp4(w: torch.Tensor, spec: PackSpec):
    blocks = _blocks_fp4(w, spec)
    descale = blocks.float().abs().amax(dim=-1, keepdim=True) / torch.tensor(
        E2M1_MAX, device=w.device
    )
    exponent = torch.ceil(torch.maximum(torch.log2(descale), torch.tensor(-127.0, device=w.device)))
    t = blocks / pow2(exponent)
    codes = _fp4_codes(t, ~(t > 0), True)
    packed = pack_nibbles(codes.reshape(*w.shape[:-1], -1))
    scale = (exponent.to(torch.int32) + 127).to(torch.uint8).squeeze(-1)
    return {"packed": packed, "scale": scale}, spec


@torch.no_grad()
def pack(
    w: torch.Tensor, spec: PackSpec, amax: torch.Tensor | None
) -> tuple[dict[str, torch.Tensor], PackSpec]:
    """Pack ``w`` (shaped ``spec.shape``) as its quantizer with ``amax`` rounds it.

    Args:
        w: the weight in the quantizer's orientation, fp32/bf16/fp16, finite.
        spec: the format (see the module docstring); ``neg_zero`` is decided here.
        amax: the quantizer's amax (int/fp8: per group; nvfp4: the global amax; mxfp4: None).

    Returns:
        ``(tensors, spec)``: the tensors of :func:`packed_layout` and the spec with ``neg_zero``.
    """
    if tuple(w.shape) != tuple(spec.shape):
        raise ValueError(f"pack: weight shape {tuple(w.shape)} differs from {spec.shape}")
    if spec.fmt == "int":
        return _pack_int(w, spec, amax)
    if spec.fmt == "fp8":
        return _pack_fp8(w, spec, amax)
    if spec.fmt == "nvfp4":
        return _pack_nvfp4(w, spec, amax)
    return _pack_mxfp4(w, spec)


# -------------------------------------------------------------------------------- unpack
def _unpack_int(tensors: dict[str, torch.Tensor], spec: PackSpec, dtype: torch.dtype):
    packed, last = tensors["packed"], spec.shape[-1]
    if spec.nibbles:
        n = unpack_nibbles(packed, last).to(torch.int16)
        codes = torch.where(n >= 8, n - 16, n)
    else:
        codes = packed.to(torch.int16)
    q = codes.float()
    if spec.neg_zero:
        q = torch.where(
            codes == -(2 ** (spec.num_bits - 1)), torch.tensor(-0.0, device=q.device), q
        )
    divisor = _expand_groups(tensors["scale"], spec)
    return _ungrouped(_grouped(q, spec) / divisor, spec, dtype)


def _unpack_fp8(tensors: dict[str, torch.Tensor], spec: PackSpec, dtype: torch.dtype):
    s = _expand_groups(tensors["scale"], spec)
    return _ungrouped(_grouped(tensors["packed"].float(), spec) * torch.reciprocal(s), spec, dtype)


_FP4_PAIRS: dict[torch.device, torch.Tensor] = {}


def _fp4_pairs(device: torch.device) -> torch.Tensor:
    """``[256, 2]`` fp32: the two signed E2M1 values of every packed byte (low nibble first)."""
    if device not in _FP4_PAIRS:
        byte = torch.arange(256, dtype=torch.uint8)
        grid = torch.tensor(E2M1_GRID)

        def value(code: torch.Tensor) -> torch.Tensor:
            mag = grid[(code & 7).long()]
            return torch.where((code & 8) > 0, -mag, mag)  # code 8 is -0.0, as packed

        _FP4_PAIRS[device] = torch.stack((value(byte & 0xF), value(byte >> 4)), -1).to(device)
    return _FP4_PAIRS[device]


def _fp4_values(tensors: dict[str, torch.Tensor], spec: PackSpec) -> torch.Tensor:
    # one gather per byte instead of unpacking nibbles, looking up and signing them: the pair
    # of fp32 values read as one int64, so the gather is a plain 1-D index_select
    packed = tensors["packed"]
    pairs = _fp4_pairs(packed.device).view(torch.int64).view(-1)
    index = packed.reshape(-1).to(torch.int32 if packed.device.type == "cpu" else torch.int64)
    q = pairs.index_select(0, index).view(torch.float32)
    return q.reshape(*packed.shape[:-1], -1, fp4_block(spec))


@torch.no_grad()
def unpack(tensors: dict[str, torch.Tensor], spec: PackSpec, dtype: torch.dtype) -> torch.Tensor:
    """The fake-quantized weight ``[spec.shape]`` in ``dtype`` from :func:`pack`'s tensors."""
    if spec.fmt == "int":
        return _unpack_int(tensors, spec, dtype)
    if spec.fmt == "fp8":
        return _unpack_fp8(tensors, spec, dtype)
    q, scale = _fp4_values(tensors, spec), fp4_scales(tensors, spec)
    y = (q * scale).reshape(*spec.shape[:-1], -1)[..., : spec.shape[-1]]
    return y.to(dtype)


def fp4_scales(tensors: dict[str, torch.Tensor], spec: PackSpec) -> torch.Tensor:
    """The fp32 scale of every fp4 block, ``[..., blocks, 1]`` (broadcasts against the codes)."""
    if spec.fmt == "nvfp4":
        g = tensors["scale_2"]
        gb = g.unsqueeze(-1) if g.dim() else g
        return tensors["scale"].unsqueeze(-1).float() * gb
    return pow2(tensors["scale"].to(torch.int32).unsqueeze(-1) - 127)


def fp4_into(out: torch.Tensor, tensors: dict[str, torch.Tensor], spec: PackSpec) -> torch.Tensor:
    """``unpack`` of fp4 codes written straight into a contiguous ``out`` (no padded last dim):
    the fp32 product is rounded once into ``out``'s dtype, as ``unpack`` rounds it."""
    q = _fp4_values(tensors, spec)
    return torch.mul(q, fp4_scales(tensors, spec), out=out.view(q.shape))
