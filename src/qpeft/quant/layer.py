"""Quantized layers: a wrapper by composition holding ``weight_quantizer`` and ``input_quantizer``.

For ``nn.Linear`` (``W: [out, in]``, ``x: [..., in]``)::

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

from ..wrapping import ModuleWrapper, innermost
from .cache import WeightCache
from .quantizer import TensorQuantizer

__all__ = ["QuantModule", "QuantLinear", "QuantConv1D", "TransposedTensorQuantizer"]


class TransposedTensorQuantizer(TensorQuantizer):
    """A quantizer for weights stored ``[in, out]``: it quantizes (and calibrates) ``x.T``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``Q(x.T).T``; returns ``x`` itself when disabled."""
        if not self.is_enabled:
            return x
        out = super().forward(x.transpose(-2, -1).contiguous())
        return out.transpose(-2, -1)


class QuantModule(ModuleWrapper):
    """Base class of quantized layers. Subclasses compute the layer from ``(x, Qw(W))``."""

    weight_quantizer_class: type[TensorQuantizer] = TensorQuantizer

    def __init__(
        self,
        base: nn.Module,
        weight_quantizer: TensorQuantizer | None = None,
        input_quantizer: TensorQuantizer | None = None,
    ) -> None:
        """Wrap ``base``; missing quantizers are disabled ones."""
        if isinstance(base, QuantModule):
            raise TypeError("cannot wrap a quantized layer in another QuantModule")
        super().__init__(base)
        self.weight_quantizer = weight_quantizer or self.weight_quantizer_class(enabled=False)
        self.input_quantizer = input_quantizer or TensorQuantizer(enabled=False)
        self._weight_cache = WeightCache()

    def quantized_weight(self) -> torch.Tensor:
        """``Qw(W)`` in the base's storage layout (cached while the weight is frozen)."""
        return self._weight_cache.get(innermost(self).weight, self.weight_quantizer)

    def compute(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The base layer's math with ``weight`` in place of its own (subclasses)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.compute(self.input_quantizer(x), self.quantized_weight())

    def __getstate__(self) -> dict[str, Any]:
        # A deepcopy/pickle must not carry a cached tensor tied to the old weight.
        state = super().__getstate__()
        state["_weight_cache"] = WeightCache()
        return state


class QuantLinear(QuantModule):
    """Quantized ``nn.Linear``: ``F.linear(Qin(x), Qw(W), b)``."""

    def compute(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(x, weight, innermost(self).bias)


class QuantConv1D(QuantModule):
    """Quantized transformers ``Conv1D`` (``W: [in, out]``): ``addmm(b, Qin(x), Qw(W))``."""

    weight_quantizer_class = TransposedTensorQuantizer

    def compute(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # The exact ops of Conv1D.forward, so disabled quantizers give bit-identical outputs.
        size_out = x.size()[:-1] + (weight.shape[-1],)
        out = torch.addmm(innermost(self).bias, x.view(-1, x.size(-1)), weight)
        return out.view(size_out)
