"""Comparisons of a rank's record with the single-process reference (tolerances from
tolerances.py)."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.tolerances import DIST_ATOL, DIST_RTOL


def load(outdir: Path, scenario: str, rank: int) -> dict:
    return torch.load(outdir / f"{scenario}.rank{rank}.pt")


def assert_close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(
        got, want, atol=DIST_ATOL, rtol=DIST_RTOL, msg=lambda m: f"{what}: {m}"
    )


def assert_same_tensors(got: dict, want: dict, what: str) -> None:
    assert sorted(got) == sorted(want), f"{what}: keys differ"
    for key in sorted(want):
        assert_close(got[key], want[key], f"{what} {key}")


def assert_like_reference(
    record: dict, ref: dict, what: str, rows: tuple[int, int] | None = None
) -> None:
    """Output (rows ``rank`` of ``world`` when data parallel), step-0 grads and trained adapters."""
    want = ref["out"] if rows is None else ref["out"].chunk(rows[1])[rows[0]]
    assert_close(record["out"], want, f"{what} output")
    assert ref["grads"], "the reference has no adapter gradient: the comparison would be empty"
    assert_same_tensors(record["grads"], ref["grads"], f"{what} grad")
    assert_same_tensors(record["params"], ref["params"], f"{what} trained")
