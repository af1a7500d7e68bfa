"""Interleaved timing: every candidate runs once per round, in a rotating order, after a warm-up.

Round-robin interleaving spreads slow drifts of the machine (frequency, other load) evenly over the
candidates; rotating the order removes any bias from running first or last within a round. The
statistic is the median of the per-round times, robust to the odd stall.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Timing", "interleaved"]


@dataclass(frozen=True)
class Timing:
    """Per-candidate result: median and quartiles of the repeat times, in seconds."""

    median: float
    q1: float
    q3: float
    repeats: int


def interleaved(
    candidates: dict[str, Callable[[], object]], repeats: int = 10, warmup: int = 2
) -> dict[str, Timing]:
    """Time each zero-argument callable ``repeats`` times, round-robin, after ``warmup`` rounds.

    Raises:
        ValueError: if ``repeats < 10`` (the suite's rule) or there is no candidate.
    """
    if repeats < 10:
        raise ValueError(f"repeats must be >= 10, got {repeats}")
    if not candidates:
        raise ValueError("no candidates to time")
    names = list(candidates)
    times: dict[str, list[float]] = {n: [] for n in names}
    for round_ in range(warmup + repeats):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            gc.collect()
            start = time.perf_counter()
            candidates[name]()
            elapsed = time.perf_counter() - start
            if round_ >= warmup:
                times[name].append(elapsed)
    out = {}
    for name, ts in times.items():
        q = statistics.quantiles(ts, n=4)
        out[name] = Timing(statistics.median(ts), q[0], q[2], len(ts))
    return out
