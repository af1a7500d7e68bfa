"""Scenario 5: 8 adapters loaded, a batch of 32 where each sample names its own adapter.

Two workloads: ``generate`` (a 16-token prompt, 16 new tokens, greedy, KV cache: mostly one-token
decoding steps) and one forward over 32 x 128 tokens (prefill).
"""

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
PROMPT, NEW_TOKENS, PREFILL = 16, 16, 128
GENERATE = {
    "max_new_tokens": NEW_TOKENS,
    "min_new_tokens": NEW_TOKENS,
    "do_sample": False,
    "pad_token_id": 0,
}


def _models():
    base = base_model().eval()
    base.config.use_cache = True
    names = tuple(f"a{i}" for i in range(ADAPTERS))
    ours = qpeft_model(base, RANK, names).eval()
    hf = None
    if has_peft():
        hf = hf_model(base, RANK, names).eval()
        randomize_hf(hf)
        copy_hf_into_qpeft(hf, ours)
    return copy.deepcopy(base), ours, hf, [names[i % ADAPTERS] for i in range(BATCH)]


def _candidates(plain, ours, hf, routing, call):
    """``call(model, **extra)`` for the base, qpeft inside ``adapter_routing`` and HF PEFT."""
    out = {"base": torch.no_grad()(lambda: call(plain))}

    @torch.no_grad()
    def routed():
        with qpeft.adapter_routing(ours, routing):
            return call(ours)

    out["qpeft"] = routed
    if hf is not None:
        out["hf-peft"] = torch.no_grad()(lambda: call(hf, adapter_names=routing))
    return out


def _workload(section, label, candidates, repeats, same_note):
    if "hf-peft" in candidates:
        section.notes.append(
            f"{label}: "
            + same_note(candidates["qpeft"](), candidates["hf-peft"](), candidates["base"]())
        )
    t = interleaved(candidates, repeats, warmup=1)
    if "hf-peft" in t:
        section.rows.append(
            ratio_row(f"{label}: qpeft / HF PEFT (adapter_names=)", t, "qpeft", "hf-peft", TARGET)
        )
        section.rows.append(ratio_row(f"{label}: HF PEFT / base", t, "hf-peft", "base"))
    section.rows.append(ratio_row(f"{label}: qpeft / base", t, "qpeft", "base"))
    section.notes += [f"{label}, " + line for line in timing_lines(t)]


def _same_tokens(ours, hf, base) -> str:
    return (
        f"same outputs: generated tokens identical to HF PEFT's: {torch.equal(ours, hf)} "
        f"(and differ from the base model's: {not torch.equal(ours, base)})"
    )


def _same_logits(ours, hf, base) -> str:
    return (
        "same outputs: max |logit difference| qpeft vs HF PEFT = "
        f"{(ours - hf).abs().max().item():.1e} "
        f"(the adapters move the logits by up to {(hf - base).abs().max().item():.2f})"
    )


def run(repeats: int) -> Section:
    section = Section("serve", "5. serving 8 adapters")
    plain, ours, hf, routing = _models()
    prompt, long = token_batch(batch=BATCH, seq=PROMPT), token_batch(batch=BATCH, seq=PREFILL)
    gen = _candidates(
        plain, ours, hf, routing, lambda m, **kw: m.generate(prompt, **GENERATE, **kw)
    )
    _workload(section, "generate", gen, repeats, _same_tokens)
    fwd = _candidates(plain, ours, hf, routing, lambda m, **kw: m(input_ids=long, **kw).logits)
    _workload(section, "prefill", fwd, repeats, _same_logits)
    section.notes.append(
        f"rank {RANK}, batch {BATCH}, sample i uses adapter a(i mod 8); generate: "
        f"{PROMPT}-token prompts, {NEW_TOKENS} new tokens, greedy, KV cache; prefill: "
        f"one forward of {BATCH} x {PREFILL} tokens."
    )
    section.notes.append(
        "Decoding reads every used adapter's factors once per step whatever the method: "
        "8 rank-16 adapters on the seven projections add about a third to the bytes a "
        "decoding step of this small base model reads, which bounds qpeft / base from below "
        "in decoding; at prefill the base's own matmuls dominate both libraries' time."
    )
    if not has_peft():
        section.notes.append("HF PEFT not installed: peer rows skipped.")
    return section
