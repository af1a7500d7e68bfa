"""Scenario 7: ``qpeft.compress``: peak RSS and speed of a LoRA r16 AdamW step on nvfp4.

Memory: each variant (compressed, fake-quant with cached ``Q(W)``, HF PEFT on the dense bf16
model, torchao NF4 + LoRA when torchao is installed) runs in its own fresh process
(``benchmarks.compress_probe``); the figure is the peak RSS of the steps alone, after set-up.
Speed: one process, the steps of the compressed, the cached fake-quant and (when torchao is
installed) the torchao NF4 models interleaved, median of the repeats.
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


def _models() -> dict[str, torch.nn.Module]:
    import qpeft

    from ..compress_probe import batch, llama, qpeft_model, torchao_model

    ids, base = batch(SMALL), llama(SMALL)
    nf4 = torchao_model(copy.deepcopy(base)) if importlib.util.find_spec("torchao") else None
    fake = qpeft_model(base, ids, compressed=False)
    models = {"compressed": qpeft.compress(copy.deepcopy(fake)), "fake-quant": fake}
    return models if nf4 is None else {**models, "torchao-nf4": nf4}


def _step_seconds(repeats: int) -> dict[str, float]:
    from ..compress_probe import batch

    ids, models = batch(SMALL), _models()
    times: dict[str, list[float]] = {k: [] for k in models}
    opts = {
        k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad])
        for k, m in models.items()
    }
    order = list(models)
    for i in range(repeats + 1):
        for key in order if i % 2 else order[::-1]:
            start = time.perf_counter()
            opts[key].zero_grad(set_to_none=True)
            models[key](input_ids=ids, labels=ids).loss.backward()
            opts[key].step()
            if i:  # the first round warms up
                times[key].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def _memory_rows(peaks: dict[str, dict[str, float]]) -> list[Row]:
    packed = peaks["compressed"]
    rows = []
    if "hf-peft" in peaks:
        saved = packed["dense_mb"] - packed["packed_mb"]
        got = peaks["hf-peft"]["step_peak_mb"] - packed["step_peak_mb"]
        rows.append(
            Row(
                "memory packing saves that the compressed run realizes",
                f"{got / saved:.0%} (HF PEFT peak - compressed peak = {got:.0f} MiB; dense - "
                f"packed weights = {packed['dense_mb']:.0f} - {packed['packed_mb']:.0f} MiB)",
                ">= 80%",
                got / saved >= 0.8,
            )
        )
    if "torchao-nf4" in peaks:
        nf4 = peaks["torchao-nf4"]["step_peak_mb"]
        rows.append(
            Row(
                "peak RSS compressed vs torchao NF4",
                f"{packed['step_peak_mb']:.0f} vs {nf4:.0f} MiB",
                "<= torchao NF4",
                packed["step_peak_mb"] <= nf4,
            )
        )
    return rows


def _speed_rows(seconds: dict[str, float]) -> list[Row]:
    ms = {k: v * 1e3 for k, v in seconds.items()}
    rows = [
        Row(
            "step time compressed / cached fake-quant (the price of dequantizing)",
            f"{ms['compressed'] / ms['fake-quant']:.2f}x "
            f"({ms['compressed']:.0f} / {ms['fake-quant']:.0f} ms)",
        )
    ]
    if "torchao-nf4" in ms:
        ratio = ms["compressed"] / ms["torchao-nf4"]
        rows.append(
            Row(
                "step time compressed / torchao NF4",
                f"{ratio:.2f}x ({ms['compressed']:.0f} / {ms['torchao-nf4']:.0f} ms)",
                "<= 1.00x",
                ratio <= 1.0,
            )
        )
    return rows


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
    section.rows += _memory_rows(peaks)
    if "torchao-nf4" not in peaks:
        section.notes.append("torchao is not installed: no NF4 comparison.")
    section.rows += _speed_rows(_step_seconds(max(2, repeats if not SMALL else 2)))
    section.notes.append(
        "Llama-shaped (hidden 1024, 12 layers, bf16, vocab 512, batch 2 x 128 tokens); each "
        "memory variant in a fresh process, peak measured after set-up; speed: median of "
        "interleaved steps of the three models in one process. Needs a quiet machine."
    )
    section.notes.append(
        "The price against the cached fake-quant step is the dequantization, run twice per "
        "step and layer (forward, and backward for dx) as plain PyTorch ops; removing it takes a "
        "fused dequantize-GEMM kernel that reads the packed codes inside the matmul."
    )
    return section
