"""Merge, unmerge and export: fold LoRA updates into base weights.

For a layer with master weight ``W`` (``[out, in]`` after ``to_out_in``) and an adapter with
``A: [r, in]``, ``B: [out, r]``: ``merge`` sets ``W <- cast(W_fp32 + scale * B @ A)`` using
:meth:`LoRAAdapter.delta_weight` (fp32) and marks the adapter ``merged`` so the layer's forward
skips it; ``unmerge`` subtracts the same delta (in reverse merge order) and clears the mark.

``export`` folds every active adapter (enabled, not yet merged), drops the rest, and puts each
layer's ``base`` (the original module object) back in its place. On a quantized base (a layer from
``qpeft.quantize``, grouped experts included, or one with a ``weight_quantizer``) the fold goes into
the master weight and the quantizer stays: outputs then become ``Q(W + dW) x`` instead of
``Q(W) x + dW x``, and export warns with the largest output change it measures on a fixed random
probe input of each such layer (experts: probe row ``i`` routed to expert ``i mod E``).

Inside :func:`qpeft.core.modes.restoring` (a replay during ``restore``) the weights are not touched,
because the saved, already merged weights are loaded right after.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from ..core.modes import is_restoring, record, register_mode, swap_module
from ..quant.compressed import compressed_error, is_compressed
from ..quant.layer import QuantModule, find_weight_quantizer
from .config import ExportPEFTConfig
from .layer import (
    LoRAModule,
    check_adapter_names,
    check_not_routing,
    check_selection,
    require_lora_layers,
)

__all__ = [
    "merge_adapters",
    "unmerge_adapters",
    "export",
    "merge_selection",
    "unmerge_selection",
]

PROBE_ROWS = 8
PROBE_SEED = 0


def _check_untied(model: nn.Module, layers: dict[str, LoRAModule], folds: dict, what: str) -> None:
    """Refuse to fold into a weight that other parameters share (a tied ``lm_head``)."""
    folding = {
        id(p): n for n, names in folds.items() if names for p in layers[n].folded_parameters()
    }
    if not folding:
        return
    owners: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in folding:
            owners.setdefault(id(param), []).append(name)
    for key, names in owners.items():
        if len(names) > 1:
            raise ValueError(
                f"{what}: layer {folding[key]!r} has its weight tied to {names} (one shared "
                "tensor): folding an adapter in would change every one of them. Untie it first "
                "(give the layer its own copy of the weight and set tie_word_embeddings=False), "
                "or keep the adapter unmerged"
            )


def _refuse_compressed(layers: dict[str, LoRAModule], selection: dict[str, list[str]], what: str):
    hint = f"run {what} before qpeft.compress"
    if what == "export":
        hint += ", or write a quantized checkpoint with export_hf_checkpoint"
    for layer_name, names in selection.items():
        if names and not is_restoring() and is_compressed(layers[layer_name]):
            raise compressed_error(what, layer_name, hint)


def merge_selection(model: nn.Module, selection: dict[str, list[str]], log: bool = True) -> None:
    """Merge exactly the adapters ``{layer name: [adapter names]}``; record it when ``log``.

    Raises:
        ValueError: an unknown layer/adapter, one already merged, a layer whose weight is tied to
            another parameter, or a call inside ``adapter_routing`` (nothing changed then).
    """
    layers = require_lora_layers(model)
    check_selection(layers, selection, "merge_adapters")
    check_not_routing(layers, "merge_adapters")
    _refuse_compressed(layers, selection, "merge_adapters")
    _check_untied(model, layers, selection, "merge_adapters")
    for layer_name, names in selection.items():
        for name in names:
            if layers[layer_name].adapters[name].merged:
                raise ValueError(
                    f"adapter {name!r} on layer {layer_name!r} is already merged; unmerge first"
                )
    for layer_name, names in selection.items():
        for name in names:
            adapter = layers[layer_name].adapters[name]
            if not is_restoring():
                layers[layer_name].fold_adapter(adapter, 1.0)
            adapter.merged = True
    if log:
        record(model, "merge_adapters", {"selection": selection})


def unmerge_selection(model: nn.Module, selection: dict[str, list[str]], log: bool = True) -> None:
    """Unmerge exactly the adapters ``{layer name: [adapter names]}`` (each layer's in reverse
    order); record it when ``log``.

    Raises:
        ValueError: an unknown layer/adapter or one not merged.
    """
    layers = require_lora_layers(model)
    check_selection(layers, selection, "unmerge_adapters")
    _refuse_compressed(layers, selection, "unmerge_adapters")
    for layer_name, names in selection.items():
        for name in reversed(names):
            adapter = layers[layer_name].adapters[name]
            if not adapter.merged:
                raise ValueError(f"adapter {name!r} on layer {layer_name!r} is not merged")
            if not is_restoring():
                layers[layer_name].fold_adapter(adapter, -1.0)
            adapter.merged = False
    if log:
        record(model, "unmerge_adapters", {"selection": selection})


def merge_adapters(model: nn.Module, adapter_names: list[str] | str | None = None) -> nn.Module:
    """Fold enabled adapters into their base weights in place, keeping the LoRA layers.

    The folded adapters are marked ``merged`` and skipped by the forward, so outputs stay the same
    (up to rounding of the merged weight) while inference runs at the base layer's cost. On a
    quantized base the quantizer then rounds ``W + dW``, so outputs change as described for
    :func:`export` (merge does not measure or warn).

    Args:
        model: a converted model.
        adapter_names: adapter name(s) to merge; None merges every enabled adapter. Disabled
            adapters are never merged.

    Returns:
        ``model``.

    Raises:
        ValueError: no LoRA layers, an unknown adapter name, nothing enabled to merge, or an
            adapter already merged (names adapter and layer); nothing is changed then.
    """
    layers = require_lora_layers(model)
    wanted = [adapter_names] if isinstance(adapter_names, str) else adapter_names
    check_adapter_names(layers, wanted or [])
    selection = {
        layer_name: names
        for layer_name, layer in layers.items()
        if (
            names := [
                n for n, a in layer.adapters.items() if a.enable and (wanted is None or n in wanted)
            ]
        )
    }
    if not selection:
        raise ValueError("no enabled adapter to merge")
    merge_selection(model, selection)
    return model


def unmerge_adapters(model: nn.Module) -> nn.Module:
    """Undo :func:`merge_adapters`: subtract every merged adapter's update and un-mark it.

    Exact up to the rounding of the base weight's dtype (fp32: about 1e-7 relative). Edit ``scale``
    only while unmerged: the update subtracted is computed from the current ``scale``.

    Raises:
        ValueError: no LoRA layers, or no adapter is merged.
    """
    layers = require_lora_layers(model)
    selection = {
        layer_name: names
        for layer_name, layer in layers.items()
        if (names := [n for n, a in layer.adapters.items() if a.merged])
    }
    if not selection:
        raise ValueError("no merged adapter to unmerge")
    unmerge_selection(model, selection)
    return model


def _quantized_base(layer: LoRAModule) -> bool:
    base = layer.base
    return isinstance(base, QuantModule) or find_weight_quantizer(base, enabled=False) is not None


def _export(model: nn.Module, folds: dict[str, list[str]]) -> nn.Module:
    layers = require_lora_layers(model)
    check_selection(layers, folds, "export")
    check_not_routing(layers, "export")
    _refuse_compressed(layers, folds, "export")
    _check_untied(model, layers, folds, "export")
    quantized: dict[str, tuple[tuple[torch.Tensor, ...], torch.Tensor]] = {}
    with torch.no_grad():
        for layer_name, layer in layers.items():
            names = folds.get(layer_name, [])
            if names and not is_restoring() and _quantized_base(layer):
                x = layer.probe_inputs(PROBE_ROWS, torch.Generator().manual_seed(PROBE_SEED))
                quantized[layer_name] = (x, layer(*x))
            for name in names if not is_restoring() else []:
                layer.fold_adapter(layer.adapters[name], 1.0)
            model = swap_module(model, layer_name, layer.base)
        changes = {
            n: (layers[n].base(*x) - y).abs().max().item() for n, (x, y) in quantized.items()
        }
    record(model, "export", {"folded": folds})
    _warn_export(changes)
    return model


def _warn_export(changes: dict[str, float]) -> None:
    if changes:
        worst = max(changes, key=changes.get)
        warnings.warn(
            f"export folded adapters into the master weights of {len(changes)} quantized layer(s); "
            "the "
            "quantizer now rounds W + scale*B@A, so outputs change: max |output change| on a "
            "probe "
            f"input is {changes[worst]:.4g} (layer {worst!r})",
            UserWarning,
            stacklevel=4,
        )


def export(model: nn.Module, config: ExportPEFTConfig | dict[str, Any] | None = None) -> nn.Module:
    """Fold every active adapter into its base weight and unwrap every LoRA layer.

    Each LoRA layer is replaced by its ``base`` (the original module object, or the quantized
    layer on a quantized model) holding ``W + scale * B @ A`` (fp32 sum, cast back); disabled
    adapters are dropped; adapters merged earlier are already in ``W``.

    Args:
        model: a converted model; changed in place.
        config: an :class:`ExportPEFTConfig` (it has no fields) or a dict of its fields.

    Returns:
        The model to use from now on, no longer a PEFT model: ``model`` itself, or, when ``model``
        is itself a LoRA layer, its ``base`` (the mode log moves to it).

    Warns:
        UserWarning: on a quantized base, with the largest output change measured on a probe input.

    Raises:
        ValueError: invalid config, or no LoRA layers.
    """
    if not isinstance(config, ExportPEFTConfig):
        ExportPEFTConfig.model_validate(config or {})
    layers = require_lora_layers(model)
    folds = {n: [a for a, ad in layer.adapters.items() if ad.active] for n, layer in layers.items()}
    return _export(model, folds)


@register_mode("merge_adapters")
def _replay_merge(model: nn.Module, config: dict[str, Any]) -> None:
    merge_selection(model, config["selection"])


@register_mode("unmerge_adapters")
def _replay_unmerge(model: nn.Module, config: dict[str, Any]) -> None:
    unmerge_selection(model, config["selection"])


@register_mode("export")
def _replay_export(model: nn.Module, config: dict[str, Any]) -> nn.Module:
    return _export(model, config["folded"])
