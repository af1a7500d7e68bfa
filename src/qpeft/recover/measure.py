"""What ``qpeft recover`` measures on a model besides the eval metrics: the quantized layers, the
per-layer weight error, the adapter and model sizes, the peak resident memory; and the rank check.
"""

from __future__ import annotations

import resource

import torch
from torch import nn

from ..core.wrapping import innermost
from ..lora.convert import lora_layers
from ..lora.layer import LoRAModule
from ..quant.compressed import is_compressed

__all__ = ["layer_errors", "quantized_names", "check_rank", "model_sizes", "peak_rss_mb"]


def layer_errors(model: nn.Module, names: list[str]) -> dict[str, float]:
    """``||W - Q(W) - sum scale*B@A|| / ||W||`` per quantized layer (no adapter: ``||W - Q(W)|| /
    ||W||``)."""
    errors = {}
    with torch.no_grad():
        for name in names:
            layer = model.get_submodule(name)
            weight = innermost(layer).weight.float()
            residual = weight - layer.weight_quantizer(innermost(layer).weight).float()
            if isinstance(layer, LoRAModule):
                residual = layer.to_out_in(residual)
                for adapter in layer.adapters.values():
                    if adapter.enable:
                        residual = residual - adapter.delta_weight()
            errors[name] = float(residual.norm() / weight.norm().clamp(min=1e-30))
    return errors


def quantized_names(model: nn.Module) -> list[str]:
    """Quantized layers inside the transformer blocks (the module list holding most of them)."""
    names = [
        n
        for n, m in model.named_modules()
        if isinstance(getattr(m, "weight_quantizer", None), nn.Module)
        and m.weight_quantizer.is_enabled
    ]
    lists = [n + "." for n, m in model.named_modules() if isinstance(m, nn.ModuleList)]
    best = max(lists, key=lambda p: sum(n.startswith(p) for n in names), default=None)
    inside = [n for n in names if best and n.startswith(best)]
    return inside or names


def check_rank(model: nn.Module, names: list[str], rank: int) -> None:
    """Raise ValueError naming the first layer whose smaller side is below ``rank``."""
    for name in names:
        weight = model.get_submodule(name).weight
        if rank > min(weight.shape):
            raise ValueError(
                f"--rank {rank} is above the size of layer {name!r} (weight {tuple(weight.shape)})"
            )


def peak_rss_mb() -> float:
    """The process's peak resident memory so far (``getrusage`` max RSS), MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def model_sizes(model: nn.Module) -> dict[str, float]:
    adapter = {id(p) for layer in lora_layers(model).values() for p in layer.adapters.parameters()}
    params = list(model.parameters())
    packed = [b for m in model.modules() if is_compressed(m) for b in m.buffers(recurse=False)]
    adapter_bytes = sum(p.numel() * p.element_size() for p in params if id(p) in adapter)
    model_bytes = sum(
        p.numel() * p.element_size() for p in [*params, *packed] if id(p) not in adapter
    )
    return {
        "adapter_mb": adapter_bytes / 2**20,
        "model_mb": model_bytes / 2**20,
        "peak_rss_mb": peak_rss_mb(),
    }
