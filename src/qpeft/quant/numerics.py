r"""Pure fake-quantization numerics, bit-exact with NVIDIA ModelOpt 0.47.0.

Every function returns a tensor of the input's dtype (fp32, bf16 or fp16). Like ModelOpt,
all arithmetic is done in fp32 (bf16/fp16 inputs are upcast exactly) and the result is
cast back to the input dtype once at the end. Constants are made as tensors on the
input's device so that every division is a true IEEE division on CPU and GPU alike
(PyTorch turns ``tensor / python_float`` on CUDA and ``python_float / tensor`` everywhere
into a reciprocal multiply, which rounds differently).

Formats (``x`` in fp32, ``amax`` >= 0):

* INT, b bits (ModelOpt ``_tensor_quant``): ``M = 2^(b-1) - 1``, ``s = M / amax``
  (tensor / tensor), ``q = clamp(rne(x * s), -M - 1, M)`` (``-M`` if narrow range; unsigned:
  ``M = 2^b - 1``, ``q = clamp(rne(x * s), 0, M)``),
  ``y = q / s``. ``amax <= 2^-24`` gives ``s = 0``, so ``y = +-0``.
* INT block-wise: the same with one ``amax = max|x|`` per block of the last dim; the last
  dim is zero-padded to a multiple of the block and sliced back.
* FP8 E4M3 (ModelOpt ``fp8_eager``): ``s = reciprocal(amax) * 448`` (ModelOpt writes
  ``448.0 / amax``, which PyTorch evaluates this way); ``amax <= 2^-24`` is replaced
  by 1 (so ``s = 448``);
  ``y = fp32(e4m3(clamp(x * s, -448, 448))) * reciprocal(s)``.
* NVFP4 (ModelOpt ``NVFP4QTensor`` quantize + dequantize): ``g = amax / 2688``; per block
  of 16 ``r = blockmax / (6 g)``, ``r = 1`` where ``r == 0``,
  ``s = fp32(e4m3(clamp(r, 2^-9, 448))) * g``; ``y = e2m1(x / s) * s`` with E2M1 grid
  {0, .5, 1, 1.5, 2, 3, 4, 6}, ties to even, saturating at 6; zeros come out as +0.
* MXFP4 (ModelOpt's MXFP4 fake-quant kernel, the one it trains with): per block of 32,
  ``e = ceil(max(log2_fp32(blockmax / 6), -127))``, ``y = e2m1(x / 2^e) * 2^e`` with ties
  rounded to even (as NVFP4) and every non-positive zero output as -0. ModelOpt's
  ``MXFP4QTensor`` (its CPU quantize/dequantize path) instead rounds ties toward zero:
  ``ties_to_even=False`` reproduces it bit for bit (the stored reference data is made with it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

E4M3_MAX = 448.0
E2M1_MAX = 6.0
TINY_AMAX = 2.0**-24
_E2M1_BOUNDS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
_E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def _const(value: float, like: torch.Tensor) -> torch.Tensor:
    """An fp32 0-dim tensor on ``like``'s device (keeps divisions true divisions)."""
    return torch.tensor(value, dtype=torch.float32, device=like.device)


def _amax_fp32(amax: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """``amax`` as fp32 on ``x``'s device; raises ValueError if any entry is negative."""
    amax = torch.as_tensor(amax).to(device=x.device, dtype=torch.float32)
    if bool((amax < 0).any()):
        raise ValueError("amax must be non-negative")
    return amax


def _to_blocks(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """Zero-pad the last dim to a multiple of ``block_size`` and split it into blocks."""
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    if x.dim() == 0:
        raise ValueError("block-wise quantization needs at least one dimension")
    padded = F.pad(x, (0, (-x.shape[-1]) % block_size))
    return padded.reshape(*x.shape[:-1], -1, block_size)


def _from_blocks(blocks: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Undo ``_to_blocks``: merge blocks, slice off padding, cast to ``like.dtype``."""
    merged = blocks.reshape(*like.shape[:-1], -1)[..., : like.shape[-1]]
    return merged.to(like.dtype)


def fake_quant_int(
    x: torch.Tensor,
    amax: torch.Tensor | float,
    num_bits: int = 8,
    narrow_range: bool = False,
    unsigned: bool = False,
) -> torch.Tensor:
    """Symmetric integer fake quantization, signed or unsigned.

    Args:
        x: input tensor (fp32, bf16 or fp16).
        amax: clipping range, broadcastable to ``x`` (e.g. ``[out, 1]`` per output row).
        num_bits: integer width, e.g. 8, 4 or 16.
        narrow_range: clamp to ``[-M, M]`` instead of ``[-M - 1, M]`` (signed only).
        unsigned: ``M = 2^b - 1`` and range ``[0, M]`` (ModelOpt's ``unsigned``), for
            non-negative inputs.

    Raises:
        ValueError: if ``amax`` has a negative entry, or ``unsigned`` and ``x`` does.
    """
    xf, a = x.float(), _amax_fp32(amax, x)
    if unsigned and bool((xf < 0).any()):
        raise ValueError("unsigned: negative values in unsigned integer quantization")
    max_bound = _const(2.0 ** (num_bits - 1 + int(unsigned)) - 1.0, x)
    signed_min = -max_bound if narrow_range else -max_bound - 1
    min_bound = _const(0.0, x) if unsigned else signed_min
    tiny = a <= TINY_AMAX
    scale = torch.where(tiny, _const(0.0, x), max_bound / a)
    q = torch.clamp(torch.round(xf * scale), min_bound, max_bound)
    return (q / torch.where(tiny, _const(1.0, x), scale)).to(x.dtype)


def fake_quant_int_blockwise(
    x: torch.Tensor, num_bits: int = 4, block_size: int = 128, narrow_range: bool = False
) -> torch.Tensor:
    """Integer fake quantization with one amax (= max |x|) per block of the last dim.

    Raises:
        ValueError: if ``block_size`` is not positive or ``x`` is 0-dim.
    """
    blocks = _to_blocks(x, block_size)
    amax = blocks.float().abs().amax(dim=-1, keepdim=True)
    return _from_blocks(fake_quant_int(blocks, amax, num_bits, narrow_range), x)


def fake_quant_fp8(x: torch.Tensor, amax: torch.Tensor | float) -> torch.Tensor:
    """FP8 E4M3 fake quantization with a static (per-tensor or broadcastable) amax.

    Raises:
        ValueError: if ``amax`` has a negative entry.
    """
    a = _amax_fp32(amax, x)
    safe = torch.where(a <= TINY_AMAX, _const(1.0, x), a)
    scale = torch.reciprocal(safe) * E4M3_MAX
    scaled = (x.float() * scale).clamp(min=-E4M3_MAX, max=E4M3_MAX)
    return (scaled.to(torch.float8_e4m3fn).float() * torch.reciprocal(scale)).to(x.dtype)


def e2m1_magnitude(a: torch.Tensor, ties_to_even: bool = True) -> torch.Tensor:
    """Round non-negative fp32 ``a`` to the E2M1 grid, saturating at 6 (NaN gives 6).

    Ties go to the even code when ``ties_to_even``, else toward zero.
    """
    if isinstance(a, DTensor):  # elementwise: round each shard (tensor parallelism)
        local = e2m1_magnitude(a.to_local(), ties_to_even)
        return DTensor.from_local(
            local, a.device_mesh, a.placements, shape=a.shape, stride=a.stride()
        )
    bounds = torch.tensor(_E2M1_BOUNDS, dtype=torch.float32, device=a.device)
    idx = torch.bucketize(a, bounds)  # number of bounds strictly below a
    if ties_to_even:
        tie = a == bounds[idx.clamp(max=len(_E2M1_BOUNDS) - 1)]
        idx = idx + (tie & (idx % 2 == 1)).to(idx.dtype)
    values = torch.tensor(_E2M1_VALUES, dtype=torch.float32, device=a.device)
    return values[idx]


def nvfp4_block_scale(block_amax: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """NVFP4 per-block scale ``fp32(e4m3(clamp(r, 2^-9, 448))) * g``, ``r = amax / (6 g)``."""
    ratio = block_amax / (E2M1_MAX * global_scale)
    ratio = torch.where(ratio == 0, _const(1.0, ratio), ratio)
    fp8 = ratio.clamp(min=2.0**-9, max=E4M3_MAX).to(torch.float8_e4m3fn)
    return fp8.float() * global_scale


def fake_quant_nvfp4(
    x: torch.Tensor, global_amax: torch.Tensor | float, block_size: int = 16
) -> torch.Tensor:
    """NVFP4 fake quantization: E2M1 values, E4M3 block scales, fp32 global scale.

    Args:
        x: input tensor; the last dim is zero-padded to a multiple of ``block_size``.
        global_amax: per-tensor amax (calibrated, or ``x.abs().amax()``), or one amax per
            leading index broadcastable to ``x`` (e.g. ``[E, 1, 1]``: one per expert matrix of
            ``x: [E, out, in]``, each exactly as if quantized alone). A zero global amax uses a
            global scale of 1 (ModelOpt would return NaN).
        block_size: elements sharing one E4M3 scale.

    Raises:
        ValueError: if ``global_amax`` is negative or ``block_size`` is not positive.
    """
    a = _amax_fp32(global_amax, x)
    g = a / _const(E2M1_MAX * E4M3_MAX, x)
    g = torch.where(g > 0, g, _const(1.0, x))
    if g.dim():
        g = g.unsqueeze(-1)  # broadcastable to x -> to its blocks [..., n_blocks, block_size]
    blocks = _to_blocks(x, block_size)
    scale = nvfp4_block_scale(blocks.float().abs().amax(dim=-1, keepdim=True), g)
    t = blocks / scale
    mag = e2m1_magnitude(t.abs())
    q = torch.where((t < 0) & (mag > 0), -mag, mag)
    return _from_blocks(q * scale, x)


def pow2(exponent: torch.Tensor) -> torch.Tensor:
    """Exact fp32 ``2**exponent`` for integer-valued ``exponent`` in [-149, 127]."""
    e = exponent.to(torch.int32)
    normal = (e + 127) << 23
    subnormal = torch.ones_like(e) << (e + 149).clamp(min=0, max=22)
    return torch.where(e >= -126, normal, subnormal).view(torch.float32)


def fake_quant_mxfp4(
    x: torch.Tensor, block_size: int = 32, ties_to_even: bool = True
) -> torch.Tensor:
    """MXFP4 fake quantization: E2M1 values sharing a power-of-two (E8M0) scale per block.

    Args:
        x: input tensor; the last dim is zero-padded to a multiple of ``block_size``.
        block_size: elements sharing one scale.
        ties_to_even: round E2M1 ties to even (ModelOpt's fake-quant kernel, the default);
            False rounds them toward zero (ModelOpt's ``MXFP4QTensor``).

    Raises:
        ValueError: if ``block_size`` is not positive or ``x`` is 0-dim.
    """
    blocks = _to_blocks(x, block_size)
    descale = blocks.float().abs().amax(dim=-1, keepdim=True) / _const(E2M1_MAX, x)
    exponent = torch.ceil(torch.maximum(torch.log2(descale), _const(-127.0, x)))
    scale = pow2(exponent)
    t = blocks / scale
    mag = e2m1_magnitude(t.abs(), ties_to_even=ties_to_even)
    return _from_blocks(torch.where(t > 0, mag, -mag) * scale, x)


class _StraightThrough(torch.autograd.Function):
    """Forward: ``fn(x, *args)`` exactly. Backward: gradient where ``|x| <= clip_amax``."""

    @staticmethod
    def forward(ctx, x, clip_amax, fn, args):  # type: ignore[override]
        if clip_amax is not None:
            ctx.save_for_backward(x, clip_amax)
        return fn(x, *args)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        if not ctx.saved_tensors:
            return grad_out, None, None, None
        x, clip_amax = ctx.saved_tensors
        keep = x.abs() <= clip_amax
        return torch.where(keep, grad_out, grad_out.new_zeros(())), None, None, None


def apply_ste(
    fn: Callable[..., torch.Tensor],
    x: torch.Tensor,
    *args: Any,
    clip_amax: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run ``fn(x, *args)`` with a straight-through gradient.

    Args:
        fn: one of the fake-quant functions above (or any ``x -> tensor`` function).
        x: input tensor.
        *args: extra positional arguments for ``fn``.
        clip_amax: if given, the gradient is zeroed where ``|x| > clip_amax`` (ModelOpt's
            ``pass_through_bwd=False``); if None it passes through unchanged.
    """
    if clip_amax is not None:
        clip_amax = torch.as_tensor(clip_amax, device=x.device).detach()
    return _StraightThrough.apply(x, clip_amax, fn, args)
