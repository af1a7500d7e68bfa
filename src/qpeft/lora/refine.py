r"""``refine_svdquant``: LoftQ-style alternation between the quantized base and the LoRA factors.

For a layer with master weight ``W0: [out, in]`` (the target), weight quantizer ``Q`` and adapter
``s B A`` (``B: [out, r]``, ``A: [r, in]``), each iteration ``t`` does, in fp32::

    W_t  = W0 - s B_{t-1} A_{t-1}              # the base master weight to quantize
    Q_t  = Q(W_t)                              # with an amax recomputed from W_t
    B_t, A_t = SVD_r(W0 - Q_t)                 # split as in svdquant, cast to lora_dtype
    e_t  = ||W0 - Q_t - s B_t A_t||_F / ||W0||_F

starting from the adapter's current factors (zero factors give plain LoftQ; svdquant-initialised
ones continue from there). ``e_0`` is the error of the layer as it stands. The layer keeps the
iterate with the lowest error (so it never gets worse): its base master weight is rewritten to
``W_t``, its weight quantizer's amax to the one of ``W_t``, and the adapter to ``(A_t, B_t)``. The
master weight no longer equals ``W0``; what the layer computes, ``Q(W_t) x + s B_t A_t x``, is
closer to ``W0 x`` than before.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..core.modes import record, register_mode
from ..quant.compressed import compressed_error, is_compressed
from ..quant.layer import find_weight_quantizer
from .init import svd_factors
from .layer import LoRAModule, check_adapter_names, require_lora_layers

__all__ = ["refine_svdquant"]


@dataclass
class _Best:
    error: float
    weight: torch.Tensor | None = None  # new master weight, storage layout and dtype
    amax: torch.Tensor | None = None
    a: torch.Tensor | None = None
    b: torch.Tensor | None = None


def _fresh_quantize(
    quantizer: nn.Module, weight: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``Q(weight)`` with an amax calibrated on ``weight`` itself (the quantizer is not touched)."""
    q = copy.deepcopy(quantizer)
    q.reset_amax()
    with q.calibrating():
        q(weight)
    return q(weight), q.amax


def _refine_layer(
    layer: LoRAModule, name: str, adapter_name: str, iters: int
) -> tuple[list[float], _Best]:
    adapter, quantizer = layer.adapters[adapter_name], layer.weight_quantizer
    stored = layer.base_weight.detach()
    target = layer.to_out_in(stored).float()
    if not torch.isfinite(target).all():
        raise ValueError(f"refine_svdquant: layer {name!r} has non-finite weights")
    norm = target.norm().clamp_min(torch.finfo(torch.float32).tiny)
    delta = adapter.delta_weight()
    current = layer.to_out_in(quantizer(stored)).float()
    errors = [((target - current - delta).norm() / norm).item()]
    best = _Best(errors[0])
    for _ in range(iters):
        weight = layer.to_out_in(target - delta).to(stored.dtype)  # Linear: identity; Conv1D: .T
        quantized, amax = _fresh_quantize(quantizer, weight)
        a, b = svd_factors(target - layer.to_out_in(quantized).float(), adapter.rank, adapter.scale)
        a, b = a.to(adapter.lora_a.dtype), b.to(adapter.lora_b.dtype)
        delta = (b.float() @ a.float()) * adapter.scale
        errors.append(((target - layer.to_out_in(quantized).float() - delta).norm() / norm).item())
        if errors[-1] < best.error:
            best = _Best(errors[-1], weight.contiguous(), amax, a, b)
    return errors, best


def _targets(model: nn.Module, adapter_name: str) -> dict[str, LoRAModule]:
    layers = require_lora_layers(model, "refine_svdquant")
    check_adapter_names(layers, [adapter_name], "refine_svdquant")
    holders = {n: m for n, m in layers.items() if adapter_name in m.adapters}
    chosen = {n: m for n, m in holders.items() if find_weight_quantizer(m.base) is not None}
    for name, layer in chosen.items():
        if is_compressed(layer):
            raise compressed_error("refine_svdquant", name)
    if not chosen:
        raise ValueError(
            f"refine_svdquant: none of the {len(holders)} layers with adapter {adapter_name!r} has "
            "an enabled weight quantizer; call qpeft.quantize first"
        )
    return chosen


@torch.no_grad()
def refine_svdquant(
    model: nn.Module, adapter_name: str = "default", iters: int = 5
) -> dict[str, list[float]]:
    """Alternate ``Q <- quant(W - sBA)`` and ``BA <- SVD_r(W - Q)`` on every quantized LoRA layer.

    Args:
        model: a model with LoRA layers over quantized layers (``quantize`` and ``update_model``).
        adapter_name: the adapter whose factors are refined (other adapters are untouched).
        iters: number of iterations (>= 1).

    Returns:
        ``{layer name: [e_0, e_1, ..., e_iters]}``: the relative error
        ``||W0 - Q(W) - sBA||_F / ||W0||_F`` before refinement and after each iteration. Each
        layer keeps its best iterate (the minimum of its list). Layers with the adapter but no
        enabled weight quantizer are skipped.

    Raises:
        ValueError: ``iters`` < 1; no layer has the adapter; none of those has an enabled weight
            quantizer; a non-finite weight (names the layer). The model is then unchanged.
    """
    if not isinstance(iters, int) or iters < 1:
        raise ValueError(f"refine_svdquant: iters must be a positive integer, got {iters!r}")
    targets = _targets(model, adapter_name)
    results = {
        name: _refine_layer(layer, name, adapter_name, iters) for name, layer in targets.items()
    }
    for name, (_, best) in results.items():
        if best.weight is None:
            continue
        layer = targets[name]
        layer.base_weight.copy_(best.weight)
        if best.amax is not None:
            layer.weight_quantizer.amax = best.amax
        layer.adapters[adapter_name].lora_a.copy_(best.a)
        layer.adapters[adapter_name].lora_b.copy_(best.b)
    record(
        model,
        "refine_svdquant",
        {"adapter_name": adapter_name, "iters": iters, "layers": sorted(targets)},
    )
    return {name: errors for name, (errors, _) in results.items()}


@register_mode("refine_svdquant")
def _replay_refine(model: nn.Module, config: dict[str, Any]) -> None:
    # Its whole effect is in tensors (master weights, amax, factors) that the state_dict carries;
    # a replay before loading them only keeps the log entry.
    record(model, "refine_svdquant", config)
