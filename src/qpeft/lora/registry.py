"""One registry from base layer types to their LoRA wrapper, looked up along the MRO.

Plugins for optional libraries (transformers' ``Conv1D``, Megatron-Core, MoE experts) register
themselves: their module is imported the first time a lookup happens after the library itself has
been imported, so qpeft never imports an optional library on its own.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable

from torch import nn

from ..wrapping import innermost
from .layer import LoRALinear, LoRAModule

__all__ = ["register_lora", "register_lora_matcher", "lora_class_for"]

_REGISTRY: dict[type, type[LoRAModule]] = {nn.Linear: LoRALinear}

# library module -> qpeft plugin module that registers its layers.
_PLUGINS: dict[str, str] = {
    "transformers": "qpeft.lora.plugins.transformers",
    "transformers.integrations.moe": "qpeft.lora.plugins.moe",
    "megatron.core": "qpeft.lora.plugins.megatron",
    "qpeft.quant.layer": "qpeft.lora.plugins.quant",  # fused LoRA over weight-only QuantLinear
}
# (predicate, wrapper) for families of classes that share no base type (e.g. transformers' many
# experts classes, recognised by the attributes their common decorator sets); tried after types.
_MATCHERS: list[tuple[Callable[[nn.Module], bool], type[LoRAModule]]] = []
_loaded: set[str] = set()


def register_lora(base_type: type, wrapper: type[LoRAModule]) -> None:
    """Register ``wrapper`` as the LoRA layer for ``base_type`` and its subclasses.

    Raises:
        TypeError: if ``wrapper`` is not a :class:`LoRAModule` subclass.
    """
    if not (isinstance(wrapper, type) and issubclass(wrapper, LoRAModule)):
        raise TypeError(f"{wrapper!r} is not a LoRAModule subclass")
    _REGISTRY[base_type] = wrapper


def register_lora_matcher(predicate: Callable[[nn.Module], bool], wrapper: type[LoRAModule]) -> None:
    """Register ``wrapper`` for every module ``m`` (innermost) with ``predicate(m)`` true.

    Registered types win over matchers; matchers are tried in registration order.

    Raises:
        TypeError: if ``wrapper`` is not a :class:`LoRAModule` subclass or ``predicate`` not callable.
    """
    if not (isinstance(wrapper, type) and issubclass(wrapper, LoRAModule)):
        raise TypeError(f"{wrapper!r} is not a LoRAModule subclass")
    if not callable(predicate):
        raise TypeError(f"predicate {predicate!r} is not callable")
    _MATCHERS.append((predicate, wrapper))


def _load_plugins() -> None:
    for library, plugin in _PLUGINS.items():
        if library in sys.modules and plugin not in _loaded:
            _loaded.add(plugin)
            importlib.import_module(plugin)


def lora_class_for(module: nn.Module) -> type[LoRAModule] | None:
    """The LoRA wrapper class for ``module`` (looking through qpeft wrappers), or None."""
    _load_plugins()
    inner = innermost(module)
    for cls in type(inner).__mro__:
        if cls in _REGISTRY:
            return _REGISTRY[cls]
    return next((wrapper for predicate, wrapper in _MATCHERS if predicate(inner)), None)
