"""Scenario 5: 8 adapters loaded, a batch of 32 where each sample names its own adapter."""

from __future__ import annotations

import copy

import torch

import qpeft

from ..harness import interleaved
from ..models import (
    base_model,
    copy_hf_into_qpeft,
    hf_model,
    qpeft_model,
    randomize_hf,
    token_batch,
)
from ..report import Section
from .common import has_peft, ratio_row, timing_lines

RANK, ADAPTERS, BATCH, TARGET = 16, 8, 32, 0.5


def run(repeats: int) -> Section:
    section = Section("serve", "5. serving 8 adapters")
    base, ids = base_model().eval(), token_batch(batch=BATCH)
    names = tuple(f"a{i}" for i in range(ADAPTERS))
    routing = [names[i % ADAPTERS] for i in range(BATCH)]
    ours = qpeft_model(base, RANK, names).eval()
    plain = copy.deepcopy(base)
    candidates = {"base": torch.no_grad()(lambda: plain(input_ids=ids).logits)}

    @torch.no_grad()
    def routed():
        with qpeft.adapter_routing(ours, routing):
            return ours(input_ids=ids).logits

    candidates["qpeft"] = routed
    if has_peft():
        hf = hf_model(base, RANK, names).eval()
        randomize_hf(hf)
        copy_hf_into_qpeft(hf, ours)
        candidates["hf-peft"] = torch.no_grad()(lambda: hf(input_ids=ids, adapter_names=routing).logits)
        hf_out = candidates["hf-peft"]()
        diff = (hf_out - routed()).abs().max().item()
        effect = (hf_out - candidates["base"]()).abs().max().item()
        section.notes.append(f"same outputs: max |logit difference| qpeft vs HF PEFT = {diff:.1e} "
                             f"(the adapters move the logits by up to {effect:.2f} from the base's)")
    t = interleaved(candidates, repeats, warmup=1)
    if has_peft():
        section.rows.append(ratio_row("qpeft / HF PEFT (adapter_names=)", t, "qpeft", "hf-peft", TARGET))
        section.rows.append(ratio_row("HF PEFT / base", t, "hf-peft", "base"))
    section.rows.append(ratio_row("qpeft / base", t, "qpeft", "base"))
    section.notes += timing_lines(t)
    section.notes.append(f"rank {RANK}, batch {BATCH} x 128 tokens, sample i uses adapter a(i mod 8).")
    return section
