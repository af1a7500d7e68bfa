"""Scenario 7: ``qpeft.compress``: peak RSS and speed of a LoRA r16 AdamW step on nvfp4.

Memory: each variant (compressed, fake-quant with cached ``Q(W)``, HF PEFT on the dense bf16
model, torchao NF4 + LoRA when torchao is installed) runs in its own fresh process
(``benchmarks.compress_probe``); the figure is the peak RSS of the steps alone, after set-up.
Speed: one process, the compressed and the cached fake-quant models' steps interleaved.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from ..report import Row, Section
from .common import has_peft

ROOT = Path(__file__).resolve().parents[2]
SMALL = os.environ.get("QPEFT_BENCH_SMALL") == "1"  # a quick check that it runs (no figures)


def _probe(variant: str) -> dict[str, float]:
    argv = [sys.executable, "-m", "benchmarks.compress_probe", variant, *(["--small"] * SMALL)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    out = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _variants() -> list[str]:
    found = ["compressed", "fake-quant"]
    found += ["hf-peft"] if has_peft() else []
    found += ["torchao-nf4"] if importlib.util.find_spec("torchao") else []
    return found


def _step_seconds(repeats: int) -> dict[str, float]:
    import qpeft

    from ..compress_probe import batch, llama, qpeft_model

    ids = batch(SMALL)
    fake = qpeft_model(llama(SMALL), ids, compressed=False)
    packed = qpeft.compress(copy.deepcopy(fake))
    times: dict[str, list[float]] = {"compressed": [], "fake-quant": []}
    models = {"compressed": packed, "fake-quant": fake}
    opts = {
        k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad])
        for k, m in models.items()
    }
    for i in range(repeats + 1):
        for key in ["compressed", "fake-quant"] if i % 2 else ["fake-quant", "compressed"]:
            start = time.perf_counter()
            opts[key].zero_grad(set_to_none=True)
            models[key](input_ids=ids, labels=ids).loss.backward()
            opts[key].step()
            if i:  # the first round warms up
                times[key].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def run(repeats: int) -> Section:
    section = Section("compress", "7. compress (nvfp4, LoRA r16, AdamW)")
    peaks = {v: _probe(v) for v in _variants()}
    for variant, got in peaks.items():
        section.rows.append(
            Row(
                f"peak RSS of the steps, {variant}",
                f"{got['step_peak_mb']:.0f} MiB (set-up {got['setup_mb']:.0f} MiB)",
            )
        )
    if "torchao-nf4" not in peaks:
        section.notes.append("torchao is not installed: no NF4 comparison.")
    seconds = _step_seconds(max(2, repeats if not SMALL else 2))
    section.rows.append(
        Row(
            "step time compressed vs cached fake-quant",
            f"{seconds['compressed'] * 1e3:.0f} vs {seconds['fake-quant'] * 1e3:.0f} ms",
        )
    )
    section.notes.append(
        "Llama-shaped (hidden 1024, 12 layers, bf16, vocab 512, batch 2 x 128 tokens); each "
        "memory variant in a fresh process, peak measured after set-up; speed: median of "
        "interleaved steps in one process. Needs a quiet machine."
    )
    return section
