r"""Compressed grouped experts: packed codes and scales in place of the 3-D projection weights.

After :func:`qpeft.compress` a quantized experts layer ``L`` (:class:`CompressedExperts`, same
quantizers) wraps the same raw experts module, from which every packed projection ``p`` lost its
parameter ``p`` (``[E, out, in]`` or transposed) and gained the buffers of
:mod:`qpeft.quant.packing` for ``Q(W_p)`` in the quantizer's ``[E, out, in]`` orientation:
``state_dict`` keys ``L.<p>_packed``, ``L.<p>_scale`` (and ``L.<p>_scale_2`` for nvfp4). Every
expert keeps its own scales (per-expert amax ``[E, ...]``), so ``unpack(codes)[e]`` is
``Q(W_p)[e]`` bit for bit. The raw module records what it holds in ``_qpeft_packed``
(``{p: PackedProjection}``).

The forward is the experts module's own forward run with the dequantized weights, inside an
autograd function (:class:`_Recomputed`) that saves only the forward's inputs: the backward
dequantizes again and re-runs the same operations to get the input gradients, so no dense
expert weight lives between forward and backward, and the gradients are those of the
fake-quantized module's graph. A LoRA experts layer over it does the same per projection
product (:meth:`CompressedExperts.packed_apply`). ``L.<p>`` still reads: the dequantized
weight (no grad) in the stored layout.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..core.wrapping import ModuleWrapper, innermost
from .dequant import dequantize
from .packing import PackSpec, packed_layout

__all__ = [
    "PackedProjection",
    "CompressedExperts",
    "packed_projections",
    "packed_buffer_names",
    "projection_shape",
    "install_packed",
    "dequantize_projection",
    "packed_apply",
    "register_compressed_experts",
    "compressed_experts_class",
]

_ATTR = "_qpeft_packed"
_KINDS: dict[type, type] = {}


@dataclass(frozen=True)
class PackedProjection:
    """What one packed projection holds: its spec (``[E, out, in]``), compute dtype, layout."""

    spec: PackSpec
    dtype: torch.dtype
    transposed: bool  # stored [E, in, out]

    @property
    def shape(self) -> tuple[int, ...]:
        """The stored weight's shape."""
        e, out_f, in_f = self.spec.shape
        return (e, in_f, out_f) if self.transposed else (e, out_f, in_f)


def packed_projections(raw: nn.Module) -> dict[str, PackedProjection]:
    """``{projection: PackedProjection}`` of a raw experts module (empty when not compressed)."""
    return raw.__dict__.get(_ATTR, {})


def projection_shape(raw: nn.Module, name: str) -> tuple[int, ...]:
    """The stored shape of projection ``name``, packed or not (no dequantizing)."""
    packed = packed_projections(raw).get(name)
    return packed.shape if packed is not None else tuple(getattr(raw, name).shape)


def packed_buffer_names(raw: nn.Module) -> list[str]:
    """Names of the packed buffers of a raw experts module (empty when not compressed)."""
    return [
        f"{name}_{key}"
        for name, packed in packed_projections(raw).items()
        for key in packed_layout(packed.spec)
    ]


def projection_tensors(raw: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """``{packed, scale[, scale_2]}`` of projection ``name``, as :func:`unpack` takes them."""
    spec = packed_projections(raw)[name].spec
    return {key: getattr(raw, f"{name}_{key}") for key in packed_layout(spec)}


def install_packed(
    raw: nn.Module, name: str, spec: PackSpec, tensors: dict[str, torch.Tensor], dtype, transposed
) -> None:
    """Drop parameter ``name`` of ``raw`` (if any) and register its packed buffers instead."""
    if name in raw._parameters:
        delattr(raw, name)
    for key in packed_layout(spec):
        raw.register_buffer(f"{name}_{key}", tensors[key])
    found = dict(packed_projections(raw))
    found[name] = PackedProjection(spec, dtype, bool(transposed))
    raw.__dict__[_ATTR] = found


def dequantize_projection(raw: nn.Module, name: str) -> torch.Tensor:
    """``Q(W_name)`` in the compute dtype and stored layout, contiguous, bit for bit."""
    packed = packed_projections(raw)[name]
    w = dequantize(projection_tensors(raw, name), packed.spec, packed.dtype)
    return w.transpose(-2, -1).contiguous() if packed.transposed else w


class _Recomputed(torch.autograd.Function):
    """``run(*inputs)``, saving only ``inputs``; backward re-runs ``run`` (which dequantizes the
    weights afresh) under autograd and returns its input gradients."""

    @staticmethod
    def forward(ctx, run, *inputs):  # noqa: ANN001, ANN205 - autograd signature
        ctx.run = run
        ctx.save_for_backward(*inputs)
        return run(*inputs)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205 - autograd signature
        needs = ctx.needs_input_grad[1:]
        inputs = [
            t.detach().requires_grad_(need) if need else t
            for t, need in zip(ctx.saved_tensors, needs, strict=True)
        ]
        wanted = [t for t, need in zip(inputs, needs, strict=True) if need]
        with torch.enable_grad():
            out = ctx.run(*inputs)
        grads = iter(torch.autograd.grad(out, wanted, grad, allow_unused=True))
        return None, *[next(grads) if need else None for need in needs]


def packed_apply(run: Callable[..., torch.Tensor], *inputs: torch.Tensor | None) -> torch.Tensor:
    """``run(*inputs)`` where ``run`` dequantizes packed weights itself: with autograd, through
    :class:`_Recomputed`, so nothing ``run`` makes (a dense weight) is saved for backward."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs):
        return _Recomputed.apply(run, *inputs)
    return run(*inputs)


class CompressedExperts:
    """Mixed into a :class:`~qpeft.quant.experts.QuantExperts` subclass: its compressed kind."""

    def _init_compressed(self, base: nn.Module, quantizers: dict[str, nn.Module]) -> None:
        ModuleWrapper.__init__(self, base)
        for name, quantizer in quantizers.items():
            self.add_module(name, quantizer)
        self._weight_caches = {}

    def _packed(self) -> dict[str, PackedProjection]:
        return packed_projections(innermost(self))

    def quantized(self, name: str) -> torch.Tensor:
        """``Q(W_p)`` of ``<p>_weight_quantizer``: dequantized afresh (never cached); a projection
        left dense (quantizer disabled) is returned as it is."""
        projection = name.removesuffix("_weight_quantizer")
        if projection in self._packed():
            return dequantize_projection(innermost(self), projection)
        return getattr(innermost(self), projection)

    def weights(self) -> dict[str, torch.Tensor]:
        """``{"<p>_weight_quantizer": Q(W_p)}``: the master weights are gone."""
        return {f"{p}_weight_quantizer": self.quantized(p) for p in self.projections(self.base)}

    def input_quantizers(self) -> dict[str, nn.Module]:
        """None: experts have no input quantizers."""
        return {}

    def packed_apply(
        self, projection: str, run: Callable[..., torch.Tensor], *inputs: torch.Tensor | None
    ) -> torch.Tensor:
        """``run(Q(W_p), *inputs)`` without saving the dense ``Q(W_p)`` for backward."""
        if projection not in self._packed():
            return run(self.quantized(projection), *inputs)
        raw = innermost(self)
        return packed_apply(lambda *xs: run(dequantize_projection(raw, projection), *xs), *inputs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The experts module's own forward with every packed ``W_p`` dequantized, recomputed in
        backward (:func:`packed_apply`)."""
        raw, packed = innermost(self), list(self._packed())
        trained = {n: p for n, p in raw.named_parameters(recurse=False) if p.requires_grad}
        keys = [k for k, v in kwargs.items() if isinstance(v, torch.Tensor)]
        plain = {k: v for k, v in kwargs.items() if k not in keys}
        count = len(args)

        def run(*xs: torch.Tensor) -> Any:
            weights = {p: dequantize_projection(raw, p) for p in packed}
            weights.update(zip(trained, xs[count + len(keys) :], strict=True))
            named = dict(zip(keys, xs[count : count + len(keys)], strict=True))
            return torch.func.functional_call(raw, weights, xs[:count], {**plain, **named})

        return packed_apply(run, *args, *(kwargs[k] for k in keys), *trained.values())

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in packed_projections(innermost(self)):
                with torch.no_grad():
                    return dequantize_projection(innermost(self), name)
            raise


def register_compressed_experts(quant_cls: type, compressed_cls: type) -> None:
    """Register ``compressed_cls`` as what :func:`qpeft.compress` turns ``quant_cls`` into."""
    _KINDS[quant_cls] = compressed_cls


def compressed_experts_class(layer: nn.Module) -> type | None:
    """The compressed class of a quantized experts layer's type, or None (no packed forward)."""
    return _KINDS.get(type(layer))
