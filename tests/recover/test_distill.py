"""The end-to-end phase: schedule, early stopping, best weights kept."""

import math

import torch
from torch import nn

from qpeft.recover.distill import distill, warmup_cosine


def test_warmup_cosine_rises_then_decays_to_zero():
    values = [warmup_cosine(s, 100) for s in range(100)]
    assert values[0] == 0.1 and values[9] == 1.0
    assert all(a >= b for a, b in zip(values[9:], values[10:], strict=False))
    assert values[-1] < 0.01
    assert math.isclose(warmup_cosine(10 + 45, 100), 0.5, abs_tol=0.02)


class _Task:
    """Regression task: outputs are model(x); loss is MSE."""

    @staticmethod
    def forward(model, batch):
        return model(batch["x"])

    @staticmethod
    def loss(student, teacher, batch):
        return (student - teacher).pow(2).mean()


def _data(seed, n=4):
    g = torch.Generator().manual_seed(seed)
    return [{"x": torch.randn(8, 4, generator=g)} for _ in range(n)]


def test_distill_moves_the_student_toward_the_teacher_and_keeps_the_best():
    torch.manual_seed(0)
    teacher, student = nn.Linear(4, 4), nn.Linear(4, 4)
    report = distill(student, teacher, _Task, _data(1), _data(2), epochs=20, lr=0.05, seed=0)
    assert report.valid[0][1] > 10 * min(v for _, v in report.valid)
    assert len(report.losses) == 80 or report.stopped_early
    best = min(report.valid, key=lambda sv: sv[1])
    assert report.best_step == best[0]


def test_distill_stops_early_and_restores_the_best_weights():
    torch.manual_seed(0)
    teacher, student = nn.Linear(4, 4), nn.Linear(4, 4)
    # a huge learning rate makes validation worse after the first check
    report = distill(
        student, teacher, _Task, _data(1), _data(2), epochs=50, lr=50.0, seed=0, patience=2
    )
    assert report.stopped_early
    with torch.no_grad():
        kept = sum(_Task.loss(student(b["x"]), teacher(b["x"]), b) for b in _data(2)) / 4
    assert math.isclose(float(kept), min(v for _, v in report.valid), rel_tol=1e-5)


def test_zero_epochs_change_nothing():
    teacher, student = nn.Linear(4, 4), nn.Linear(4, 4)
    before = student.weight.detach().clone()
    report = distill(student, teacher, _Task, _data(1), _data(2), epochs=0, lr=1.0, seed=0)
    assert report.losses == [] and torch.equal(student.weight, before)
