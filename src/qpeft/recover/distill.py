"""End-to-end distillation (QAD) of the adapters against the teacher, with held-out early stopping.

Only parameters with ``requires_grad`` (the adapters) train. Each step minimises the task's loss
between the student's and the teacher's outputs on one batch (teacher outputs are computed once and
cached). The learning rate warms up linearly for 10% of the steps, then decays on a cosine to 0.
Every ``eval_every`` steps the loss on held-out validation batches is measured; the best adapter
weights seen are kept and restored at the end, and training stops after ``patience`` checks
without improvement. On several ranks (``reduce``: the average over ranks) the logged and
validation losses are averaged, so every rank takes the same decisions.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .metrics import check_finite

__all__ = ["DistillReport", "distill", "warmup_cosine"]

Batch = dict[str, torch.Tensor]
WARMUP_FRACTION = 0.1


@dataclass
class DistillReport:
    """Training losses per step, validation loss per check, and where the best check was."""

    losses: list[float] = field(default_factory=list)
    valid: list[tuple[int, float]] = field(default_factory=list)  # (step, loss)
    best_step: int = 0
    stopped_early: bool = False


def warmup_cosine(step: int, total: int) -> float:
    """LR multiplier: linear warm-up over the first 10% of ``total`` steps, then cosine decay to
    0."""
    warm = max(1, int(total * WARMUP_FRACTION))
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


@torch.no_grad()
def _valid_loss(student, task, batches, targets, reduce) -> float:
    losses = torch.stack(
        [task.loss(task.forward(student, b), t, b) for b, t in zip(batches, targets, strict=True)]
    )
    values = (losses if reduce is None else reduce(losses.double())).tolist()
    return sum(values) / len(values)


def distill(
    student: nn.Module,
    teacher: nn.Module,
    task: Any,
    train: list[Batch],
    valid: list[Batch],
    epochs: int,
    lr: float,
    seed: int,
    eval_every: int = 0,
    patience: int = 3,
    progress: Callable[[int], Any] | None = None,
    state: Any = None,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> DistillReport:
    """Train the student's trainable parameters to match the teacher's outputs.

    Args:
        student, teacher: the models; the teacher is only run under ``no_grad``.
        task: a :class:`~qpeft.recover.tasks.Task` (forward and loss).
        train, valid: batches; ``valid`` decides early stopping and the weights kept.
        epochs: passes over ``train`` (0: nothing happens).
        lr: peak learning rate.
        seed: seeds the batch order.
        eval_every: steps between validation checks (0: once per epoch).
        patience: checks without improvement before stopping.
        progress: called with 1 after each step.
        state: a :class:`~qpeft.recover.resume.PhaseState`: continue its saved step, save every
            ``--save-every`` steps (None: no saving).
        reduce: on several ranks, averages a loss over the ranks (``train`` and ``valid`` are then
            this rank's shares); None in one process.

    Raises:
        ValueError: the loss is not finite; a damaged saved state.
    """
    report = DistillReport()
    params = [p for p in student.parameters() if p.requires_grad]
    if epochs == 0 or not params or not train:
        return report
    with torch.no_grad():
        train_t = [task.forward(teacher, b) for b in train]
        valid_t = [task.forward(teacher, b) for b in valid]
    total = epochs * len(train)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, total))
    every = eval_every or len(train)
    saved = state.saved if state else None
    if saved:
        with saved.checked():
            done = saved.load(opt, sched)
            report, best, best_state, waited = _resumed(saved.extra, params)
        if progress:
            progress(done)
    else:
        best, best_state, waited = (
            _valid_loss(student, task, valid, valid_t, reduce),
            _snapshot(params),
            0,
        )
        report.valid.append((0, best))
        done = 0
    generator = torch.Generator().manual_seed(seed)
    order = [
        j for _ in range(epochs) for j in torch.randperm(len(train), generator=generator).tolist()
    ]
    for step, j in enumerate(order[done:], done + 1):
        loss = task.loss(task.forward(student, train[j]), train_t[j], train[j])
        logged = loss.detach() if reduce is None else reduce(loss.detach())
        check_finite(logged, "end-to-end", step, "--lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        report.losses.append(float(logged))
        if progress:
            progress(1)
        if step % every == 0 or step == total:
            current = _valid_loss(student, task, valid, valid_t, reduce)
            report.valid.append((step, current))
            if current < best:
                best, best_state, waited, report.best_step = current, _snapshot(params), 0, step
            else:
                waited += 1
                if waited >= patience:
                    report.stopped_early = step < total
                    break
        if state and state.due(step):
            extra = {"report": asdict(report), "best": best, "best_state": best_state}
            state.save({"step": step}, opt, sched, {**extra, "waited": waited})
    _restore(params, best_state)
    return report


def _resumed(
    extra: dict[str, Any], params: list[nn.Parameter]
) -> tuple[DistillReport, float, list, int]:
    """The loop state a save wrote: report, best validation loss and snapshot, checks waited."""
    report = DistillReport(**extra["report"])
    report.valid = [(int(s), float(v)) for s, v in report.valid]
    best_state = list(extra["best_state"])
    if [t.shape for t in best_state] != [p.shape for p in params]:
        raise ValueError("the saved best snapshot does not fit the trainable parameters")
    return report, float(extra["best"]), best_state, int(extra["waited"])


def _snapshot(params: list[nn.Parameter]) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


@torch.no_grad()
def _restore(params: list[nn.Parameter], state: list[torch.Tensor]) -> None:
    for p, saved in zip(params, state, strict=True):
        p.copy_(saved)
