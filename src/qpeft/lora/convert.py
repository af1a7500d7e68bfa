"""``update_model``: attach or update a named LoRA adapter on the layers an ``adapter_cfg`` targets.

The call runs in two phases. *Plan*: resolve every layer's attributes, check them against existing
adapters, build and initialise every new adapter; anything wrong raises here, before the model is
touched. *Apply*: wrap layers, attach adapters, set flags, record the mode. A failing call therefore
leaves the model exactly as it was.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..core.modes import record, register_mode, swap_module
from ..core.patterns import merge_matching
from ..core.wrapping import ModuleWrapper, innermost
from ..quant.compress import ddp_skips_packed
from .adapter import AdapterState, LoRAAdapter
from .config import PEFTAttributeConfig, PEFTConfig
from .init import init_adapter
from .layer import LoRAModule, is_peft_model, lora_layers
from .registry import lora_class_for
from .targets import experts_class, is_target_name, resolve_experts

__all__ = ["update_model", "is_peft_model", "lora_layers", "candidate_layers"]

_FIXED = ("rank", "lora_a_init", "lora_b_init", "lora_init_method")


def candidate_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Modules LoRA can target, by name: LoRA layers and registered base types, outermost
    wrapper."""
    found: dict[str, nn.Module] = {}
    inside: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(p) for p in inside):
            continue
        if isinstance(module, LoRAModule) or lora_class_for(module) is not None:
            found[name] = module
        if isinstance(module, ModuleWrapper):
            inside.append(name + "." if name else "")
    return found


@dataclass
class _Plan:
    wrap: dict[str, LoRAModule] = field(default_factory=dict)  # name -> new wrapper
    add: dict[str, LoRAAdapter] = field(default_factory=dict)  # name -> new adapter
    update: dict[str, PEFTAttributeConfig] = field(default_factory=dict)  # existing adapter
    resolved: dict[str, dict[str, Any]] = field(default_factory=dict)  # for the mode log


def _check_update(adapter: LoRAAdapter, merged: dict[str, Any], name: str, layer: str) -> None:
    if adapter.merged and "scale" in merged and float(merged["scale"]) != adapter.scale:
        # unmerge subtracts scale * B @ A: the scale must stay what was folded in
        raise ValueError(
            f"adapter {name!r} on layer {layer!r} is merged; unmerge it before changing its scale"
        )
    fixed = adapter.config
    for key in [k for k in _FIXED if k in merged]:
        if getattr(PEFTAttributeConfig(**{key: merged[key]}), key) != getattr(fixed, key):
            raise ValueError(
                f"adapter {name!r} on layer {layer!r}: cannot change {key} from "
                f"{getattr(fixed, key)!r} to {merged[key]!r} (only scale and enable can change)"
            )
    wanted = PEFTAttributeConfig(lora_dtype=merged.get("lora_dtype")).torch_dtype()
    current = next(adapter.parameters()).dtype
    if wanted is not None and wanted != current:
        raise ValueError(
            f"adapter {name!r} on layer {layer!r}: cannot change lora_dtype from "
            f"{current} to {wanted}"
        )


def _plan_update(
    plan: _Plan, name: str, layer_name: str, existing: LoRAAdapter, merged: dict[str, Any]
) -> None:
    _check_update(existing, merged, name, layer_name)
    changes = {k: merged[k] for k in ("scale", "enable") if k in merged}
    attrs = PEFTAttributeConfig(**{**existing.config.model_dump(), **changes})
    plan.update[layer_name] = attrs
    plan.resolved[layer_name] = attrs.model_dump()


def _plan_new(
    plan: _Plan,
    layer_name: str,
    module: nn.Module,
    merged: dict[str, Any],
    only: list[str] | None = None,
) -> None:
    attrs = PEFTAttributeConfig(**merged)
    plan.resolved[layer_name] = attrs.model_dump()
    if not attrs.enable:
        return
    layer = module if isinstance(module, LoRAModule) else lora_class_for(module)(module)
    extra = {} if only is None else {"only": only}  # experts: the projections that get factors
    adapter = layer.new_adapter(attrs, attrs.torch_dtype(), **extra)
    init_adapter(adapter, layer, layer_name)
    if layer is not module:
        plan.wrap[layer_name] = layer
    plan.add[layer_name] = adapter


def _plan_experts(
    plan: _Plan, cfg: PEFTConfig, layer_name: str, module: nn.Module, names: list[str]
) -> None:
    target = resolve_experts(layer_name, names, cfg.adapter_cfg, cfg.adapter_name)
    if target is None:
        return
    name = cfg.adapter_name
    existing = (
        module.adapters[name]
        if isinstance(module, LoRAModule) and name in module.adapters
        else None
    )
    if existing is None:
        _plan_new(plan, layer_name, module, target.merged, only=target.enabled)
        have = target.enabled
    else:
        have = list(existing.factors)
        on = [p for p in target.enabled if p in have]
        off = [p for p in target.disabled if p in have]
        # an update adds a projection only by saying enable: True for it (scale-only updates of
        # a pattern that also matches the adapter's skipped projections leave them skipped)
        _check_projections(name, layer_name, have, target.explicit, off if on else [])
        if on or off:
            _plan_update(plan, name, layer_name, existing, target.merged)
    if have:  # the replay recreates exactly these projections
        plan.resolved.update(
            {f"{layer_name}.{p}": {"enable": False} for p in names if p not in have}
        )
    elif layer_name not in plan.resolved:
        plan.resolved.update({f"{layer_name}.{p}": {"enable": False} for p in target.disabled})


def _check_projections(
    name: str, layer_name: str, have: list[str], enabled: list[str], dropped: list[str]
) -> None:
    added = [p for p in enabled if p not in have]
    if added or dropped:
        verb, proj = ("add", added[0]) if added else ("drop", dropped[0])
        raise ValueError(
            f"adapter {name!r} on experts layer {layer_name!r} covers projections {have}: cannot "
            f"{verb} "
            f"projection {proj!r} (set enable False on '{layer_name}.<projection>' for the others, "
            "or "
            "use a new adapter name)"
        )


def _plan_layer(plan: _Plan, cfg: PEFTConfig, layer_name: str, module: nn.Module) -> None:
    experts = experts_class(module)
    if experts is not None:
        _plan_experts(plan, cfg, layer_name, module, list(experts.projections(innermost(module))))
        return
    merged = merge_matching(layer_name, cfg.adapter_cfg)
    if merged is None:
        return
    name = cfg.adapter_name
    if isinstance(module, LoRAModule) and name in module.adapters:
        _plan_update(plan, name, layer_name, module.adapters[name], merged)
        return
    _plan_new(plan, layer_name, module, merged)


def _make_plan(model: nn.Module, cfg: PEFTConfig) -> _Plan:
    layers = candidate_layers(model)
    if not layers:
        raise ValueError(
            "model has no layer that LoRA supports (nn.Linear, Conv1D, or a registered type)"
        )
    plan = _Plan()
    for layer_name, module in layers.items():
        _plan_layer(plan, cfg, layer_name, module)
    if not plan.resolved:
        patterns = [
            p if isinstance(p, str) else getattr(p, "__name__", repr(p)) for p in cfg.adapter_cfg
        ]
        raise ValueError(
            f"adapter_cfg patterns {patterns} match none of the {len(layers)} supported layers"
        )
    return plan


def _set_base_trainable(model: nn.Module, trainable: bool) -> None:
    adapter_params = {
        id(p) for m in model.modules() if isinstance(m, AdapterState) for p in m.parameters()
    }
    for param in model.parameters():
        if id(param) not in adapter_params:
            param.requires_grad_(trainable)


def _apply(model: nn.Module, cfg: PEFTConfig, plan: _Plan) -> nn.Module:
    for layer_name, wrapper in plan.wrap.items():
        model = swap_module(model, layer_name, wrapper)
    if plan.wrap:
        ddp_skips_packed(model)  # a wrapped compressed layer's buffers have new names
    layers = lora_layers(model)
    for layer_name, adapter in plan.add.items():
        layers[layer_name].adapters[cfg.adapter_name] = adapter
    for layer_name, attrs in plan.update.items():
        adapter = layers[layer_name].adapters[cfg.adapter_name]
        adapter.scale, adapter.enable = float(attrs.scale), bool(attrs.enable)
    _set_base_trainable(model, not cfg.freeze_base_model)
    for layer_name in [*plan.add, *plan.update]:
        layers[layer_name].adapters[cfg.adapter_name].requires_grad_(not cfg.freeze_lora_weights)
    return model


def update_model(model: nn.Module, config: PEFTConfig | dict[str, Any]) -> nn.Module:
    """Add adapter ``config.adapter_name`` to the layers its ``adapter_cfg`` targets, or update it.

    The first call converts matching layers (``nn.Linear``, transformers ``Conv1D``, registered
    types) into LoRA layers; later calls add more named adapters. For each layer, every matching
    pattern is merged in order, key by key; ``enable: False`` means no adapter there. With an
    existing adapter name, ``scale`` and ``enable`` are updated in place and its weights kept.

    A grouped-experts layer ``L`` (:class:`~qpeft.LoRAExperts`) can also be addressed per
    projection as ``L.p`` (``*mlp.experts.down_proj``, ``*experts.fc1``); string and callable
    patterns are tried on both ``L`` and ``L.p``. Projection ``p`` gets the ordered merge of every
    entry matching ``L`` or ``L.p``; the adapter on ``L`` has factors only for the projections
    whose merged ``enable`` is True, and all their other attributes must be equal.

    Args:
        model: any ``nn.Module``; it is modified in place.
        config: a :class:`PEFTConfig` or a dict of its fields.

    Returns:
        The model to use from now on: ``model`` itself, changed in place, or, when ``model`` is
        itself a LoRA-capable layer (a bare ``nn.Linear``, or one ``qpeft.quantize`` wrapped), the
        LoRA layer around it (the passed object is then its ``base``; the mode log moves to it).

    Raises:
        ValueError: invalid config (names the field and pattern); no supported layer matched; an
            update that changes rank, initializers, init method or dtype (names adapter and layer);
            svdquant on non-finite weights (names the layer); enabled projections of one experts
            layer with different attributes, or an update that adds or drops projections of an
            existing experts adapter (names adapter, layer and projection). The model is then left
            untouched.
    """
    cfg = config if isinstance(config, PEFTConfig) else PEFTConfig.model_validate(config)
    plan = _make_plan(model, cfg)
    model = _apply(model, cfg, plan)
    record(model, "peft", {**cfg.model_dump(exclude={"adapter_cfg"}), "adapter_cfg": plan.resolved})
    return model


@register_mode("peft")
def _replay_peft(model: nn.Module, config: dict[str, Any]) -> nn.Module:
    # Recorded patterns are concrete layer names: each must exist, or this is another model.
    layers = candidate_layers(model)
    for name in config.get("adapter_cfg", {}):
        if not is_target_name(name, layers):
            raise ValueError(
                f"layer {name!r} of the recorded adapter {config.get('adapter_name')!r} "
                "is not a LoRA-capable layer of this model"
            )
    return update_model(model, config)
