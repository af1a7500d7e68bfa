"""``quantize``: put fake quantizers on every targeted layer and calibrate them.

``config`` is a preset name (:data:`PRESETS`) or a :class:`QuantizeConfig` (or its dict):
``quant_cfg`` is an ordered map from quantizer-name patterns (``"*weight_quantizer"``,
``"*input_quantizer"``, ``"*lm_head*"``, or callables) to ModelOpt-style attribute dicts. Each
quantizer ``<layer>.weight_quantizer`` / ``<layer>.input_quantizer`` (grouped MoE experts:
``<layer>.<projection>_weight_quantizer``, no input quantizer) merges every matching entry in
order, key by key (:func:`qpeft.core.patterns.merge_matching`); one that no entry matches is
disabled,
and a layer none of whose quantizers is matched is left alone. Layers whose class is one of
ModelOpt's ``DISABLED_PARENT_CLASSES`` get disabled quantizers.

The call runs in two phases. *Plan*: resolve and validate every quantizer, build it, compute the
weight amax from the weight (max |W| per tensor / per row, as ModelOpt's max calibration of a
weight gives), and calibrate the input amax by running ``forward_loop(model)`` on the model with
every quantizer off (ModelOpt's max calibration also runs on the unquantized model), recording the
inputs through temporary hooks. *Apply*: insert the wrappers, record the mode. Any error in the
plan leaves the model exactly as it was.

Quantizing an already quantized layer REPLACES its quantizers with the new config (the wrapper is
rebuilt around the same raw layer and recalibrated); layers the new config does not match keep
theirs. The mode log records each quantizer's resolved attributes and amax shape, so a replay on a
fresh model rebuilds the same structure with zero placeholder ``_amax`` buffers that a strict
``load_state_dict`` fills.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator
from torch import nn

from ..core.modes import record, register_mode, swap_module
from ..core.patterns import merge_matching
from .calibrate import calibrate_inputs
from .config import QuantizerAttributeConfig
from .fused_scales import tie_scales
from .layer import QuantModule
from .presets import DISABLED_PARENT_CLASSES, PRESETS
from .quantizer import TensorQuantizer
from .targets import Target, quant_targets

__all__ = ["QuantizeConfig", "quantize"]

_FIELDS = set(QuantizerAttributeConfig.model_fields)


class QuantizeConfig(BaseModel):
    """What :func:`quantize` does: an ordered quantizer pattern map and the calibration
    algorithm."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    quant_cfg: dict[Any, Any]
    algorithm: Literal["max"] = "max"

    @field_validator("quant_cfg", mode="before")
    @classmethod
    def _check_entries(cls, value: Any) -> Any:
        if not isinstance(value, dict) or not value:
            raise ValueError("quant_cfg: expected a non-empty dict {pattern: attributes}")
        for pattern, attrs in value.items():
            _check_entry(pattern, attrs)
        return value


def _check_entry(pattern: Any, attrs: Any) -> None:
    label = pattern if isinstance(pattern, str) else getattr(pattern, "__name__", repr(pattern))
    if not (isinstance(pattern, str) or callable(pattern)):
        raise ValueError(f"quant_cfg: pattern {pattern!r} must be a wildcard string or a callable")
    if isinstance(attrs, QuantizerAttributeConfig):
        return
    if not isinstance(attrs, dict):
        raise ValueError(
            f"quant_cfg[{label!r}]: attributes must be a dict, got {type(attrs).__name__}"
        )
    unknown = sorted(set(attrs) - _FIELDS)
    if unknown:
        raise ValueError(
            f"quant_cfg[{label!r}]: unknown field(s) {unknown}; known: {sorted(_FIELDS)}"
        )
    try:  # field values alone; combinations are checked once merged per quantizer
        QuantizerAttributeConfig(**{**attrs, "enable": False})
    except ValidationError as err:
        raise ValueError(f"quant_cfg[{label!r}]: {_first_error(err)}") from None


def _first_error(err: ValidationError) -> str:
    first = err.errors()[0]
    msg = first["msg"].removeprefix("Value error, ")
    loc = ".".join(str(p) for p in first["loc"])
    return f"{loc}: {msg}" if loc else msg


def _as_config(config: str | QuantizeConfig | dict[str, Any]) -> QuantizeConfig:
    if isinstance(config, str):
        if config not in PRESETS:
            raise ValueError(f"unknown quantization preset {config!r}; presets: {sorted(PRESETS)}")
        return QuantizeConfig(quant_cfg=PRESETS[config])
    if isinstance(config, QuantizeConfig):
        return config
    if isinstance(config, dict):
        try:
            return QuantizeConfig.model_validate(config)
        except ValidationError as err:
            raise ValueError(f"quantize config: {_first_error(err)}") from None
    raise TypeError(
        f"config must be a preset name, a QuantizeConfig or a dict, got {type(config).__name__}"
    )


def _resolve(name: str, pattern_map: dict[Any, Any], off: bool) -> QuantizerAttributeConfig | None:
    merged = merge_matching(name, pattern_map)
    if merged is None:
        return None
    if off:
        merged = {**merged, "enable": False}
    try:
        return QuantizerAttributeConfig(**merged)
    except ValidationError as err:
        raise ValueError(
            f"quantizer {name!r}: {_first_error(err)} (merged attributes {merged})"
        ) from None


def _disabled_parent(raw: nn.Module) -> bool:
    return any(cls.__name__ in DISABLED_PARENT_CLASSES for cls in type(raw).__mro__)


def _build(
    target: Target, attrs: dict[str, QuantizerAttributeConfig | None], name: str
) -> QuantModule:
    quantizers: dict[str, TensorQuantizer] = {}
    for kind, cls in target.wrapper.quantizer_classes(target.raw).items():
        cfg = attrs.get(kind) or QuantizerAttributeConfig(enable=False)
        label = f"{name}.{kind}"
        try:
            quantizers[kind] = cls.from_config(cfg, name=label)
        except ValueError as err:  # e.g. an axis this layer's weight does not have
            raise ValueError(f"quantizer {label!r}: {err}") from None
    return target.wrapper(target.raw, **quantizers)


@torch.no_grad()
def _calibrate_weights(layer: QuantModule) -> None:
    quantizers = layer.quantizers()
    for kind, weight in layer.weights().items():
        if quantizers[kind].is_enabled:
            with quantizers[kind].calibrating():
                quantizers[kind](weight)


def _plan(model: nn.Module, cfg: QuantizeConfig) -> tuple[dict[str, QuantModule], dict[str, Any]]:
    targets = quant_targets(model)
    if not targets:
        raise ValueError(
            "model has no layer that can be quantized (nn.Linear, Conv1D, or a registered type)"
        )
    wrappers: dict[str, QuantModule] = {}
    resolved: dict[str, Any] = {}
    for name, target in targets.items():
        off = _disabled_parent(target.raw)
        kinds = target.wrapper.quantizer_classes(target.raw)
        attrs = {k: _resolve(f"{name}.{k}", cfg.quant_cfg, off) for k in kinds}
        if all(a is None for a in attrs.values()):
            continue
        wrappers[name] = _build(target, attrs, name)
        _calibrate_weights(wrappers[name])
        resolved[name] = {
            k: (a or QuantizerAttributeConfig(enable=False)).model_dump(mode="json")
            for k, a in attrs.items()
        }
    if not wrappers:
        patterns = [
            p if isinstance(p, str) else getattr(p, "__name__", repr(p)) for p in cfg.quant_cfg
        ]
        raise ValueError(
            f"quant_cfg patterns {patterns} match no quantizer of the {len(targets)} quantizable "
            "layers"
        )
    return wrappers, resolved


def _apply(model: nn.Module, wrappers: dict[str, QuantModule]) -> nn.Module:
    """Insert the wrappers; the model's root afterwards (the wrapper, for a root layer)."""
    targets = quant_targets(model)
    for name, wrapper in wrappers.items():
        model = swap_module(model, targets[name].slot, wrapper)
    return model


def _amax_shape(quantizer: TensorQuantizer) -> list[int] | None:
    return None if quantizer.amax is None else list(quantizer.amax.shape)


def _log_entry(
    algorithm: str, resolved: dict[str, Any], wrappers: dict[str, QuantModule]
) -> dict[str, Any]:
    layers = {
        name: {
            kind: {"attributes": resolved[name][kind], "amax_shape": _amax_shape(q)}
            for kind, q in w.quantizers().items()
        }
        for name, w in wrappers.items()
    }
    return {"algorithm": algorithm, "layers": layers}


def _warn_uncalibrated(wrappers: dict[str, QuantModule]) -> None:
    missing = [
        q.name
        for w in wrappers.values()
        for q in w.input_quantizers().values()
        if q.is_enabled and q.needs_amax and q.amax is None
    ]
    if missing:
        warnings.warn(
            f"{len(missing)} input quantizer(s) need a calibrated amax and have none (no "
            "forward_loop "
            f"or never reached), e.g. {missing[0]!r}: the first forward through them will raise",
            stacklevel=3,
        )


def quantize(
    model: nn.Module,
    config: str | QuantizeConfig | dict[str, Any],
    forward_loop: Callable[..., Any] | None = None,
    *,
    tie_fused_scales: bool = False,
) -> nn.Module:
    """Fake-quantize ``model`` in place: wrap targeted layers with weight and input quantizers.

    Args:
        model: any ``nn.Module`` (plain or already converted by :func:`qpeft.update_model`).
        config: a preset name (``int8``, ``int8_weight_only``, ``int4``, ``fp8``,
            ``fp8_weight_only``, ``nvfp4``, ``nvfp4_weight_only``, ``mxfp4``, ``fp8_dynamic``,
            ``int8_dynamic``, ``fp8_block128``), a
            :class:`QuantizeConfig`, or a dict ``{"quant_cfg": {pattern: attrs}, "algorithm":
            "max"}``.
        forward_loop: ``forward_loop(model)`` runs calibration data through the model; it sets the
            input quantizers' amax (max calibration). A callable taking no positional argument is
            called as ``forward_loop()``, as ModelOpt allows. Dynamic quantizers need none.
            Without it, static input quantizers stay uncalibrated and raise at their first
            forward (a warning says so).
        tie_fused_scales: give the layers an engine fuses (q/k/v, gate/up siblings) the group's
            max of every per-tensor amax, as engines will (:mod:`qpeft.quant.fused_scales`);
            recorded in the mode log.

    Returns:
        The model to use from now on: ``model`` itself, changed in place, or, when ``model`` is
        itself a quantizable layer (a bare ``nn.Linear``), the quantized wrapper around it (the
        passed object is then its ``base``; the mode log moves to the wrapper).

    Raises:
        ValueError: unknown preset (lists the presets), invalid config (names the field and
            pattern or quantizer), no quantizable layer or no quantizer matched. TypeError: bad
            config type. Any exception from ``forward_loop`` propagates. The model is then
            untouched.
    """
    cfg = _as_config(config)
    wrappers, resolved = _plan(model, cfg)
    if forward_loop is not None:
        calibrate_inputs(model, wrappers, quant_targets(model), forward_loop)
    if not isinstance(tie_fused_scales, bool):
        raise TypeError(f"tie_fused_scales must be a bool, got {tie_fused_scales!r}")
    tied = tie_scales(wrappers) if tie_fused_scales else []
    model = _apply(model, wrappers)
    _warn_uncalibrated(wrappers)
    entry = _log_entry(cfg.algorithm, resolved, wrappers)
    if tie_fused_scales:
        entry["tied_scales"] = tied  # the values are the amax tensors a checkpoint holds
    record(model, "quantize", entry)
    return model


def rebuild(model: nn.Module, entry: dict[str, Any]) -> nn.Module:
    """Rebuild the quantized layers a ``quantize`` log entry describes, with zero placeholder amax.

    Returns the model's root afterwards (a root layer's new wrapper).

    Raises:
        ValueError: if a recorded layer does not exist in ``model`` (model unchanged).
    """
    targets = quant_targets(model)
    missing = sorted(set(entry["layers"]) - set(targets))
    if missing:
        raise ValueError(f"quantize replay: model has no quantizable layer {missing[0]!r}")
    wrappers = {}
    for name, layer in entry["layers"].items():
        attrs = {k: QuantizerAttributeConfig(**v["attributes"]) for k, v in layer.items()}
        wrapper = _build(targets[name], attrs, name)
        device = next(iter(wrapper.weights().values())).device
        for kind, quantizer in wrapper.quantizers().items():
            shape = layer[kind]["amax_shape"] if kind in layer else None
            if shape is not None:
                quantizer.amax = torch.zeros(shape, device=device)
        wrappers[name] = wrapper
    return _apply(model, wrappers)


@register_mode("quantize")
def _replay_quantize(model: nn.Module, config: dict[str, Any]) -> nn.Module:
    model = rebuild(model, config)
    record(model, "quantize", config)
    return model
