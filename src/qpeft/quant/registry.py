"""The registry of quantized layers: base layer type -> its quantized wrapper.

The transformers plugins (``Conv1D``; the grouped MoE experts of transformers 5.x) register
themselves when transformers is imported, the Megatron-Core one (Column/RowParallelLinear,
``GroupedMLP``) when ``megatron.core`` is; see :class:`qpeft.core.registry.WrapperRegistry`.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ..core.registry import WrapperRegistry
from .layer import QuantLinear, QuantModule

__all__ = ["register_quant", "register_quant_matcher", "quant_class_for", "REGISTRY"]

REGISTRY = WrapperRegistry(
    QuantModule,
    {nn.Linear: QuantLinear},
    {
        "transformers": "qpeft.quant.plugins.transformers",
        "transformers.integrations.moe": "qpeft.quant.plugins.moe",
        "megatron.core": "qpeft.quant.plugins.megatron",
    },
)


def register_quant(base_type: type, wrapper: type[QuantModule]) -> None:
    """Register ``wrapper`` as the quantized layer for ``base_type`` and its subclasses.

    Raises:
        TypeError: if ``wrapper`` is not a :class:`QuantModule` subclass.
    """
    REGISTRY.register(base_type, wrapper)


def register_quant_matcher(
    predicate: Callable[[nn.Module], bool], wrapper: type[QuantModule]
) -> None:
    """Register ``wrapper`` for every raw module ``m`` with ``predicate(m)`` true (after the types).

    Raises:
        TypeError: if ``wrapper`` is not a :class:`QuantModule` subclass or ``predicate`` not
        callable.
    """
    REGISTRY.register_matcher(predicate, wrapper)


def quant_class_for(module: nn.Module) -> type[QuantModule] | None:
    """The quantized wrapper class for ``module`` (looking through qpeft wrappers), or None."""
    return REGISTRY.lookup(module)
