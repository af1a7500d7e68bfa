"""Scenario 6: peak RSS of a training step with AdamW, qpeft vs HF PEFT.

Peak RSS is a per-process high-water mark, so each measurement runs in a fresh child process
(``benchmarks.memory_probe``); the libraries alternate and each is measured ``RUNS`` times.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

from ..report import Row, Section
from .common import has_peft

RANK, RUNS = 16, 3
ROOT = Path(__file__).resolve().parents[2]


def _probe(lib: str) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.memory_probe", lib, str(RANK)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(repeats: int) -> Section:
    section = Section("memory", "6. memory")
    libs = ["qpeft", "hf-peft"] if has_peft() else ["qpeft"]
    runs: dict[str, list[dict[str, float]]] = {lib: [] for lib in libs}
    for _ in range(RUNS):
        for lib in libs:
            runs[lib].append(_probe(lib))
    peak = {lib: statistics.median(r["peak_mb"] for r in rs) for lib, rs in runs.items()}
    step = {
        lib: statistics.median(r["peak_mb"] - r["before_mb"] for r in rs)
        for lib, rs in runs.items()
    }
    if has_peft():
        section.rows.append(
            Row(
                f"rank {RANK}: peak RSS qpeft vs HF PEFT",
                f"{peak['qpeft']:.0f} vs {peak['hf-peft']:.0f} MiB",
                "not above",
                peak["qpeft"] <= peak["hf-peft"],
            )
        )
        section.rows.append(
            Row(
                f"rank {RANK}: step's RSS growth qpeft vs HF PEFT",
                f"{step['qpeft']:.0f} vs {step['hf-peft']:.0f} MiB",
            )
        )
    else:
        section.rows.append(Row(f"rank {RANK}: peak RSS qpeft", f"{peak['qpeft']:.0f} MiB"))
        section.notes.append("HF PEFT not installed: no comparison.")
    section.notes.append(
        f"median of {RUNS} fresh processes per library, alternating; {3} steps "
        "(forward, backward, AdamW) after building the model; growth = peak minus "
        "the RSS just before the first step."
    )
    return section
