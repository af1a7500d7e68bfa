"""Scenario 3: a LoRA training step on an ``nvfp4_weight_only`` base vs the plain base.

Three candidates, interleaved: LoRA on the plain base; LoRA on the quantized base (qpeft caches the
frozen weight's ``Q(W)``); and the same with the cache cleared before every forward, i.e.
re-quantizing the weight at every forward as the reference implementation does.
"""

from __future__ import annotations

import copy

import qpeft
from qpeft.quant.layer import QuantModule

from ..harness import interleaved
from ..models import base_model, qpeft_model, token_batch
from ..report import Section
from .common import ratio_row, timing_lines
from .train import _step

RANK, TARGET, PRESET = 16, 1.10, "nvfp4_weight_only"


def _requantize_every_forward(model) -> None:
    """Clear each quantized layer's weight cache before its forward (benchmark-only reference)."""

    def clear(module, _inputs) -> None:
        for cache in module._weight_caches.values():
            cache.clear()

    for module in model.modules():
        if isinstance(module, QuantModule):
            module.register_forward_pre_hook(clear)


def run(repeats: int) -> Section:
    section = Section("quant", "3. quantized base")
    base, ids = base_model(), token_batch()
    quantized = copy.deepcopy(base)
    qpeft.quantize(quantized, PRESET)
    models = {"plain": qpeft_model(base, RANK), "nvfp4": qpeft_model(quantized, RANK)}
    models["nvfp4-requant"] = qpeft_model(quantized, RANK)
    _requantize_every_forward(models["nvfp4-requant"])
    t = interleaved({n: _step(m, ids) for n, m in models.items()}, repeats, warmup=1)
    section.rows.append(
        ratio_row(f"rank {RANK}: {PRESET} LoRA step / plain LoRA step", t, "nvfp4", "plain", TARGET)
    )
    section.rows.append(
        ratio_row(f"rank {RANK}: re-quantizing every forward / cached", t, "nvfp4-requant", "nvfp4")
    )
    section.notes += timing_lines(t)
    section.notes.append(
        "training step = forward + backward of the LoRA factors (base frozen); "
        "lm_head stays unquantized (the preset's rule)."
    )
    return section
