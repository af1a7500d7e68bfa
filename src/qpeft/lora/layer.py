"""LoRA layers: a wrapper by composition around a base layer plus a ``ModuleDict`` of adapters.

``forward(x) = base(x) + sum over active (enabled, not merged) adapters (insertion order) of scale * B(A(x))``; each
adapter runs in its own dtype and its result is cast to the base output's dtype. The base stays the
same object (``layer.base``), its ``state_dict`` keys unchanged (see :mod:`qpeft.wrapping`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..wrapping import ModuleWrapper, innermost
from .adapter import LoRAAdapter

__all__ = ["LoRAModule", "LoRALinear"]


class LoRAModule(ModuleWrapper):
    """Base class of every LoRA layer. Subclasses say how to read the base's shape and weight."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__(base)
        self.adapters = nn.ModuleDict()

    # -- what a subclass provides -------------------------------------------------------------
    @staticmethod
    def features(base: nn.Module) -> tuple[int, int]:
        """``(in_features, out_features)`` of the (innermost) base layer."""
        raise NotImplementedError

    @staticmethod
    def to_out_in(weight: torch.Tensor) -> torch.Tensor:
        """View of a base weight in ``[out, in]`` layout (identity for ``nn.Linear``)."""
        return weight

    # -- common behaviour ---------------------------------------------------------------------
    @property
    def adapter_names(self) -> list[str]:
        """Names of this layer's adapters, in insertion order."""
        return list(self.adapters.keys())

    @property
    def base_weight(self) -> nn.Parameter:
        """The original (master) weight of the innermost base layer."""
        return innermost(self).weight

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        y = self.base(x, *args, **kwargs)
        cast: dict[torch.dtype, torch.Tensor] = {}
        for adapter in self.adapters.values():
            if adapter.active:
                dtype = adapter.lora_a.dtype
                if dtype not in cast:
                    cast[dtype] = x if x.dtype == dtype else x.to(dtype)
                y = y + adapter(cast[dtype]).to(y.dtype)
        return y

    def new_adapter(self, config: Any, dtype: torch.dtype | None) -> LoRAAdapter:
        """A zero-filled adapter sized for this layer, on the base weight's device."""
        in_f, out_f = self.features(innermost(self))
        weight = self.base_weight
        return LoRAAdapter(in_f, out_f, config, dtype or weight.dtype, weight.device)


class LoRALinear(LoRAModule):
    """LoRA around ``nn.Linear`` (``weight: [out, in]``)."""

    @staticmethod
    def features(base: nn.Module) -> tuple[int, int]:
        return base.in_features, base.out_features


class LoRAConv1D(LoRAModule):
    """LoRA around transformers' ``Conv1D`` (GPT-2), whose ``weight`` is stored ``[in, out]``."""

    @staticmethod
    def features(base: nn.Module) -> tuple[int, int]:
        return base.weight.shape[0], base.weight.shape[1]

    @staticmethod
    def to_out_in(weight: torch.Tensor) -> torch.Tensor:
        return weight.t()
