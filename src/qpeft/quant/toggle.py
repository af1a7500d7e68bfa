"""``enable_quantizer`` / ``disable_quantizer``: switch quantizers on or off by logical name.

Quantizer names are ``<logical layer name>.weight_quantizer`` and ``.input_quantizer`` (grouped
experts: ``.<projection>_weight_quantizer``; see :mod:`qpeft.quant.targets`). A disabled quantizer
returns its input unchanged, so with every quantizer disabled a quantized model computes exactly
what the unquantized one does. Each call records the concrete quantizer names it switched.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..core.modes import record, register_mode
from ..core.patterns import matches_pattern
from .quantizer import TensorQuantizer
from .targets import quantized_layers

__all__ = ["enable_quantizer", "disable_quantizer", "model_quantizers"]


def model_quantizers(model: nn.Module) -> dict[str, TensorQuantizer]:
    """Every quantizer of ``model`` by logical name (``<layer>.weight_quantizer``,
    ``<layer>.input_quantizer``...)."""
    return {
        f"{layer_name}.{kind}": quantizer
        for layer_name, layer in quantized_layers(model).items()
        for kind, quantizer in layer.quantizers().items()
    }


def _set(model: nn.Module, names: list[str], value: bool, mode: str) -> None:
    quantizers = model_quantizers(model)
    missing = [n for n in names if n not in quantizers]
    if missing:
        raise ValueError(f"{mode}: model has no quantizer {missing[0]!r}")
    for name in names:
        (quantizers[name].enable if value else quantizers[name].disable)()
    record(model, mode, {"quantizers": names})


def _toggle(model: nn.Module, pattern: Any, value: bool, mode: str) -> nn.Module:
    quantizers = model_quantizers(model)
    if not quantizers:
        raise ValueError(f"{mode}: model has no quantizers; call qpeft.quantize first")
    names = [n for n in quantizers if matches_pattern(n, pattern)]
    if not names:
        label = pattern if isinstance(pattern, str) else getattr(pattern, "__name__", repr(pattern))
        raise ValueError(
            f"{mode}: pattern {label!r} matches none of the {len(quantizers)} quantizers"
        )
    _set(model, names, value, mode)
    return model


def enable_quantizer(model: nn.Module, pattern: Any) -> nn.Module:
    """Enable every quantizer whose logical name matches ``pattern``.

    Args:
        model: a model quantized by :func:`qpeft.quantize`.
        pattern: a wildcard (``"*input_quantizer"``, ``"*layers.0.*"``), a callable
            ``name -> bool``, or a list of them; None matches every quantizer.

    Raises:
        ValueError: the model has no quantizers, or the pattern matches none (names the pattern).
        TypeError: a pattern of an unsupported type.
    """
    return _toggle(model, pattern, True, "enable_quantizer")


def disable_quantizer(model: nn.Module, pattern: Any) -> nn.Module:
    """Disable every quantizer whose logical name matches ``pattern``; as
    :func:`enable_quantizer`."""
    return _toggle(model, pattern, False, "disable_quantizer")


@register_mode("enable_quantizer")
def _replay_enable(model: nn.Module, config: dict[str, Any]) -> None:
    _set(model, config["quantizers"], True, "enable_quantizer")


@register_mode("disable_quantizer")
def _replay_disable(model: nn.Module, config: dict[str, Any]) -> None:
    _set(model, config["quantizers"], False, "disable_quantizer")
