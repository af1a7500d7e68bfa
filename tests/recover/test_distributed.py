"""Batch shares of ``qpeft recover`` ranks, and the launch modes (no process group needed)."""

from __future__ import annotations

import pytest
import torch

from qpeft.recover.distributed import Parallel
from qpeft.recover.launch import resolve_mode
from qpeft.recover.tasks import TASKS


def _batch(rows: int) -> dict[str, torch.Tensor]:
    ids = torch.arange(rows * 4).view(rows, 4)
    mask = torch.ones(rows, 4, dtype=torch.long)
    mask[:, 3:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("rows", [1, 3, 4, 5])
def test_shares_are_disjoint_cover_every_row_and_pad_with_weightless_real_rows(rows):
    world = 3
    shares = [Parallel("ddp", r, world).share([_batch(rows)], "causal")[0] for r in range(world)]
    sizes = {s["input_ids"].shape[0] for s in shares}
    assert len(sizes) == 1  # every rank runs the same shapes
    kept = torch.cat([s["input_ids"][s["row_weight"] > 0] for s in shares])
    assert torch.equal(kept, _batch(rows)["input_ids"])  # disjoint, complete, in order
    pads = torch.cat([s["input_ids"][s["row_weight"] == 0] for s in shares])
    assert all(any(torch.equal(p, row) for row in _batch(rows)["input_ids"]) for p in pads)
    assert all(float(s["norm"]) == pytest.approx(3 * rows / world) for s in shares)  # tokens / N


def test_weighted_losses_of_the_shares_average_to_the_one_process_loss():
    torch.manual_seed(0)
    batch = _batch(5)
    student, teacher = torch.randn(5, 4, 7), torch.randn(5, 4, 7)
    for kind in ("encoder", "causal"):
        whole = TASKS[kind].loss(student, teacher, batch)
        world, parts = 2, []
        for rank in range(world):
            share = Parallel("fsdp2", rank, world).share([batch], kind)[0]
            index = share["input_ids"][:, 0] // 4  # the rows this share holds
            parts.append(TASKS[kind].loss(student[index], teacher[index], share))
        assert float(sum(parts) / world) == pytest.approx(float(whole), rel=1e-6)


def test_one_process_is_the_default_and_none_is_refused_under_a_multi_rank_launch(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert resolve_mode(None) == "none"
    assert resolve_mode("ddp") == "ddp"
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert resolve_mode(None) == "fsdp2"
    with pytest.raises(ValueError, match="--parallel none runs one process"):
        resolve_mode("none")
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE"):
        resolve_mode(None)
