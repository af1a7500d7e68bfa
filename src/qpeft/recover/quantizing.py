"""Quantize the student with a ``qpeft.quantize`` preset; calibrate inputs only when the format has
them. With ``tie`` the layers an engine fuses (q/k/v, gate/up) share their per-tensor scales
(``tie_fused_scales=True``), so the student trains on the numerics its ``deploy/`` checkpoint
serves."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ..quant.api import quantize
from ..quant.presets import PRESETS

__all__ = ["FORMATS", "quantizes_inputs", "quantize_student"]

FORMATS = tuple(PRESETS)


def quantizes_inputs(fmt: str) -> bool:
    """Whether preset ``fmt`` has enabled input quantizers (which need calibration)."""
    return bool(PRESETS[fmt].get("*input_quantizer", {}).get("enable", False))


def quantize_student(
    model: nn.Module, fmt: str, forward_loop: Callable[[nn.Module], None], tie: bool = False
) -> nn.Module:
    """Fake-quantize ``model`` in place with preset ``fmt`` (``tie``: fused groups' per-tensor
    scales tied); ``forward_loop`` calibrates input formats.

    Raises:
        ValueError: unknown format (lists the known ones), or what ``qpeft.quantize`` raises.
    """
    if fmt not in PRESETS:
        raise ValueError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    return quantize(
        model, fmt, forward_loop if quantizes_inputs(fmt) else None, tie_fused_scales=tie
    )
