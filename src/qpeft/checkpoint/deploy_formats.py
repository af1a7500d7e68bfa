"""compressed-tensors layouts of qpeft's packed weights (used by :mod:`qpeft.checkpoint.deploy`).

The codes and scales are qpeft's own (:mod:`qpeft.quant.packing`); only their names, dtypes,
shapes and conventions change to what compressed-tensors 0.20 reads, which dequantizes as
``y = q * scale`` (``scale / global_scale`` for nvfp4):

* ``int-quantized`` (8 bits): ``weight`` int8 codes, ``weight_scale`` fp32 ``1 / s`` (qpeft
  divides by ``s = 127 / amax``);
* ``pack-quantized`` (2..7 bits): ``weight_packed`` int32 (compressed-tensors' dense packing),
  ``weight_shape``, ``weight_scale`` as int;
* ``float-quantized`` (fp8): ``weight`` float8_e4m3fn codes, ``weight_scale`` fp32
  ``reciprocal(s)``, the very factor qpeft multiplies by;
* ``nvfp4-pack-quantized``: ``weight_packed`` (the same nibbles), ``weight_scale`` the e4m3 block
  scales, ``weight_global_scale`` fp32 ``1 / g`` (ModelOpt's ``weight_scale_2 = g = amax / 2688``
  is the reciprocal of compressed-tensors' global scale);
* ``mxfp4-pack-quantized``: ``weight_packed``, ``weight_scale`` uint8 E8M0 exponents.

qpeft's integer code ``-(M + 1)`` that stands for ``-0.0`` is written as ``0`` (a reader would
read ``-(M + 1) * scale``). Input quantizers become ``input_activations`` (static ones with their
``input_scale`` / ``input_global_scale``).
"""

from __future__ import annotations

from typing import Any

import torch

from ..quant.packed_layout import unpack_nibbles
from ..quant.packing import PackSpec

__all__ = ["CT_FORMATS", "weight_args", "input_args", "ct_weight_tensors"]

CT_FORMATS = (
    "int-quantized",
    "pack-quantized",
    "float-quantized",
    "nvfp4-pack-quantized",
    "mxfp4-pack-quantized",
)


def _args(num_bits: int, kind: str, strategy: str, **extra: Any) -> dict[str, Any]:
    out = {
        "num_bits": num_bits,
        "type": kind,
        "symmetric": True,
        "group_size": None,
        "strategy": strategy,
        "block_structure": None,
        "dynamic": False,
        "actorder": None,
        "observer": None,
        "observer_kwargs": {},
    }
    out.update(extra)
    return out


def _strategy(spec: PackSpec) -> tuple[str, dict[str, Any]] | str:
    """``(strategy, extra args)`` of an int/fp8 spec's scale groups, or why there is none."""
    if spec.block_sizes is None:
        if spec.axis is None:
            return "tensor", {}
        if spec.axis in (0, -2, (0,), (-2,)):
            return "channel", {}
        return f"a per-axis scale along axis {spec.axis} (only per tensor or per output row)"
    sizes = spec.sizes
    if list(sizes) == [-1] and sizes[-1] is not None:
        if spec.shape[-1] % sizes[-1]:
            return f"{spec.shape[-1]} input features in blocks of {sizes[-1]} (not a multiple)"
        return "group", {"group_size": sizes[-1]}
    if sorted(sizes) == [-2, -1] and None not in sizes.values():
        return "block", {"block_structure": [sizes[-2], sizes[-1]]}
    return f"blocks {sizes} (only blocks along the input axis, or 2-D blocks)"


def weight_args(spec: PackSpec) -> tuple[str, dict[str, Any]] | str:
    """``(format, weights args)`` for a packed weight, or a sentence saying why it has none."""
    if spec.fmt in ("nvfp4", "mxfp4"):
        block, wanted = spec.sizes[-1], 16 if spec.fmt == "nvfp4" else 32
        if block != wanted:
            return f"{spec.fmt} blocks of {block} (compressed-tensors {spec.fmt} uses {wanted})"
        if spec.shape[-1] % block:
            return f"{spec.shape[-1]} input features, not a multiple of the {block}-block"
        if spec.fmt == "nvfp4":
            args = _args(
                4, "float", "tensor_group", group_size=16, scale_dtype="torch.float8_e4m3fn"
            )
            return "nvfp4-pack-quantized", args
        args = _args(4, "float", "group", group_size=32, scale_dtype="torch.uint8")
        return "mxfp4-pack-quantized", args
    found = _strategy(spec)
    if isinstance(found, str):
        return found
    strategy, extra = found
    if spec.fmt == "fp8":
        return "float-quantized", _args(8, "float", strategy, **extra)
    fmt = "int-quantized" if spec.num_bits == 8 else "pack-quantized"
    return fmt, _args(spec.num_bits, "int", strategy, **extra)


def input_args(quantizer: Any) -> tuple[dict[str, Any] | None, dict[str, torch.Tensor]] | str:
    """``(input_activations args or None, input tensors)`` of an input quantizer, or why not."""
    if quantizer is None or not quantizer.is_enabled:
        return None, {}
    q, amax = quantizer, quantizer.amax
    if q.fmt == "mxfp4":
        if q.block_size != 32:
            return f"mxfp4 input blocks of {q.block_size} (compressed-tensors uses 32)"
        return _args(4, "float", "group", group_size=32, dynamic=True), {}
    if q.fmt == "nvfp4":
        if q.block_size != 16 or amax is None or amax.numel() != 1:
            return "an nvfp4 input quantizer needs blocks of 16 and one calibrated amax"
        gs = (6.0 * 448.0) / amax.detach().float().reshape(1).cpu()
        args = _args(4, "float", "tensor_group", group_size=16, dynamic="local")
        return args, {"input_global_scale": gs}
    if q.fmt not in ("fp8", "int") or (q.fmt == "int" and (q.num_bits != 8 or q.unsigned)):
        return f"input quantizer {q.fmt} {q.num_bits} bits (only fp8, int8, nvfp4, mxfp4)"
    kind = "float" if q.fmt == "fp8" else "int"
    if q.dynamic and q.block_sizes == {-1: None}:
        return _args(8, kind, "token", dynamic=True), {}
    if not q.dynamic and q.axis is None and q.block_sizes is None and amax is not None:
        bound = 448.0 if q.fmt == "fp8" else 127.0
        scale = amax.detach().float().reshape(1).cpu() / bound
        return _args(8, kind, "tensor"), {"input_scale": scale}
    return "an input quantizer that is neither static per tensor nor dynamic per token"


def _scale_shape(spec: PackSpec, scale: torch.Tensor) -> torch.Tensor:
    return scale.reshape(1) if scale.dim() == 0 else scale


def _int_codes(tensors: dict[str, torch.Tensor], spec: PackSpec) -> torch.Tensor:
    """int8 codes ``[out, in]``, with ``-(M + 1)`` (qpeft's ``-0.0``) as ``0``."""
    packed = tensors["packed"]
    if spec.nibbles:
        n = unpack_nibbles(packed, spec.shape[-1]).to(torch.int16)
        codes = torch.where(n >= 8, n - 16, n)
    else:
        codes = packed.to(torch.int16)
    if spec.neg_zero:
        codes = torch.where(codes == -(2 ** (spec.num_bits - 1)), 0, codes)
    return codes.to(torch.int8)


def ct_weight_tensors(
    fmt: str, tensors: dict[str, torch.Tensor], spec: PackSpec
) -> dict[str, torch.Tensor]:
    """The ``weight_*`` tensors compressed-tensors' ``fmt`` stores for qpeft's packed ones."""
    t = {k: v.detach().cpu() for k, v in tensors.items()}
    if fmt == "nvfp4-pack-quantized":
        g = t["scale_2"].float().reshape(1)
        return {
            "weight_packed": t["packed"].contiguous(),
            "weight_scale": t["scale"].contiguous(),
            "weight_global_scale": torch.reciprocal(g),
        }
    if fmt == "mxfp4-pack-quantized":
        return {"weight_packed": t["packed"].contiguous(), "weight_scale": t["scale"].contiguous()}
    scale = _scale_shape(spec, torch.reciprocal(t["scale"].float())).contiguous()
    if fmt == "float-quantized":
        return {"weight": t["packed"].contiguous(), "weight_scale": scale}
    codes = _int_codes(t, spec)
    if fmt == "int-quantized":
        return {"weight": codes.contiguous(), "weight_scale": scale}
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    return {
        "weight_packed": pack_to_int32(codes, spec.num_bits).contiguous(),
        "weight_scale": scale,
        "weight_shape": torch.tensor(list(spec.shape)),
    }
