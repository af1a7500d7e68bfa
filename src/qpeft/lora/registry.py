"""The registry of LoRA layers: base layer type (or predicate) -> its LoRA wrapper.

Plugins for optional libraries (transformers' ``Conv1D`` and grouped MoE experts, Megatron-Core,
the fused path over quantized layers) register themselves when their library is imported; see
:class:`qpeft.core.registry.WrapperRegistry`.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ..core.registry import WrapperRegistry
from .layer import LoRALinear, LoRAModule

__all__ = ["register_lora", "register_lora_matcher", "lora_class_for", "REGISTRY"]

REGISTRY = WrapperRegistry(
    LoRAModule,
    {nn.Linear: LoRALinear},
    {
        "transformers": "qpeft.lora.plugins.transformers",
        "transformers.integrations.moe": "qpeft.lora.plugins.moe",
        "megatron.core": "qpeft.lora.plugins.megatron",
        "qpeft.quant.layer": "qpeft.lora.plugins.quant",  # fused LoRA over weight-only QuantLinear
    },
)


def register_lora(base_type: type, wrapper: type[LoRAModule]) -> None:
    """Register ``wrapper`` as the LoRA layer for ``base_type`` and its subclasses.

    Raises:
        TypeError: if ``wrapper`` is not a :class:`LoRAModule` subclass.
    """
    REGISTRY.register(base_type, wrapper)


def register_lora_matcher(
    predicate: Callable[[nn.Module], bool], wrapper: type[LoRAModule]
) -> None:
    """Register ``wrapper`` for every module ``m`` (innermost) with ``predicate(m)`` true.

    Registered types win over matchers; matchers are tried in registration order (e.g.
    transformers' many experts classes, recognised by the attributes their decorator sets).

    Raises:
        TypeError: if ``wrapper`` is not a :class:`LoRAModule` subclass or ``predicate`` not
        callable.
    """
    REGISTRY.register_matcher(predicate, wrapper)


def lora_class_for(module: nn.Module) -> type[LoRAModule] | None:
    """The LoRA wrapper class for ``module`` (looking through qpeft wrappers), or None."""
    return REGISTRY.lookup(module)
