"""Quantized layers: a wrapper by composition holding named quantizers.

:class:`QuantModule` is the generic wrapper (the raw layer plus ``TensorQuantizer`` children,
each weight with its own ``Q(W)`` cache); :class:`QuantDense` is the one-weight, one-input kind
with ``weight_quantizer`` and ``input_quantizer`` (grouped MoE experts have one weight quantizer
per projection instead, see :mod:`qpeft.quant.experts`). For ``nn.Linear`` (``W: [out, in]``, ``x:
[..., in]``)::

    y = F.linear(Qin(x), Qw(W), b)                    : [..., out]

The wrapped layer stays ``layer.base`` and its ``state_dict`` keys are unchanged (the quantizers
add ``weight_quantizer._amax`` / ``input_quantizer._amax`` when they have one). ``.weight``,
``.bias``, ``in_features``... fall through to the base. A frozen weight's ``Qw(W)`` is cached
(:mod:`qpeft.quant.cache`); a trainable one is quantized every forward with an STE gradient.

transformers' ``Conv1D`` stores ``W: [in, out]`` and computes ``x @ W + b``. ModelOpt converts it
to a linear layer with the weight transposed once to ``[out, in]``, so per-row amax and blocks run
along the input dimension. qpeft keeps the stored ``[in, out]`` layout (checkpoints unchanged)
and gives the layer a :class:`TransposedTensorQuantizer`, which quantizes ``W.T`` and transposes
back: the same values and the same ``_amax`` shapes as ModelOpt.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.wrapping import ModuleWrapper, innermost
from .cache import WeightCache
from .quantizer import TensorQuantizer

__all__ = [
    "QuantModule",
    "QuantDense",
    "QuantLinear",
    "QuantConv1D",
    "TransposedTensorQuantizer",
    "find_weight_quantizer",
]


def find_weight_quantizer(
    module: nn.Module, name: str = "weight_quantizer", *, enabled: bool = True
) -> nn.Module | None:
    """The quantizer ``name`` that fake-quantizes ``module``'s weight, looking through wrappers.

    Args:
        module: a layer: quantized (``qpeft.quantize``), a LoRA layer over one, or a raw layer
            that holds a quantizer attribute of its own.
        name: ``weight_quantizer``, or ``<projection>_weight_quantizer`` for grouped experts.
        enabled: return only an enabled quantizer (one without ``is_enabled`` counts as enabled).

    Returns:
        The quantizer module, or None.
    """
    quantizer = getattr(module, name, None)
    if not isinstance(quantizer, nn.Module):
        return None
    return quantizer if not enabled or getattr(quantizer, "is_enabled", True) else None


class TransposedTensorQuantizer(TensorQuantizer):
    """A quantizer for weights stored ``[in, out]``: it quantizes (and calibrates) ``x.T``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``Q(x.T).T``; returns ``x`` itself when disabled."""
        if not self.is_enabled:
            return x
        out = super().forward(x.transpose(-2, -1).contiguous())
        return out.transpose(-2, -1)


class QuantModule(ModuleWrapper):
    """Base class of quantized layers: the raw layer as ``base`` plus named ``TensorQuantizer``
    children.

    A subclass says which quantizers a raw layer gets (:meth:`quantizer_classes`) and which weight
    each weight quantizer reads (:meth:`weights`); the others are input quantizers. Every weight
    has its own cache of ``Q(W)`` (:meth:`quantized`).
    """

    @classmethod
    def quantizer_classes(cls, raw: nn.Module) -> dict[str, type[TensorQuantizer]]:
        """``{quantizer name: TensorQuantizer class}`` of the wrapper around ``raw``
        (subclasses)."""
        raise NotImplementedError

    def __init__(self, base: nn.Module, **quantizers: TensorQuantizer | None) -> None:
        """Wrap ``base`` with the given quantizers; missing ones are disabled ones.

        Raises:
            TypeError: ``base`` is already quantized, or a quantizer name the layer does not have.
        """
        if isinstance(base, QuantModule):
            raise TypeError("cannot wrap a quantized layer in another QuantModule")
        classes = self.quantizer_classes(base)
        unknown = sorted(set(quantizers) - set(classes))
        if unknown:
            raise TypeError(
                f"{type(self).__name__}: unknown quantizer(s) {unknown}; known: {list(classes)}"
            )
        super().__init__(base)
        for name, cls in classes.items():
            given = quantizers.get(name)
            self.add_module(name, cls(enabled=False) if given is None else given)
        self._weight_caches = {name: WeightCache() for name in self.weights()}

    def weights(self) -> dict[str, torch.Tensor]:
        """``{weight quantizer name: the weight it quantizes}`` (subclasses)."""
        raise NotImplementedError

    def quantizers(self) -> dict[str, TensorQuantizer]:
        """Every quantizer of the layer by name, weight quantizers first."""
        return {name: getattr(self, name) for name in self.quantizer_classes(innermost(self))}

    def input_quantizers(self) -> dict[str, TensorQuantizer]:
        """The quantizers that are not weight quantizers, by name."""
        weights = self.weights()
        return {name: q for name, q in self.quantizers().items() if name not in weights}

    def quantized(self, name: str) -> torch.Tensor:
        """``Q(W)`` of weight quantizer ``name`` in the weight's storage layout (cached while
        frozen)."""
        return self._weight_caches[name].get(self.weights()[name], getattr(self, name))

    def clear_weight_caches(self) -> None:
        """Forget every cached ``Q(W)`` (the next forward quantizes afresh)."""
        for cache in self._weight_caches.values():
            cache.clear()

    def __getstate__(self) -> dict[str, Any]:
        # A deepcopy/pickle must not carry a cached tensor tied to the old weight.
        state = super().__getstate__()
        state["_weight_caches"] = {name: WeightCache() for name in state["_weight_caches"]}
        return state


class QuantDense(QuantModule):
    """A layer with one ``weight`` and one input: ``weight_quantizer`` and ``input_quantizer``.

    Subclasses compute the layer from ``(Qin(x), Qw(W))`` (:meth:`compute`).
    """

    weight_quantizer_class: type[TensorQuantizer] = TensorQuantizer

    @classmethod
    def quantizer_classes(cls, raw: nn.Module) -> dict[str, type[TensorQuantizer]]:
        """``weight_quantizer`` (:attr:`weight_quantizer_class`) and ``input_quantizer``."""
        return {"weight_quantizer": cls.weight_quantizer_class, "input_quantizer": TensorQuantizer}

    def __init__(
        self,
        base: nn.Module,
        weight_quantizer: TensorQuantizer | None = None,
        input_quantizer: TensorQuantizer | None = None,
    ) -> None:
        """Wrap ``base``; missing quantizers are disabled ones."""
        super().__init__(base, weight_quantizer=weight_quantizer, input_quantizer=input_quantizer)

    def weights(self) -> dict[str, torch.Tensor]:
        """``{"weight_quantizer": base.weight}``."""
        return {"weight_quantizer": innermost(self).weight}

    def quantized_weight(self) -> torch.Tensor:
        """``Qw(W)`` in the base's storage layout (cached while the weight is frozen)."""
        return self.quantized("weight_quantizer")

    def compute(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The base layer's math with ``weight`` in place of its own (subclasses)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.compute(self.input_quantizer(x), self.quantized_weight())


class QuantLinear(QuantDense):
    """Quantized ``nn.Linear``: ``F.linear(Qin(x), Qw(W), b)``."""

    def compute(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(x, weight, innermost(self).bias)


class QuantConv1D(QuantDense):
    """Quantized transformers ``Conv1D`` (``W: [in, out]``): ``addmm(b, Qin(x), Qw(W))``."""

    weight_quantizer_class = TransposedTensorQuantizer

    def compute(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # The exact ops of Conv1D.forward, so disabled quantizers give bit-identical outputs.
        size_out = x.size()[:-1] + (weight.shape[-1],)
        out = torch.addmm(innermost(self).bias, x.view(-1, x.size(-1)), weight)
        return out.view(size_out)
