"""What an HF export writes per layer: the quantized linear layers' packed codes and scales, their
input quantizers, and every other tensor of the model under its own (logical) name.

Both formats of :func:`qpeft.export_hf_checkpoint` read the model through :func:`export_layers`
and :func:`model_tensors`; neither touches the model (packed tensors are made afresh, or are the
compressed layer's own, and are never written back).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..core.wrapping import ModuleWrapper, innermost
from ..quant.compress import packed_weight
from ..quant.compressed import PackedLinear
from ..quant.layer import QuantLinear, QuantModule
from ..quant.packing import PackSpec
from ..quant.targets import logical_named_modules, quantized_layers

__all__ = ["LayerExport", "export_layers", "model_tensors"]


@dataclass(frozen=True)
class LayerExport:
    """One quantized linear layer as an export sees it."""

    name: str
    spec: PackSpec
    packed: dict[str, torch.Tensor]  # qpeft's codes and scales (qpeft.quant.packing)
    input_quantizer: Any  # the enabled input quantizer (or a tied copy of it), or None
    bias: torch.Tensor | None
    source: torch.Tensor | None  # the master weight (None when compressed)
    weight_amax: torch.Tensor | None  # the weight quantizer's amax (None when compressed)


def _is_quantized(layer: QuantModule) -> bool:
    return any(
        k.endswith("weight_quantizer") and q.is_enabled for k, q in layer.quantizers().items()
    )


def _one(name: str, layer: QuantModule, fmt: str) -> LayerExport:
    raw = innermost(layer)
    if not isinstance(layer, QuantLinear) or not isinstance(raw, (nn.Linear, PackedLinear)):
        kind = type(layer).__name__
        hint = "grouped experts" if "Experts" in kind else f"{kind} layers"
        raise ValueError(
            f"export_hf_checkpoint: layer {name!r}: {hint} have no {fmt} layout "
            "(only quantized nn.Linear layers); disable its quantizers to export it unquantized"
        )
    try:
        spec, packed = packed_weight(layer)
    except ValueError as err:
        raise ValueError(f"export_hf_checkpoint: layer {name!r}: {err}") from None
    iq = getattr(layer, "input_quantizer", None)
    iq = iq if iq is not None and iq.is_enabled else None
    if isinstance(raw, PackedLinear):
        return LayerExport(name, spec, packed, iq, raw.bias, None, None)
    amax = layer.weight_quantizer.amax
    return LayerExport(name, spec, packed, iq, raw.bias, raw.weight.detach(), amax)


def export_layers(model: nn.Module, fmt: str) -> dict[str, LayerExport]:
    """Every quantized linear layer whose weight quantizer is on, by logical name.

    Raises:
        ValueError: no such layer; a quantized layer that is not a linear one (grouped experts,
            ``Conv1D``); a weight that cannot be packed. The message names the layer and ``fmt``.
    """
    quantized = {n: layer for n, layer in quantized_layers(model).items() if _is_quantized(layer)}
    if not quantized:
        raise ValueError(
            "export_hf_checkpoint: the model has no quantized layer (call qpeft.quantize first)"
        )
    return {name: _one(name, layer, fmt) for name, layer in quantized.items()}


def _own_tensors(module: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    out = {f"{prefix}{k}": v for k, v in module._parameters.items() if v is not None}
    skip = module._non_persistent_buffers_set
    out.update(
        {f"{prefix}{k}": v for k, v in module._buffers.items() if v is not None and k not in skip}
    )
    return out


def model_tensors(
    model: nn.Module,
    layers: dict[str, LayerExport],
    layer_tensors: Callable[[LayerExport], dict[str, torch.Tensor]],
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``(tensors, unquantized linear layer names)`` in module order.

    A quantized layer contributes ``layer_tensors(export)`` (keys relative to the layer) and its
    bias; every other module its own parameters and persistent buffers.
    """
    tensors: dict[str, torch.Tensor] = {}
    unquantized = []
    for _, logical, module in logical_named_modules(model):
        if isinstance(module, ModuleWrapper):
            continue
        if logical in layers:
            export = layers[logical]
            tensors.update({f"{logical}.{k}": v for k, v in layer_tensors(export).items()})
            if export.bias is not None:
                tensors[f"{logical}.bias"] = export.bias
            continue
        if isinstance(module, nn.Linear):
            unquantized.append(logical)
        tensors.update(_own_tensors(module, f"{logical}." if logical else ""))
    return tensors, unquantized
