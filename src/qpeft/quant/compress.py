"""``compress``: replace the master weights of frozen quantized layers by packed codes and scales.

A layer is compressed when it is a quantized ``nn.Linear`` or ``Conv1D`` (:class:`QuantLinear`,
:class:`QuantConv1D`, under a LoRA layer or not) whose weight quantizer is enabled, whose logical
name matches ``layer_patterns`` (:func:`qpeft.core.patterns.matches_pattern`) and whose weight is
frozen; layers whose weight quantizer is disabled are left as they are. The call first checks
every chosen layer (nothing changes if one is refused), then packs them one at a time, dropping
each master weight as soon as its codes exist, so its own peak memory is the model plus one layer.

The mode log records, per layer, the packing spec and the compute dtype; the replay (``restore``)
builds the packed layers with zero placeholders that the checkpoint's tensors then fill.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import nn

from ..core.modes import is_restoring, record, register_mode, swap_module
from ..core.patterns import matches_pattern
from ..core.wrapping import innermost
from .compress_experts import experts_refusal, pack_experts, replay_experts
from .compressed import (
    CompressedConv1D,
    CompressedLinear,
    PackedConv1D,
    PackedDense,
    PackedLinear,
    is_compressed,
)
from .compressed_experts import packed_buffer_names
from .experts import QuantExperts
from .layer import QuantConv1D, QuantLinear, QuantModule
from .packing import PackSpec, check_packable, pack, packed_layout
from .targets import logical_named_modules

__all__ = ["compress", "packed_weight", "ddp_skips_packed"]

_KINDS = {
    QuantLinear: (PackedLinear, CompressedLinear),
    QuantConv1D: (PackedConv1D, CompressedConv1D),
}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _slots(model: nn.Module) -> dict[str, tuple[str, QuantModule]]:
    """``{logical name: (physical path, quantized layer)}``."""
    return {
        logical: (physical, module)
        for physical, logical, module in logical_named_modules(model)
        if isinstance(module, QuantModule)
    }


def _spec(layer: QuantModule) -> PackSpec:
    q, raw = layer.weight_quantizer, innermost(layer)
    shape = tuple(raw.weight.shape)
    if type(layer) is QuantConv1D:
        shape = shape[::-1]
    blocks = None if q.block_sizes is None else tuple(sorted(q.block_sizes.items()))
    return PackSpec(q.fmt, shape, q.num_bits, q.axis, blocks, q.narrow_range)


def _refusal(name: str, layer: QuantModule, frozen: bool = True) -> str | None:
    """Why ``layer`` cannot be compressed, or None."""
    if isinstance(layer, QuantExperts):
        return experts_refusal(layer, frozen)
    if type(layer) not in _KINDS:
        return f"{type(layer).__name__} layers cannot be compressed (only QuantLinear, QuantConv1D)"
    weight, quantizer = innermost(layer).weight, layer.weight_quantizer
    if frozen and weight.requires_grad:
        return (
            "its weight is trainable (requires_grad); compress needs a frozen base: freeze it "
            "(update_model freezes the base by default, or weight.requires_grad_(False))"
        )
    if quantizer.collects_amax and not quantizer.dynamic and quantizer.amax is None:
        return "its weight quantizer is not calibrated (no amax); run qpeft.quantize first"
    reason = check_packable(quantizer)
    if reason is not None:
        return reason
    if str(weight.dtype).removeprefix("torch.") not in _DTYPES:
        return f"weights of dtype {weight.dtype} are not compressed"
    if not bool(torch.isfinite(weight).all()):
        return "its weight has non-finite values"
    return None


def _plan(model: nn.Module, layer_patterns: Any) -> dict[str, tuple[str, QuantModule]]:
    chosen = {}
    for name, (slot, layer) in _slots(model).items():
        if is_compressed(layer) or not matches_pattern(name, layer_patterns):
            continue
        quantizers = layer.quantizers()
        weight_names = [k for k in quantizers if k.endswith("weight_quantizer")]
        if not any(quantizers[k].is_enabled for k in weight_names):
            continue
        reason = _refusal(name, layer)
        if reason is not None:
            raise ValueError(f"compress: layer {name!r}: {reason}")
        chosen[name] = (slot, layer)
    if not chosen:
        raise ValueError(
            "compress: no quantized layer with an enabled weight quantizer matches "
            f"layer_patterns={layer_patterns!r} (call qpeft.quantize first)"
        )
    return chosen


def _build(layer: QuantModule, spec: PackSpec, tensors: dict[str, torch.Tensor], dtype) -> Any:
    packed_cls, wrapper_cls = _KINDS[type(layer)]
    raw = innermost(layer)
    packed = packed_cls(spec, tensors, raw.bias, dtype)
    quantizers = layer.quantizers()
    quantizers["weight_quantizer"].reset_amax()  # the packed scales hold it now
    return wrapper_cls(packed, **quantizers)


def _pack_layer(layer: QuantModule) -> tuple[PackSpec, dict[str, torch.Tensor]]:
    q, weight = layer.weight_quantizer, innermost(layer).weight.detach()
    oriented = weight.t().contiguous() if type(layer) is QuantConv1D else weight
    amax = q._fresh_amax(oriented) if q.dynamic else q.amax
    tensors, spec = pack(oriented, _spec(layer), amax)
    return spec, tensors


def packed_weight(layer: QuantModule) -> tuple[PackSpec, dict[str, torch.Tensor]]:
    """The packed codes and scales of a quantized ``nn.Linear`` / ``Conv1D`` layer: those it holds
    when compressed, else :func:`qpeft.quant.packing.pack` of its weight (nothing changes).

    Raises:
        ValueError: as :func:`compress` refuses the layer (the name is left to the caller).
    """
    if isinstance(layer, QuantExperts):
        raise ValueError("grouped experts have no 2-D packed weight (one per expert projection)")
    if is_compressed(layer):
        raw = innermost(layer)
        return raw.spec, raw.packed_tensors()
    reason = _refusal("", layer, frozen=False)
    if reason is not None:
        raise ValueError(reason)
    return _pack_layer(layer)


def compress(model: nn.Module, layer_patterns: Any = None) -> nn.Module:
    """Drop the master weight of every frozen quantized layer, keeping packed codes and scales.

    Outputs and gradients are bit-identical to the fake-quantized model's: each forward
    dequantizes ``weight_quantizer(W)`` exactly (:mod:`qpeft.quant.packing`). Input quantizers
    and LoRA adapters (before or after compress) are unchanged.

    Args:
        model: a quantized model (``qpeft.quantize``), with or without LoRA layers.
        layer_patterns: logical layer names to compress (a wildcard, callable or list, as
            :func:`qpeft.matches_pattern`); None: every quantized layer.

    Returns:
        The model to use from now on (``model``, or the new wrapper when ``model`` is itself a
        quantized layer).

    Raises:
        ValueError: naming the layer: a trainable weight, an uncalibrated weight quantizer, a format
            or layer kind with no packed layout (grouped experts), non-finite weights; or nothing
            to compress. The model is then untouched.
    """
    chosen = _plan(model, layer_patterns)
    log = {}
    for name in list(chosen):
        slot, layer = chosen.pop(name)  # no reference left: the master goes with the old layer
        if isinstance(layer, QuantExperts):
            new, log[name] = pack_experts(layer)
            model = swap_module(model, slot, new)
            continue
        dtype = innermost(layer).weight.dtype
        spec, tensors = _pack_layer(layer)
        model = swap_module(model, slot, _build(layer, spec, tensors, dtype))
        del layer
        log[name] = {"spec": spec.to_json(), "dtype": str(dtype).removeprefix("torch.")}
    record(model, "compress", {"layers": log})
    ddp_skips_packed(model)
    return model


def ddp_skips_packed(model: nn.Module) -> None:
    """Tell DDP to leave the packed buffers alone (``_ddp_params_and_buffers_to_ignore``): they
    are frozen and equal on every rank, DDP would broadcast the whole packed model at wrapping and
    before every forward, and gloo cannot broadcast fp8 scales. Called again after anything that
    renames them (a LoRA layer wrapping a compressed one); a model without packed layers is left
    as it is."""
    from torch.nn.parallel import DistributedDataParallel

    packed = {
        f"{name}.{key}" if name else key
        for name, module in model.named_modules()
        for key in _packed_buffers(module)
    }
    known = getattr(model, "_ddp_params_and_buffers_to_ignore", None)
    if not packed and known is None:
        return
    names = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    ignored = sorted(packed | {n for n in known or [] if n in names})  # drop stale names
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignored)


def _packed_buffers(module: nn.Module) -> list[str]:
    if isinstance(module, PackedDense):
        return list(module._buffers)
    return packed_buffer_names(module)  # a compressed raw experts module's packed projections


@register_mode("compress")
def _replay_compress(model: nn.Module, config: dict[str, Any]) -> nn.Module:
    slots = _slots(model)
    for name, entry in config["layers"].items():
        layer = slots.get(name, (None, None))[1]
        if isinstance(layer, QuantExperts) and not is_compressed(layer):
            model = swap_module(
                model, slots[name][0], replay_experts(name, layer, entry, is_restoring())
            )
            continue
        if name not in slots or type(slots[name][1]) not in _KINDS:
            raise ValueError(f"compress replay: model has no quantized layer {name!r}")
        slot, layer = slots[name]
        if not isinstance(entry, dict) or entry.get("dtype") not in _DTYPES or "spec" not in entry:
            raise ValueError(
                f"compress replay: layer {name!r} needs a 'spec' and a 'dtype' among "
                f"{sorted(_DTYPES)}, got {str(entry)[:80]}"
            )
        spec, dtype = PackSpec.from_json(entry["spec"]), _DTYPES[entry["dtype"]]
        weight = innermost(layer).weight
        if replace(spec, neg_zero=True) != _spec(layer):  # neg_zero depends on the values
            raise ValueError(
                f"compress replay: layer {name!r} records packing {spec}, but its quantizer "
                f"packs as {_spec(layer)} (the log and the checkpoint disagree)"
            )
        if weight.dtype != dtype or _spec(layer).shape != spec.shape:
            raise ValueError(
                f"compress replay: layer {name!r} has a {weight.dtype} weight of shape "
                f"{tuple(weight.shape)}, the log records {dtype} and {spec.shape}"
            )
        if is_restoring():  # the checkpoint's tensors fill these right after
            tensors = {
                k: torch.zeros(shape, dtype=dt, device=weight.device)
                for k, (shape, dt) in packed_layout(spec).items()
            }
        else:
            spec, tensors = _pack_layer(layer)
        model = swap_module(model, slot, _build(layer, spec, tensors, dtype))
    record(model, "compress", config)
    ddp_skips_packed(model)
    return model
