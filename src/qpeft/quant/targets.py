"""Where quantizers go: every quantizable layer of a model, by its LOGICAL name.

The logical name of a module is its path with the ``base`` levels of qpeft wrappers removed, so a
layer is called ``model.layers.0.q_proj`` whether it is a plain ``nn.Linear``, a LoRA layer around
it, a quantized layer, or a LoRA layer around a quantized one. Quantizer names add
``.weight_quantizer`` / ``.input_quantizer`` to it; patterns match those names, so they behave the
same whichever of ``quantize`` and ``update_model`` ran first.

A layer's *slot* is the physical module path where its quantized wrapper lives (or will): the raw
layer itself, or the ``QuantModule`` already around it. A quantized wrapper always sits directly
around the raw layer, under any LoRA wrapper.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from torch import nn

from ..core.wrapping import ModuleWrapper
from .layer import QuantModule
from .registry import quant_class_for

__all__ = ["Target", "logical_named_modules", "quant_targets", "quantized_layers"]


def logical_named_modules(model: nn.Module) -> Iterator[tuple[str, str, nn.Module]]:
    """Yield ``(physical_path, logical_name, module)`` for every module.

    Inside a qpeft wrapper only ``base`` is walked: a wrapper's own children (adapters,
    quantizers) are not layers of the model.
    """

    def walk(
        module: nn.Module, physical: str, logical: str
    ) -> Iterator[tuple[str, str, nn.Module]]:
        yield physical, logical, module
        wrapper = isinstance(module, ModuleWrapper)
        for name, child in module._modules.items():
            if child is None or (wrapper and name != "base"):
                continue
            path = f"{physical}.{name}" if physical else name
            if wrapper:
                yield from walk(child, path, logical)
            else:
                yield from walk(child, path, f"{logical}.{name}" if logical else name)

    yield from walk(model, "", "")


@dataclass
class Target:
    """One quantizable layer: its slot path, the raw layer, and the wrapper class to use."""

    slot: str
    raw: nn.Module
    wrapper: type[QuantModule]
    current: QuantModule | None  # the wrapper already there, if the layer is quantized


def quant_targets(model: nn.Module) -> dict[str, Target]:
    """Every quantizable layer of ``model`` by logical name (quantized or not yet)."""
    found: dict[str, Target] = {}
    parents: dict[str, nn.Module] = {}
    for physical, logical, module in logical_named_modules(model):
        parents[physical] = module
        if isinstance(module, ModuleWrapper):
            continue
        wrapper = quant_class_for(module)
        if wrapper is None:
            continue
        parent_path = physical.rsplit(".", 1)[0] if "." in physical else ""
        parent = parents.get(parent_path) if physical else None
        if isinstance(parent, QuantModule) and (physical == "base" or physical.endswith(".base")):
            found[logical] = Target(parent_path, module, wrapper, parent)
        else:
            found[logical] = Target(physical, module, wrapper, None)
    return found


def quantized_layers(model: nn.Module) -> dict[str, QuantModule]:
    """Every quantized layer of ``model`` by logical name."""
    return {
        logical: module
        for _, logical, module in logical_named_modules(model)
        if isinstance(module, QuantModule)
    }
