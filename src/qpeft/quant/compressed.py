"""Compressed quantized layers: packed codes and scales in place of the master weight.

After :func:`qpeft.compress` a quantized layer ``L`` (a :class:`CompressedLinear` or
:class:`CompressedConv1D`, same quantizers) wraps a :class:`PackedLinear` / :class:`PackedConv1D`
instead of its raw layer. That module holds the raw layer's ``bias`` and the buffers of
:mod:`qpeft.quant.packing` (``state_dict`` keys ``L.weight_packed``, ``L.weight_scale`` and, for
nvfp4, ``L.weight_scale_2``); nothing dense. Every forward dequantizes ``Q(W)`` into the compute
dtype (band by band, :mod:`qpeft.quant.dequant`: the fp32 temporaries stay a few MiB whatever the
layer's size), uses it and drops it; the backward dequantizes again for ``dx`` (the weight gets no
gradient), so no dense weight is saved for backward (:class:`_DequantMatmul`, as QLoRA does).
``L.weight`` still reads: it returns the dequantized weight (no grad) in the stored layout.

The weight quantizer stays (its attributes describe the format) without its amax: the packed
scales replace it, and the layer no longer reads the quantizer (toggling it has no effect).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.wrapping import ModuleWrapper, innermost
from .compressed_experts import packed_projections
from .dequant import dequantize
from .layer import QuantConv1D, QuantLinear
from .packing import PackSpec, packed_layout

__all__ = [
    "PackedDense",
    "PackedLinear",
    "PackedConv1D",
    "CompressedLinear",
    "CompressedConv1D",
    "is_compressed",
    "compressed_error",
]


class PackedDense(nn.Module):
    """The raw layer of a compressed quantized layer: packed weight buffers plus ``bias``."""

    transposed = False  # stored layout is [in, out] (Conv1D): the packed spec is [out, in]

    def __init__(
        self,
        spec: PackSpec,
        tensors: dict[str, torch.Tensor],
        bias: nn.Parameter | None,
        dtype: torch.dtype,
    ) -> None:
        super().__init__()
        self.spec, self.compute_dtype = spec, dtype
        for name in packed_layout(spec):
            self.register_buffer(f"weight_{name}", tensors[name])
        self.register_parameter("bias", bias)
        self.out_features, self.in_features = spec.shape

    def packed_tensors(self) -> dict[str, torch.Tensor]:
        """``{packed, scale[, scale_2]}`` as :func:`qpeft.quant.packing.unpack` takes them."""
        return {name: getattr(self, f"weight_{name}") for name in packed_layout(self.spec)}

    def dequantize(self) -> torch.Tensor:
        """``Q(W)`` in the compute dtype and the stored layout, bit for bit."""
        w = dequantize(self.packed_tensors(), self.spec, self.compute_dtype)
        return w.transpose(-2, -1) if self.transposed else w

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight (a fresh tensor, no grad), for code that inspects weights."""
        return self.dequantize()

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """The stored weight's shape, without dequantizing."""
        out_f, in_f = self.spec.shape
        return (in_f, out_f) if self.transposed else (out_f, in_f)

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (that of the weight before compress)."""
        return self.compute_dtype

    @property
    def device(self) -> torch.device:
        """Where the packed tensors live."""
        return self.weight_packed.device

    def compute(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The raw layer's math with ``weight`` (subclasses)."""
        raise NotImplementedError

    def input_grad(self, grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``dx`` for the flattened output gradient ``grad: [N, out]`` (subclasses)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dequant_apply(self, x)

    def extra_repr(self) -> str:
        spec = self.spec
        fmt = f"int{spec.num_bits}" if spec.fmt == "int" else spec.fmt
        return f"{fmt}, shape={self.weight_shape}, dtype={self.compute_dtype}"


class PackedLinear(PackedDense):
    """Packed stand-in of ``nn.Linear``: ``F.linear(x, Q(W), b)``."""

    def compute(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(x, weight, self.bias)

    def input_grad(self, grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return grad.mm(weight)


class PackedConv1D(PackedDense):
    """Packed stand-in of transformers' ``Conv1D`` (``W: [in, out]``): ``addmm(b, x, Q(W))``."""

    transposed = True

    @property
    def nf(self) -> int:
        """Output features, as ``Conv1D`` calls them."""
        return self.out_features

    def compute(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        size_out = x.size()[:-1] + (weight.shape[-1],)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), weight).view(size_out)

    def input_grad(self, grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return grad.mm(weight.t())


class _DequantMatmul(torch.autograd.Function):
    """``packed.compute(x, dequant())``; backward ``dx`` from a fresh dequant (nothing saved)."""

    @staticmethod
    def forward(ctx, x, bias, packed):  # noqa: ANN001, ANN205 - autograd signature
        ctx.packed, ctx.x_shape = packed, x.shape
        return packed.compute(x, packed.dequantize())

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205 - autograd signature
        need_x, need_bias, _ = ctx.needs_input_grad
        g = grad.reshape(-1, grad.shape[-1])
        dx = None
        if need_x:
            dx = ctx.packed.input_grad(g, ctx.packed.dequantize()).view(ctx.x_shape)
        return dx, (g.sum(0) if need_bias else None), None


def dequant_apply(packed: PackedDense, x: torch.Tensor) -> torch.Tensor:
    """The raw layer's output on ``x`` with the weight dequantized on the fly."""
    bias = packed.bias
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        return _DequantMatmul.apply(x, bias, packed)
    return packed.compute(x, packed.dequantize())


class _Compressed:
    """What the compressed wrappers share: no weight cache, the packed raw layer's math."""

    def _init_compressed(self, base: PackedDense, quantizers: dict[str, nn.Module]) -> None:
        ModuleWrapper.__init__(self, base)
        for name, quantizer in quantizers.items():
            self.add_module(name, quantizer)
        self._weight_caches = {}

    def weights(self) -> dict[str, torch.Tensor]:
        return {"weight_quantizer": innermost(self).dequantize()}

    def input_quantizers(self) -> dict[str, nn.Module]:
        return {"input_quantizer": self.input_quantizer}

    def quantized(self, name: str) -> torch.Tensor:
        return innermost(self).dequantize()

    def quantized_weight(self) -> torch.Tensor:
        """``Q(W)`` dequantized afresh (never cached)."""
        return innermost(self).dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dequant_apply(innermost(self), self.input_quantizer(x))


class CompressedLinear(_Compressed, QuantLinear):
    """A compressed :class:`QuantLinear`: ``F.linear(Qin(x), unpack(codes), b)``."""

    def __init__(self, base: PackedLinear, **quantizers: Any) -> None:
        self._init_compressed(base, quantizers)


class CompressedConv1D(_Compressed, QuantConv1D):
    """A compressed :class:`QuantConv1D`."""

    def __init__(self, base: PackedConv1D, **quantizers: Any) -> None:
        self._init_compressed(base, quantizers)


def is_compressed(module: nn.Module) -> bool:
    """Whether ``module`` (a layer, looking through wrappers) is compressed (grouped experts:
    with at least one packed projection)."""
    inner = innermost(module)
    return isinstance(inner, PackedDense) or bool(packed_projections(inner))


def compressed_error(what: str, layer_name: str, hint: str | None = None) -> ValueError:
    """The refusal of an operation that needs the master weight a compressed layer dropped."""
    hint = hint or f"run {what} before qpeft.compress"
    return ValueError(
        f"{what}: layer {layer_name!r} is compressed (qpeft.compress dropped its master weight, "
        f"only packed codes and scales remain); {hint}"
    )
