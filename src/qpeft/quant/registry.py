"""One registry from base layer types to their quantized wrapper, looked up along the MRO.

Like :mod:`qpeft.lora.registry`: plugins for optional libraries (transformers' ``Conv1D``) are
imported the first time a lookup happens after the library itself has been imported.
"""

from __future__ import annotations

import importlib
import sys

from torch import nn

from ..wrapping import innermost
from .layer import QuantLinear, QuantModule

__all__ = ["register_quant", "quant_class_for"]

_REGISTRY: dict[type, type[QuantModule]] = {nn.Linear: QuantLinear}

# library module -> qpeft plugin module that registers its layers.
_PLUGINS: dict[str, str] = {"transformers": "qpeft.quant.plugins.transformers"}
_loaded: set[str] = set()


def register_quant(base_type: type, wrapper: type[QuantModule]) -> None:
    """Register ``wrapper`` as the quantized layer for ``base_type`` and its subclasses.

    Raises:
        TypeError: if ``wrapper`` is not a :class:`QuantModule` subclass.
    """
    if not (isinstance(wrapper, type) and issubclass(wrapper, QuantModule)):
        raise TypeError(f"{wrapper!r} is not a QuantModule subclass")
    _REGISTRY[base_type] = wrapper


def _load_plugins() -> None:
    for library, plugin in _PLUGINS.items():
        if library in sys.modules and plugin not in _loaded:
            _loaded.add(plugin)
            importlib.import_module(plugin)


def quant_class_for(module: nn.Module) -> type[QuantModule] | None:
    """The quantized wrapper class for ``module`` (looking through qpeft wrappers), or None."""
    _load_plugins()
    for cls in type(innermost(module)).__mro__:
        if cls in _REGISTRY:
            return _REGISTRY[cls]
    return None
