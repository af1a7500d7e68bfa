"""The student's quantized layers as ``qpeft recover`` sees them: which they are, whether a rank
fits them, and their weight error.

A quantized layer is a module with an enabled weight quantizer: ``weight_quantizer`` for a
linear or ``Conv1D`` layer, ``<projection>_weight_quantizer`` for each 3-D projection of grouped
MoE experts (``gate_up_proj`` / ``down_proj``: ``[E, out, in]`` or transposed). An experts module
is one layer here, as it is one LoRA layer (:class:`qpeft.LoRAExperts`): its error and its rank
check cover every projection and every expert.
"""

from __future__ import annotations

import torch
from torch import nn

from ..core.wrapping import ModuleWrapper
from ..lora.experts import LoRAExperts
from ..lora.layer import LoRAModule
from ..quant.compress_experts import experts_refusal
from ..quant.layer import QuantModule

__all__ = [
    "quantized_names",
    "check_rank",
    "check_compressible",
    "layer_errors",
    "weight_quantizers",
]

_SUFFIX = "weight_quantizer"


def weight_quantizers(module: nn.Module) -> dict[str, nn.Module]:
    """``{name: quantizer}`` of the enabled weight quantizers that ``module`` holds itself."""
    return {
        name: q
        for name, q in module.named_children()
        if name.endswith(_SUFFIX) and getattr(q, "is_enabled", True)
    }


def quantized_names(model: nn.Module) -> list[str]:
    """Quantized layers inside the transformer blocks (the module list holding most of them), in
    model order; every quantized layer when no list holds one."""
    names = [n for n, m in model.named_modules() if weight_quantizers(m)]
    lists = [n + "." for n, m in model.named_modules() if isinstance(m, nn.ModuleList)]
    best = max(lists, key=lambda p: sum(n.startswith(p) for n in names), default=None)
    inside = [n for n in names if best and n.startswith(best)]
    return inside or names


def _quantized_layer(layer: nn.Module) -> QuantModule:
    """The quantized wrapper in ``layer``'s wrapper chain (``layer`` itself or under LoRA)."""
    module = layer
    while not isinstance(module, QuantModule):
        if not isinstance(module, ModuleWrapper):
            raise TypeError(f"{type(layer).__name__} wraps no quantized layer")
        module = module.base
    return module


def _quantized_weights(layer: nn.Module) -> dict[str, torch.Tensor]:
    """``{weight quantizer name: weight}`` of the enabled weight quantizers, stored layout."""
    quant = _quantized_layer(layer)
    enabled = weight_quantizers(quant)
    return {name: w for name, w in quant.weights().items() if name in enabled}


def check_rank(model: nn.Module, names: list[str], rank: int) -> None:
    """Raise ValueError naming the first layer (and projection, for experts) whose weight's
    smaller side is below ``rank``."""
    for name in names:
        for qname, weight in _quantized_weights(model.get_submodule(name)).items():
            if rank > min(weight.shape[-2:]):
                what = "" if qname == _SUFFIX else f" projection {qname[: -len(_SUFFIX) - 1]!r}"
                raise ValueError(
                    f"--rank {rank} is above the size of layer {name!r}{what} (weight "
                    f"{tuple(weight.shape)})"
                )


def check_compressible(model: nn.Module, names: list[str]) -> None:
    """Raise ValueError naming the first grouped-experts layer ``--compress`` cannot pack (kinds
    with no packed forward, e.g. Megatron's; checked before the adapters are attached)."""
    for name in names:
        layer = model.get_submodule(name)
        if set(_quantized_weights(layer)) == {_SUFFIX}:
            continue
        reason = experts_refusal(layer, frozen=False)
        if reason is not None:
            raise ValueError(f"--compress: layer {name!r}: {reason}; run without --compress")


def _minus_adapters(layer: nn.Module, qname: str, residual: torch.Tensor) -> torch.Tensor:
    """``residual - sum scale * B @ A`` of the enabled adapters, in the layout they share."""
    if not isinstance(layer, LoRAModule):
        return residual
    adapters = [a for a in layer.adapters.values() if a.enable]
    if isinstance(layer, LoRAExperts):  # residual [E, ...] in the stored layout, as the deltas
        projection = qname[: -len(_SUFFIX) - 1]
        for adapter in adapters:
            factors = adapter.factors.get(projection)
            if factors is not None:
                residual = residual - factors.delta_weight(adapter.scale)
        return residual
    residual = layer.to_out_in(residual)
    for adapter in adapters:
        residual = residual - adapter.delta_weight()
    return residual


def layer_errors(model: nn.Module, names: list[str]) -> dict[str, float]:
    """``||W - Q(W) - sum scale*B@A|| / ||W||`` per quantized layer (no adapter: ``||W - Q(W)|| /
    ||W||``); an experts layer's norms run over all its projections and experts."""
    errors = {}
    with torch.no_grad():
        for name in names:
            layer = model.get_submodule(name)
            quant = _quantized_layer(layer)
            num = den = 0.0
            for qname, weight in _quantized_weights(layer).items():
                w = weight.detach().float()
                residual = w - getattr(quant, qname)(weight.detach()).float()
                num += float(_minus_adapters(layer, qname, residual).pow(2).sum())
                den += float(w.pow(2).sum())
            errors[name] = (num / max(den, 1e-60)) ** 0.5
    return errors
