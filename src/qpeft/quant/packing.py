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
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from . import blocks as bl
from .numerics import E2M1_MAX, E4M3_MAX, TINY_AMAX, e2m1_magnitude, nvfp4_block_scale, pow2

__all__ = [
    "PackSpec",
    "check_packable",
    "pack",
    "unpack",
    "packed_layout",
    "packed_bytes",
    "bytes_per_weight",
]

_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
_FORMATS = ("int", "fp8", "nvfp4", "mxfp4")


@dataclass(frozen=True)
class PackSpec:
    """How a weight is packed: the quantizer's format attributes and the weight's shape."""

    fmt: str
    shape: tuple[int, ...]
    num_bits: int = 8
    axis: int | tuple[int, ...] | None = None
    block_sizes: tuple[tuple[int, int | None], ...] | None = None  # sorted (axis, size) pairs
    narrow_range: bool = False
    neg_zero: bool = True  # int: code -(M + 1) stands for -0.0

    @property
    def sizes(self) -> dict[int, int | None] | None:
        """``block_sizes`` as the dict :mod:`qpeft.quant.blocks` takes."""
        return None if self.block_sizes is None else dict(self.block_sizes)

    @property
    def nibbles(self) -> bool:
        """Whether codes are 4 bits (two per byte)."""
        return self.fmt in ("nvfp4", "mxfp4") or (self.fmt == "int" and self.num_bits <= 4)

    def to_json(self) -> dict[str, Any]:
        """Plain JSON (for the mode log)."""
        return json_ready(asdict(self))

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PackSpec:
        """Inverse of :meth:`to_json`."""
        axis = data.get("axis")
        blocks = data.get("block_sizes")
        return cls(
            fmt=data["fmt"],
            shape=tuple(data["shape"]),
            num_bits=int(data.get("num_bits", 8)),
            axis=tuple(axis) if isinstance(axis, list) else axis,
            block_sizes=None if blocks is None else tuple((int(a), s) for a, s in blocks),
            narrow_range=bool(data.get("narrow_range", False)),
            neg_zero=bool(data.get("neg_zero", True)),
        )


def json_ready(value: Any) -> Any:
    """Tuples as lists, recursively."""
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    return value


def check_packable(quantizer: Any) -> str | None:
    """Why a quantizer's format cannot be packed (a sentence), or None if it can."""
    fmt = quantizer.fmt
    if fmt not in _FORMATS:
        return f"format {fmt!r} has no packed layout"
    if fmt == "int" and (quantizer.unsigned or not 2 <= quantizer.num_bits <= 8):
        return "only signed integer formats of 2 to 8 bits are packed"
    if fmt in ("nvfp4", "mxfp4") and quantizer.block_size % 2:
        return f"{fmt} needs an even block size"
    return None


def _groups_shape(spec: PackSpec) -> tuple[int, ...]:
    """Shape of one-value-per-amax-group tensors (int/fp8 scales)."""
    shape = spec.shape
    if spec.block_sizes is not None:
        layout = bl.block_layout(shape, spec.sizes)
        return tuple(-(-n // layout[d]) if d in layout else n for d, n in enumerate(shape))
    if spec.axis is None:
        return ()
    axes = spec.axis if isinstance(spec.axis, tuple) else (spec.axis,)
    kept = {a % len(shape) for a in axes}
    return tuple(n if d in kept else 1 for d, n in enumerate(shape))


def _fp4_block(spec: PackSpec) -> int:
    return spec.sizes[-1]


def packed_layout(spec: PackSpec) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """``{tensor name: (shape, dtype)}`` that :func:`pack` returns for ``spec``."""
    *lead, last = spec.shape
    if spec.fmt in ("nvfp4", "mxfp4"):
        b = _fp4_block(spec)
        blocks = -(-last // b)
        out = {
            "packed": ((*lead, blocks * b // 2), torch.uint8),
            "scale": ((*lead, blocks), torch.float8_e4m3fn if spec.fmt == "nvfp4" else torch.uint8),
        }
        if spec.fmt == "nvfp4":
            out["scale_2"] = ((*lead[:-1], 1, 1) if lead[:-1] else (), torch.float32)
        return out
    if spec.fmt == "fp8":
        codes = (tuple(spec.shape), torch.float8_e4m3fn)
    elif spec.nibbles:
        codes = ((*lead, -(-last // 2)), torch.uint8)
    else:
        codes = (tuple(spec.shape), torch.int8)
    return {"packed": codes, "scale": (_groups_shape(spec), torch.float32)}


def packed_bytes(tensors: dict[str, torch.Tensor]) -> int:
    """Total bytes of a packed weight's tensors."""
    return sum(t.numel() * t.element_size() for t in tensors.values())


# ------------------------------------------------------------------------------- nibbles
def _pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes < 16 ``[..., n]`` -> ``[..., ceil(n / 2)]``, element 2i in the low nibble."""
    codes = torch.nn.functional.pad(codes, (0, codes.shape[-1] % 2))
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def _unpack_nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`_pack_nibbles`: uint8 codes ``[..., n]``."""
    both = torch.stack((packed & 0xF, packed >> 4), dim=-1)
    return both.reshape(*packed.shape[:-1], -1)[..., :n]


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
    shape = _groups_shape(spec)
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
    scale = divisor.reshape(_groups_shape(spec)).contiguous()
    if spec.nibbles:
        packed = _pack_nibbles((codes & 0xF).to(torch.uint8))
    else:
        packed = codes.to(torch.int8)
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
        "scale": s.reshape(_groups_shape(spec)).contiguous(),
    }, spec


def _fp4_codes(t: torch.Tensor, negative: torch.Tensor, ties_to_even: bool) -> torch.Tensor:
    mag = e2m1_magnitude(t.abs(), ties_to_even=ties_to_even)
    grid = torch.tensor(_E2M1, device=t.device)
    index = torch.searchsorted(grid, mag).to(torch.uint8)
    return index | (negative.to(torch.uint8) << 3)


def _blocks_fp4(w: torch.Tensor, spec: PackSpec) -> torch.Tensor:
    b = _fp4_block(spec)
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
    packed = _pack_nibbles(codes.reshape(*w.shape[:-1], -1))
    return {"packed": packed, "scale": fp8.squeeze(-1), "scale_2": g.contiguous()}, spec


def _pack_mxfp4(w: torch.Tensor, spec: PackSpec):
    blocks = _blocks_fp4(w, spec)
    descale = blocks.float().abs().amax(dim=-1, keepdim=True) / torch.tensor(
        E2M1_MAX, device=w.device
    )
    exponent = torch.ceil(torch.maximum(torch.log2(descale), torch.tensor(-127.0, device=w.device)))
    t = blocks / pow2(exponent)
    codes = _fp4_codes(t, ~(t > 0), True)
    packed = _pack_nibbles(codes.reshape(*w.shape[:-1], -1))
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
        n = _unpack_nibbles(packed, last).to(torch.int16)
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


def _fp4_values(tensors: dict[str, torch.Tensor], spec: PackSpec) -> torch.Tensor:
    codes = _unpack_nibbles(tensors["packed"], 2 * tensors["packed"].shape[-1])
    grid = torch.tensor(_E2M1, device=codes.device)
    mag = grid[(codes & 7).long()]
    q = torch.where((codes & 8) > 0, -mag, mag)
    return q.reshape(*q.shape[:-1], -1, _fp4_block(spec))


@torch.no_grad()
def unpack(tensors: dict[str, torch.Tensor], spec: PackSpec, dtype: torch.dtype) -> torch.Tensor:
    """The fake-quantized weight ``[spec.shape]`` in ``dtype`` from :func:`pack`'s tensors."""
    if spec.fmt == "int":
        return _unpack_int(tensors, spec, dtype)
    if spec.fmt == "fp8":
        return _unpack_fp8(tensors, spec, dtype)
    q = _fp4_values(tensors, spec)
    if spec.fmt == "nvfp4":
        g = tensors["scale_2"]
        gb = g.unsqueeze(-1) if g.dim() else g
        scale = tensors["scale"].unsqueeze(-1).float() * gb
    else:
        scale = pow2(tensors["scale"].to(torch.int32).unsqueeze(-1) - 127)
    y = (q * scale).reshape(*spec.shape[:-1], -1)[..., : spec.shape[-1]]
    return y.to(dtype)


def bytes_per_weight(tensors: dict[str, torch.Tensor], spec: PackSpec) -> float:
    """Packed bytes divided by the number of weights."""
    return packed_bytes(tensors) / math.prod(spec.shape)
