"""The registry of quantized layers: base layer type -> its quantized wrapper.

The transformers plugin (``Conv1D``) registers itself when transformers is imported; see
:class:`qpeft.registry.WrapperRegistry`.
"""

from __future__ import annotations

from torch import nn

from ..registry import WrapperRegistry
from .layer import QuantLinear, QuantModule

__all__ = ["register_quant", "quant_class_for", "REGISTRY"]

REGISTRY = WrapperRegistry(
    QuantModule, {nn.Linear: QuantLinear}, {"transformers": "qpeft.quant.plugins.transformers"}
)


def register_quant(base_type: type, wrapper: type[QuantModule]) -> None:
    """Register ``wrapper`` as the quantized layer for ``base_type`` and its subclasses.

    Raises:
        TypeError: if ``wrapper`` is not a :class:`QuantModule` subclass.
    """
    REGISTRY.register(base_type, wrapper)


def quant_class_for(module: nn.Module) -> type[QuantModule] | None:
    """The quantized wrapper class for ``module`` (looking through qpeft wrappers), or None."""
    return REGISTRY.lookup(module)
