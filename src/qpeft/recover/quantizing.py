"""Quantize the student: through ``qpeft.quantize`` when the library has it, else a weight-only stand-in.

The stand-in exists only until ``qpeft.quantize`` lands: it wraps each targeted ``nn.Linear`` in a
:class:`~qpeft.wrapping.ModuleWrapper` exposing ``.weight_quantizer`` (so ``svdquant`` init works)
and computes ``y = x @ Q(W).T + b`` with ``Q`` a pure fake-quant function of
:mod:`qpeft.quant.numerics`; the frozen weight's quantized value is computed once and cached.
It supports weight-only formats; formats that quantize inputs need ``qpeft.quantize``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from ..patterns import matches_pattern
from ..quant import numerics
from ..wrapping import ModuleWrapper

__all__ = ["FORMATS", "quantize_student", "weight_formats"]


def _per_row_int8(w: torch.Tensor) -> torch.Tensor:
    return numerics.fake_quant_int(w, w.float().abs().amax(dim=-1, keepdim=True), 8)


# CLI format name -> weight fake-quant function of the stand-in (None: needs qpeft.quantize).
_WEIGHT_FNS: dict[str, Callable[[torch.Tensor], torch.Tensor] | None] = {
    "nvfp4_weight_only": lambda w: numerics.fake_quant_nvfp4(w, w.float().abs().amax()),
    "int4": partial(numerics.fake_quant_int_blockwise, num_bits=4, block_size=128),
    "int8_weight_only": _per_row_int8,
    "fp8_weight_only": lambda w: numerics.fake_quant_fp8(w, w.float().abs().amax()),
    "mxfp4_weight_only": numerics.fake_quant_mxfp4,
    "nvfp4": None,
    "int8": None,
    "fp8": None,
    "mxfp4": None,
}
FORMATS = tuple(_WEIGHT_FNS)


def weight_formats() -> tuple[str, ...]:
    """Formats that quantize weights only (no input calibration)."""
    return tuple(f for f in FORMATS if f.endswith("_weight_only") or f == "int4")


class _WeightQuantizer(nn.Module):
    """``w -> Q(w)``, caching the result for the last weight tensor version seen."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.fn = fn
        self._key: tuple[int, int] | None = None
        self._cached: torch.Tensor | None = None

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        key = (id(w), w._version)
        if self._key != key or w.requires_grad:
            self._cached = self.fn(w.detach())
            self._key = key
        return self._cached


class _StandInQuantLinear(ModuleWrapper):
    def __init__(self, base: nn.Linear, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__(base)
        self.weight_quantizer = _WeightQuantizer(fn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight_quantizer(self.base.weight), self.base.bias)


def quantize_student(
    model: nn.Module, fmt: str, targets: list[str], forward_loop: Callable[[nn.Module], None] | None
) -> nn.Module:
    """Fake-quantize the linear layers of ``model`` whose names match ``targets`` in format ``fmt``.

    Raises:
        ValueError: unknown format, or an input-quantizing format without ``qpeft.quantize``.
    """
    if fmt not in _WEIGHT_FNS:
        raise ValueError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    import qpeft

    if hasattr(qpeft, "quantize"):  # the library's presets (they leave output heads alone)
        return qpeft.quantize(model, fmt, forward_loop)
    fn = _WEIGHT_FNS[fmt]
    if fn is None:
        raise ValueError(f"format {fmt!r} quantizes inputs and needs qpeft.quantize, not in this build")
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and matches_pattern(name, targets):
            model.set_submodule(name, _StandInQuantLinear(module, fn))
    return model

