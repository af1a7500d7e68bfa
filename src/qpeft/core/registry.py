"""A registry from base layer types to the wrapper class that replaces them, looked up along the
MRO.

LoRA layers and quantized layers each keep one. Lookups look through qpeft wrappers (a LoRA layer
over a quantized layer still answers for ``nn.Linear``). Plugins for optional libraries register
themselves: the plugin module is imported the first time a lookup happens after its library has
been imported, so qpeft never imports an optional library on its own. Families of classes that
share no base type can be recognised by a predicate; registered types win over predicates.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable

from torch import nn

from .wrapping import innermost

__all__ = ["WrapperRegistry"]


class WrapperRegistry:
    """``{base type: wrapper}`` plus predicate matchers and lazily imported plugins."""

    def __init__(self, kind: type, types: dict[type, type], plugins: dict[str, str]) -> None:
        self.kind = kind  # every wrapper must subclass it
        self.types = dict(types)
        self.plugins = dict(plugins)  # library module -> qpeft plugin module
        self.matchers: list[tuple[Callable[[nn.Module], bool], type]] = []
        self._loaded: set[str] = set()

    def _check(self, wrapper: type) -> None:
        if not (isinstance(wrapper, type) and issubclass(wrapper, self.kind)):
            raise TypeError(f"{wrapper!r} is not a {self.kind.__name__} subclass")

    def register(self, base_type: type, wrapper: type) -> None:
        """Use ``wrapper`` for ``base_type`` and its subclasses; TypeError for a bad wrapper."""
        self._check(wrapper)
        self.types[base_type] = wrapper

    def register_matcher(self, predicate: Callable[[nn.Module], bool], wrapper: type) -> None:
        """Use ``wrapper`` for modules with ``predicate(module)`` true; TypeError for bad
        arguments."""
        self._check(wrapper)
        if not callable(predicate):
            raise TypeError(f"predicate {predicate!r} is not callable")
        self.matchers.append((predicate, wrapper))

    def _load_plugins(self) -> None:
        for library, plugin in self.plugins.items():
            if library in sys.modules and plugin not in self._loaded:
                self._loaded.add(plugin)
                importlib.import_module(plugin)

    def lookup(self, module: nn.Module) -> type | None:
        """The wrapper class for ``module`` (looking through qpeft wrappers), or None."""
        self._load_plugins()
        inner = innermost(module)
        for cls in type(inner).__mro__:
            if cls in self.types:
                return self.types[cls]
        return next((wrapper for predicate, wrapper in self.matchers if predicate(inner)), None)
