"""Pure metric and loss functions comparing a student's outputs with its teacher's.

Encoders: ``h: [batch, seq, hidden]`` and ``mask: [batch, seq]`` give pooled embeddings
``e = normalize(sum_t mask_t h_t / sum_t mask_t) : [batch, hidden]``; per-text cosine
``c_i = <e_i^s, e_i^t>``; nearest-neighbour agreement is the fraction of texts ``i`` whose most
similar other text ``argmax_{j != i} <e_i, e_j>`` is the same for student and teacher.
Causal LMs: logits ``z: [batch, seq, vocab]``; ``KL(p_teacher || p_student)`` per predicted
token, and perplexity ``exp(mean NLL)`` of the next token, both over non-padding positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "check_finite",
    "mean_pool",
    "cosine_stats",
    "neighbour_agreement",
    "token_kl",
    "next_token_nll",
    "masked_relative_mse",
    "masked_squared_error",
    "loss_mask",
]


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Normalised mean of ``hidden: [b, s, h]`` over positions where ``mask: [b, s]`` is 1 -> ``[b,
    h]``."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return F.normalize((hidden * m).sum(1) / m.sum(1).clamp(min=1), dim=-1)


def cosine_stats(student: torch.Tensor, teacher: torch.Tensor) -> tuple[float, float]:
    """Mean and minimum row-wise cosine of two ``[n, h]`` embedding matrices."""
    cos = F.cosine_similarity(student.float(), teacher.float(), dim=-1)
    return float(cos.mean()), float(cos.min())


def _nearest(emb: torch.Tensor) -> torch.Tensor:
    emb = F.normalize(emb.float(), dim=-1)
    sim = emb @ emb.T
    sim.fill_diagonal_(-float("inf"))
    return sim.argmax(dim=1)


def neighbour_agreement(student: torch.Tensor, teacher: torch.Tensor) -> float:
    """Fraction of rows whose nearest other row is the same in ``student`` and ``teacher`` ([n, h],
    n >= 2)."""
    return float((_nearest(student) == _nearest(teacher)).float().mean())


def token_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    norm: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Mean over masked positions of ``KL(softmax(teacher) || softmax(student))`` (a 0-dim
    tensor); with ``norm``, the ``mask``-weighted sum divided by ``norm`` instead."""
    log_s = F.log_softmax(student_logits.float(), dim=-1)
    log_t = F.log_softmax(teacher_logits.float(), dim=-1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1)
    m = mask.to(kl.dtype)
    return (kl * m).sum() / (m.sum().clamp(min=1) if norm is None else norm)


def loss_mask(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The batch's ``attention_mask``, times its per-row ``row_weight`` when it has one (a rank's
    share of a batch, :mod:`qpeft.recover.distributed`; padding rows weigh 0)."""
    mask = batch["attention_mask"]
    weight = batch.get("row_weight")
    return mask if weight is None else mask * weight.to(mask.device).unsqueeze(-1)


def next_token_nll(
    logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor
) -> tuple[float, int]:
    """Summed next-token negative log-likelihood and the number of predicted tokens."""
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    target = input_ids[:, 1:]
    nll = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    m = (mask[:, 1:] * mask[:, :-1]).to(nll.dtype)
    return float((nll * m).sum()), int(m.sum())


def masked_squared_error(
    output: torch.Tensor, target: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum mask ||o - t||^2, sum mask ||t||^2)`` over ``[b, s, h]`` outputs (0-dim tensors)."""
    m = mask.unsqueeze(-1).to(output.dtype)
    return ((output - target).pow(2) * m).sum(), (target.pow(2) * m).sum()


def masked_relative_mse(
    output: torch.Tensor, target: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """``sum mask ||o - t||^2 / sum mask ||t||^2`` over ``[b, s, h]`` outputs (a 0-dim tensor)."""
    m = mask.unsqueeze(-1).to(output.dtype)
    return ((output - target).pow(2) * m).sum() / (target.pow(2) * m).sum().clamp(min=1e-12)


def check_finite(loss: torch.Tensor, phase: str, step: int, flag: str) -> None:
    """Stop a run whose training loss is NaN or infinite (it would only report NaN metrics).

    Raises:
        ValueError: naming the phase, the step and the learning-rate flag to lower.
    """
    if not bool(torch.isfinite(loss.detach()).all()):
        raise ValueError(
            f"the {phase} loss became {float(loss.detach())} at step {step}; the training "
            f"diverged, try a smaller {flag}"
        )
