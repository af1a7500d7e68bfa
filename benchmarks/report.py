"""Results: each scenario returns a :class:`Section`; ``RESULTS.md`` is rendered from all of them.

``results.json`` keeps the latest section of every scenario, so running a subset
(``python -m benchmarks train``) refreshes those rows and keeps the others, each with the date
and machine it was measured on.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

__all__ = ["Row", "Section", "machine", "save"]

HERE = Path(__file__).parent


@dataclass
class Row:
    """One measured comparison: ``value`` is shown as is; ``met`` None means no target."""

    comparison: str
    value: str
    target: str = ""
    met: bool | None = None


@dataclass
class Section:
    """A scenario's rows, notes, and when/where it ran."""

    key: str
    title: str
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    ran: str = ""
    machine: str = ""


def machine() -> str:
    """CPU model, core count, thread setting and library versions, one line."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    versions = [f"torch {torch.__version__}"]
    for lib in ("transformers", "peft"):
        try:
            versions.append(f"{lib} {__import__(lib).__version__}")
        except ImportError:
            versions.append(f"{lib} not installed")
    load = f"load average (1 min) {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    return (
        f"{cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, {load}, "
        f"Python {platform.python_version()}, " + ", ".join(versions)
    )


def _render(sections: list[Section]) -> str:
    lines = [
        "# Benchmark results",
        "",
        "Written by `python -m benchmarks` (`make bench`); do not edit by hand. Times are medians "
        "of",
        "interleaved repeats in one process (see `benchmarks/harness.py`); a ratio below 1 means",
        "qpeft is faster. Model: Llama-shaped, hidden 512, intermediate 1376, 4 layers, 8 heads,",
        "vocab 4096, fp32, batch 4 x 128 tokens, LoRA on the seven projections.",
        "",
        "| scenario | comparison | measured | target | met |",
        "|---|---|---|---|---|",
    ]
    for s in sections:
        for r in s.rows:
            met = {True: "yes", False: "**no**", None: ""}[r.met]
            lines.append(f"| {s.title} | {r.comparison} | {r.value} | {r.target} | {met} |")
    lines += ["", "## Notes", ""]
    for s in sections:
        lines.append(f"### {s.title}")
        lines.append("")
        lines.append(f"Ran {s.ran} on: {s.machine}.")
        lines.append("")
        lines += [f"- {n}" for n in s.notes]
        lines.append("")
    return "\n".join(lines)


def save(new: list[Section], order: list[str]) -> Path:
    """Merge ``new`` into ``results.json`` and rewrite ``RESULTS.md``; returns its path."""
    store = HERE / "results.json"
    old = json.loads(store.read_text()) if store.exists() else {}
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    for s in new:
        s.ran = stamp
        s.machine = s.machine or machine()
        old[s.key] = asdict(s)
    sections = [
        Section(**{**old[k], "rows": [Row(**r) for r in old[k]["rows"]]}) for k in order if k in old
    ]
    store.write_text(json.dumps(old, indent=1) + "\n")
    out = HERE / "RESULTS.md"
    out.write_text(_render(sections))
    return out
