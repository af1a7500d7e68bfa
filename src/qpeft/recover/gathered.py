"""Evaluation on several ranks: each rank evaluates its share of the eval batches, the results are
gathered, and every rank gets the one-process metrics.

Encoders: the pooled student and teacher embeddings of every rank are gathered, put back in the
global row order and stripped of padding rows, then scored as in one process. Causal LMs: the
next-token NLL, token count, summed KL and KL token count are summed over ranks.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from . import metrics
from .distributed import Parallel

__all__ = ["evaluate"]

Batch = dict[str, torch.Tensor]


def evaluate(
    par: Parallel, task, student: nn.Module, teacher: nn.Module, batches: list[Batch]
) -> dict[str, float]:
    """The task's eval metrics of ``student`` against ``teacher``.

    Args:
        par: how the run is spread; in one process this is ``task.evaluate``.
        task: a :class:`~qpeft.recover.tasks.Task` (``encoder`` or ``causal``).
        student, teacher: the models (plain, DDP-unwrapped or FSDP2-sharded).
        batches: this rank's shares of the eval batches (:meth:`Parallel.share`).
    """
    if not par.active:
        return task.evaluate(student, teacher, batches)
    if task.kind == "encoder":
        return _encoder(par, task, student, teacher, batches)
    return _causal(par, task, student, teacher, batches)


def _global_rows(par: Parallel, local: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Rows of every rank in the one-process order: batch by batch, rank by rank."""
    parts = [p.split(sizes) for p in par.gather(local)]
    return torch.cat([parts[r][b] for b in range(len(sizes)) for r in range(par.world)])


@torch.no_grad()
def _encoder(par, task, student, teacher, batches) -> dict[str, float]:
    def pooled(model: nn.Module) -> torch.Tensor:
        return torch.cat(
            [metrics.mean_pool(task.forward(model, b), b["attention_mask"]) for b in batches]
        )

    sizes = [int(b["input_ids"].shape[0]) for b in batches]
    keep = _global_rows(par, torch.cat([b["row_weight"] for b in batches]), sizes) > 0
    emb_s = _global_rows(par, pooled(student), sizes)[keep]
    emb_t = _global_rows(par, pooled(teacher), sizes)[keep]
    mean, low = metrics.cosine_stats(emb_s, emb_t)
    return {
        "cos_mean": mean,
        "cos_min": low,
        "nn_agreement": metrics.neighbour_agreement(emb_s, emb_t),
    }


@torch.no_grad()
def _causal(par, task, student, teacher, batches) -> dict[str, float]:
    totals = torch.zeros(4, dtype=torch.float64)  # nll, predicted tokens, KL sum, KL tokens
    for b in batches:
        logits_s, logits_t = task.forward(student, b), task.forward(teacher, b)
        mask = metrics.loss_mask(b)
        nll, count = metrics.next_token_nll(logits_s, b["input_ids"], mask)
        kl = float(metrics.token_kl(logits_s, logits_t, mask, norm=1.0))
        totals += torch.tensor([nll, count, kl, float(mask.sum())], dtype=torch.float64)
    nll, count, kl, tokens = par.sum(totals).tolist()
    return {"perplexity": math.exp(nll / max(count, 1)), "kl": kl / max(tokens, 1.0)}
