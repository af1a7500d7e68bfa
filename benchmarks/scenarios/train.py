"""Scenario 1: one training step (forward + backward) vs HF PEFT and the frozen-base floor."""

from __future__ import annotations

import torch

from ..harness import interleaved
from ..models import (
    base_model,
    copy_hf_into_qpeft,
    floor_model,
    hf_model,
    qpeft_model,
    randomize_hf,
    token_batch,
)
from ..report import Section
from .common import has_peft, ratio_row, timing_lines, use_simple_path

TARGETS = {16: (0.95, 1.10), 64: (0.90, None)}  # rank -> (vs HF PEFT, vs floor)


def _step(model, ids):
    def step():
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()

    return step


def _check_same(base, ids, rank) -> str:
    """Loss and LoRA gradients of qpeft equal HF PEFT's with the same factors."""
    hf, ours = hf_model(base, rank), qpeft_model(base, rank)
    randomize_hf(hf)
    copy_hf_into_qpeft(hf, ours)
    loss_hf, loss_q = hf(input_ids=ids, labels=ids).loss, ours(input_ids=ids, labels=ids).loss
    loss_hf.backward()
    loss_q.backward()
    g_hf = torch.cat([p.grad.flatten() for n, p in hf.named_parameters() if "lora_A" in n])
    g_q = torch.cat([p.grad.flatten() for n, p in ours.named_parameters() if "lora_a" in n])
    return (
        f"rank {rank}: |loss difference| {abs(loss_hf.item() - loss_q.item()):.1e}, max |dA "
        "difference| "
        f"{(g_hf - g_q).abs().max().item():.1e} (max |dA| {g_hf.abs().max().item():.1e})"
    )


def run(repeats: int) -> Section:
    section = Section("train", "1. training step")
    base, ids = base_model(), token_batch()
    for rank, (vs_hf, vs_floor) in TARGETS.items():
        models = {
            "floor": floor_model(base),
            "qpeft": qpeft_model(base, rank),
        }
        if (
            rank == 16
        ):  # the straightforward wrapper, for reference (one rank keeps the suite short)
            models["qpeft-simple"] = qpeft_model(base, rank)
            use_simple_path(models["qpeft-simple"])
        if has_peft():
            models["hf-peft"] = hf_model(base, rank)
        t = interleaved({n: _step(m, ids) for n, m in models.items()}, repeats, warmup=1)
        if has_peft():
            section.rows.append(
                ratio_row(f"rank {rank}: qpeft / HF PEFT", t, "qpeft", "hf-peft", vs_hf)
            )
        section.rows.append(ratio_row(f"rank {rank}: qpeft / floor", t, "qpeft", "floor", vs_floor))
        if has_peft():
            section.rows.append(ratio_row(f"rank {rank}: HF PEFT / floor", t, "hf-peft", "floor"))
        if "qpeft-simple" in t:
            section.rows.append(
                ratio_row(f"rank {rank}: simple path / floor", t, "qpeft-simple", "floor")
            )
        section.notes += [f"rank {rank}, " + line for line in timing_lines(t)]
        if has_peft():
            section.notes.append("same result check, " + _check_same(base, ids, rank))
    section.notes.append(
        "floor = the same model, weights frozen, no adapters, input activations "
        "requiring grad; qpeft-simple = qpeft's reference path (a plain wrapper)."
    )
    section.notes.append(
        "At rank 64 the adapters' own matmuls (3 x tokens x rank x (in + out) multiply-adds "
        "per projection, the same for every LoRA implementation) are most of the time "
        "above the floor; fusion only removes the passes around them."
    )
    if not has_peft():
        section.notes.append("HF PEFT not installed: peer rows skipped.")
    section.notes.append("ModelOpt is not installed (and its PEFT mode needs a GPU): not compared.")
    return section
