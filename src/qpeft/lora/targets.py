"""Projection patterns for grouped-experts layers: which projections of ``L`` an adapter covers.

A grouped-experts LoRA layer ``L`` (:class:`~qpeft.LoRAExperts`) is one module whose projections
(``gate_up_proj``, ``down_proj``; Megatron ``fc1``, ``fc2``) are parameters, not modules. A pattern
may still name one of them as ``L.p``: projection ``p`` gets the merge, in ``adapter_cfg`` order, of
every entry matching ``L`` or ``L.p``. The adapter on ``L`` has a factor pair for each projection
whose merged ``enable`` is True; every other attribute must agree across those projections (one
adapter has one rank, scale, initialisation and dtype).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..core.patterns import merge_matching_any
from ..core.wrapping import innermost
from .config import PEFTAttributeConfig
from .experts import LoRAExperts
from .registry import lora_class_for

__all__ = [
    "ExpertsTarget",
    "resolve_experts",
    "is_target_name",
    "experts_class",
    "skipped_projections",
]


@dataclass
class ExpertsTarget:
    """What an ``adapter_cfg`` asks of one experts layer.

    ``merged``: the layer's attributes (the enabled projections' merge; the disabled ones' when
    none is enabled). ``enabled`` / ``disabled``: matched projections by merged ``enable``.
    """

    merged: dict[str, Any]
    enabled: list[str] = field(default_factory=list)
    disabled: list[str] = field(default_factory=list)
    explicit: list[str] = field(default_factory=list)  # enabled by an entry that says enable: True


def resolve_experts(
    layer_name: str, projections: list[str], adapter_cfg: Mapping[Any, Any], adapter_name: str
) -> ExpertsTarget | None:
    """Merge ``adapter_cfg`` per projection of experts layer ``layer_name``; None if nothing
    matches.

    Raises:
        ValueError: two enabled projections differ in an attribute other than ``enable`` (names the
            adapter, layer, field and projections), or an entry's attributes are invalid.
    """
    per_proj = {
        p: merge_matching_any((layer_name, f"{layer_name}.{p}"), adapter_cfg) for p in projections
    }
    matched = {p: m for p, m in per_proj.items() if m is not None}
    if not matched:
        return None
    attrs = {p: PEFTAttributeConfig(**m) for p, m in matched.items()}
    enabled = [p for p in matched if attrs[p].enable]
    _check_same(adapter_name, layer_name, enabled, attrs)
    chosen = enabled or list(matched)
    merged = {k: v for p in chosen for k, v in matched[p].items()}
    if not enabled:
        merged["enable"] = False
    explicit = [p for p in enabled if matched[p].get("enable") is not None]
    return ExpertsTarget(merged, enabled, [p for p in matched if p not in enabled], explicit)


def _check_same(
    adapter: str, layer: str, enabled: list[str], attrs: dict[str, PEFTAttributeConfig]
) -> None:
    if len(enabled) < 2:
        return
    first = attrs[enabled[0]].model_dump(exclude={"enable"})
    for other in enabled[1:]:
        for key, value in attrs[other].model_dump(exclude={"enable"}).items():
            if value != first[key]:
                raise ValueError(
                    f"adapter {adapter!r} on experts layer {layer!r}: projections {enabled[0]!r} "
                    "and "
                    f"{other!r} resolve to different {key} ({first[key]!r} vs {value!r}); one "
                    "adapter "
                    "needs the same attributes on all its projections (only enable may differ)"
                )


def is_target_name(name: str, layers: Mapping[str, nn.Module]) -> bool:
    """Whether ``name`` is a LoRA-capable layer of ``layers`` or ``<experts
    layer>.<projection>``."""
    if name in layers:
        return True
    layer_name, _, proj = name.rpartition(".")
    module = layers.get(layer_name)
    if module is None:
        return False
    cls = experts_class(module)
    return cls is not None and proj in cls.projections(innermost(module))


def experts_class(module: nn.Module) -> type[LoRAExperts] | None:
    """The :class:`LoRAExperts` class that wraps (or is) ``module``, or None for other layers."""
    cls = type(module) if isinstance(module, LoRAExperts) else lora_class_for(module)
    return cls if cls is not None and issubclass(cls, LoRAExperts) else None


def skipped_projections(
    layers: Mapping[str, nn.Module], holders: Mapping[str, nn.Module]
) -> dict[str, list[str]]:
    """``{experts layer: [projections without factors]}`` for one adapter's ``{layer: adapter}``.

    ``save_adapters`` stores it so ``load_adapters`` recreates the same projections.
    """
    skipped = {}
    for ln, adapter in holders.items():
        layer = layers[ln]
        if isinstance(layer, LoRAExperts):
            missing = [p for p in layer.projections(innermost(layer)) if p not in adapter.factors]
            if missing:
                skipped[ln] = missing
    return skipped
