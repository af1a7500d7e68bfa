"""Scenario 2: inference forward with adapters unmerged, vs the base model and HF PEFT."""

from __future__ import annotations

import copy

import torch

from ..harness import interleaved
from ..models import base_model, hf_model, qpeft_model, token_batch
from ..report import Section
from .common import has_peft, ratio_row, timing_lines

RANK, TARGET = 16, 1.08


def _forward(model, ids):
    @torch.no_grad()
    def forward():
        model(input_ids=ids)

    return forward


def run(repeats: int) -> Section:
    section = Section("infer", "2. inference forward")
    base, ids = base_model().eval(), token_batch()
    models = {
        "base": copy.deepcopy(base),
        "qpeft": qpeft_model(base, RANK).eval(),
    }
    if has_peft():
        models["hf-peft"] = hf_model(base, RANK).eval()
    t = interleaved({n: _forward(m, ids) for n, m in models.items()}, repeats)
    section.rows.append(ratio_row(f"rank {RANK}: qpeft / base", t, "qpeft", "base", TARGET))
    if has_peft():
        section.rows.append(ratio_row(f"rank {RANK}: HF PEFT / base", t, "hf-peft", "base"))
        section.rows.append(ratio_row(f"rank {RANK}: qpeft / HF PEFT", t, "qpeft", "hf-peft"))
    section.notes += timing_lines(t)
    return section
