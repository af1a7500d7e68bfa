"""Adapter management on a converted model: enable/disable, freeze/unfreeze, delete.

Layer patterns are matched against LoRA layer names (wildcards or callables); adapter patterns are
wildcards. Each call records its resolved effect (concrete layer and adapter names) in the mode log.

Disabled means the base model, whatever was merged (as in HF PEFT): :func:`disable_adapters` on a
merged adapter first unmerges it (recorded as an ``unmerge_adapters`` entry, then the
``disable_adapters`` entry, so a replay reaches the same state); :func:`disabled_adapters`
unmerges merged adapters on entry and merges them back on exit, recording nothing.
:func:`delete_adapter` refuses a merged adapter (its update would stay in the weight forever).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn

from ..core.modes import record, register_mode
from ..core.patterns import matches_pattern
from .history import forget_adapter, supersede_toggles
from .layer import (
    check_adapter_names,
    check_not_routing,
    check_selection,
    lora_layers,
    require_lora_layers,
)
from .merge import merge_selection, unmerge_selection

__all__ = [
    "enable_adapters",
    "disable_adapters",
    "freeze_lora_weights",
    "unfreeze_lora_weights",
    "delete_adapter",
    "disabled_adapters",
]


def _literal_names(patterns: Any) -> list[str]:
    """The adapter names among ``patterns`` that are plain names (no wildcard characters)."""
    items = (
        [patterns]
        if isinstance(patterns, str)
        else patterns
        if isinstance(patterns, list | tuple)
        else []
    )
    return [p for p in items if isinstance(p, str) and not any(c in p for c in "*?[")]


def _select(model: nn.Module, layer_patterns: Any, adapter_patterns: Any) -> dict[str, list[str]]:
    layers = require_lora_layers(model)
    check_adapter_names(layers, _literal_names(adapter_patterns))  # a typo is no silent no-op
    chosen: dict[str, list[str]] = {}
    for name, layer in layers.items():
        if matches_pattern(name, layer_patterns):
            names = [
                a
                for a in layer.adapters
                if matches_pattern(a, adapter_patterns, allow_callable=False)
            ]
            if names:
                chosen[name] = names
    return chosen


# mode -> the value it sets; "*_adapters" modes set ``enable``, the others ``requires_grad``.
_FLAGS = {
    "enable_adapters": True,
    "disable_adapters": False,
    "freeze_lora_weights": False,
    "unfreeze_lora_weights": True,
}


def _apply_selection(model: nn.Module, mode: str, selection: dict[str, list[str]]) -> None:
    layers = lora_layers(model)
    check_selection(layers, selection, mode)
    targets = [layers[ln].adapters[name] for ln, names in selection.items() for name in names]
    value = _FLAGS[mode]
    for adapter in targets:
        if mode.endswith("_adapters"):
            adapter.enable = value
        else:
            adapter.requires_grad_(value)
    supersede_toggles(model, mode, selection)
    record(model, mode, {"selection": selection})


def _merged_in(model: nn.Module, selection: dict[str, list[str]]) -> dict[str, list[str]]:
    """The merged adapters of ``selection`` (unknown names are left to the caller's check)."""
    layers = lora_layers(model)
    merged = {}
    for layer_name, names in selection.items():
        adapters = layers[layer_name].adapters if layer_name in layers else {}
        if found := [n for n in names if n in adapters and adapters[n].merged]:
            merged[layer_name] = found
    return merged


def disable_selection(model: nn.Module, selection: dict[str, list[str]]) -> None:
    """Disable exactly the adapters ``{layer name: [adapter names]}`` and record it; merged ones
    are unmerged first (recorded as ``unmerge_adapters``)."""
    if merged := _merged_in(model, selection):
        unmerge_selection(model, merged)
    _apply_selection(model, "disable_adapters", selection)


def _toggle(model: nn.Module, mode: str, layers: Any, adapters: Any) -> nn.Module:
    selection = _select(model, layers, adapters)
    if mode == "disable_adapters":
        disable_selection(model, selection)
    else:
        _apply_selection(model, mode, selection)
    return model


def enable_adapters(
    model: nn.Module, layers_to_enable: Any = None, adapters_to_enable: Any = None
) -> nn.Module:
    """Enable adapters matching ``adapters_to_enable`` on layers matching ``layers_to_enable``.

    Args:
        model: a model converted by :func:`qpeft.update_model`.
        layers_to_enable: layer-name pattern(s), wildcards or callables; None means every layer.
        adapters_to_enable: adapter-name wildcard(s); None means every adapter. A plain name
            (no ``*?[``) must be an adapter of the model; a wildcard may match nothing.

    Raises:
        ValueError: the model has no LoRA layers, or a plain adapter name no layer has (names
            the known adapters). TypeError: for a bad pattern type.
    """
    return _toggle(model, "enable_adapters", layers_to_enable, adapters_to_enable)


def disable_adapters(
    model: nn.Module, layers_to_disable: Any = None, adapters_to_disable: Any = None
) -> nn.Module:
    """Disable (by-pass) matching adapters; same arguments and errors as :func:`enable_adapters`.

    A merged adapter is unmerged first (its update subtracted from the weight, as HF PEFT does),
    so a disabled adapter never contributes; the log then holds ``unmerge_adapters`` followed by
    ``disable_adapters``. Enabling it again does not merge it back.
    """
    return _toggle(model, "disable_adapters", layers_to_disable, adapters_to_disable)


def freeze_lora_weights(
    model: nn.Module, *, layer_patterns: Any = None, adapter_patterns: Any = None
) -> nn.Module:
    """Set ``requires_grad=False`` on matching adapters' factors; errors as
    :func:`enable_adapters`."""
    return _toggle(model, "freeze_lora_weights", layer_patterns, adapter_patterns)


def unfreeze_lora_weights(
    model: nn.Module, *, layer_patterns: Any = None, adapter_patterns: Any = None
) -> nn.Module:
    """Set ``requires_grad=True`` on matching adapters' factors; errors as
    :func:`enable_adapters`."""
    return _toggle(model, "unfreeze_lora_weights", layer_patterns, adapter_patterns)


def delete_adapter(model: nn.Module, name: str) -> nn.Module:
    """Remove adapter ``name`` from every layer that has it (LoRA layers stay in place).

    Raises:
        ValueError: if the model has no LoRA layers, no layer has an adapter called ``name``, or
            the adapter is merged into some layer's weight (unmerge it first; nothing changed).
    """
    layers = require_lora_layers(model)
    check_adapter_names(layers, [name])
    check_not_routing(layers, "delete_adapter")
    holders = [layer for layer in layers.values() if name in layer.adapters]
    merged = [
        n for n, layer in layers.items() if name in layer.adapters and layer.adapters[name].merged
    ]
    if merged:
        raise ValueError(
            f"cannot delete adapter {name!r} while it is merged (layers {merged}): its update "
            "would stay in the weights; call qpeft.unmerge_adapters first"
        )
    for layer in holders:
        del layer.adapters[name]
    forget_adapter(model, name)  # its history no longer shapes the model (qpeft.lora.history)
    return model


@contextmanager
def disabled_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Context manager: inside, the model computes its base model; on exit it is as before.

    Every adapter is by-passed; merged adapters are unmerged on entry (their update subtracted
    from the weight) and merged back on exit, so the weights come back within the rounding of a
    subtract-and-add in the weight's dtype. Nothing is recorded in the mode log.
    """
    layers = lora_layers(model)
    adapters = [a for layer in layers.values() for a in layer.adapters.values()]
    saved = [a.enable for a in adapters]
    merged = {
        name: found
        for name, layer in layers.items()
        if (found := [n for n, a in layer.adapters.items() if a.merged])
    }
    if merged:
        unmerge_selection(model, merged, log=False)
    try:
        for adapter in adapters:
            adapter.enable = False
        yield model
    finally:
        for adapter, flag in zip(adapters, saved, strict=True):
            adapter.enable = flag
        if merged:
            merge_selection(model, merged, log=False)


def _replay_selection(mode: str):  # noqa: ANN202 - internal factory
    def replay(model: nn.Module, config: dict[str, Any]) -> None:
        _apply_selection(model, mode, config["selection"])

    return replay


for _mode in _FLAGS:
    register_mode(_mode)(_replay_selection(_mode))


@register_mode("delete_adapter")
def _replay_delete(model: nn.Module, config: dict[str, Any]) -> None:
    delete_adapter(model, config["name"])
