"""Helpers shared by the scenarios: ratio rows, the simple-path switch, HF PEFT availability."""

from __future__ import annotations

import importlib.util
import types

import qpeft
from qpeft.lora.layer import reference_forward

from ..harness import Timing
from ..report import Row


def has_peft() -> bool:
    """Whether HF PEFT (an optional peer) is installed."""
    return importlib.util.find_spec("peft") is not None


def ratio_row(
    label: str, t: dict[str, Timing], num: str, den: str, target: float | None = None
) -> Row:
    """Row ``num / den`` of medians, with ``<= target`` when given."""
    value = t[num].median / t[den].median
    shown = f"{value:.3f}x ({t[num].median * 1e3:.1f} / {t[den].median * 1e3:.1f} ms)"
    if target is None:
        return Row(label, shown)
    return Row(label, shown, f"<= {target:.2f}x", value <= target)


def use_simple_path(model) -> None:
    """Make every LoRA layer of ``model`` use the simple reference path (a straightforward
    wrapper)."""

    def forward(self, x, *args, **kwargs):
        return reference_forward(self, x, self.base(x, *args, **kwargs))

    for layer in qpeft.lora_layers(model).values():
        layer.forward = types.MethodType(forward, layer)


def timing_lines(t: dict[str, Timing]) -> list[str]:
    """One note line per candidate: median and quartiles."""
    return [
        f"`{n}`: median {v.median * 1e3:.1f} ms (quartiles {v.q1 * 1e3:.1f}-{v.q3 * 1e3:.1f}, "
        f"{v.repeats} repeats)"
        for n, v in t.items()
    ]
