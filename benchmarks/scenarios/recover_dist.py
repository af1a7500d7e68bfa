"""Scenario 8: ``qpeft recover`` on 1 process vs 2 torchrun ranks (fsdp2, ddp): steps per second
and peak RSS per rank.

The model's weights dominate the memory (Llama-shaped, see ``HIDDEN`` / ``LAYERS``; few short
texts), so what FSDP2 saves per rank shows: each rank holds half of the frozen teacher and student
bases, while one process holds both whole plus the cached ``Q(W)``. Each configuration runs the
whole command once in fresh processes (``benchmarks.recover_probe``: every rank reports its own
``getrusage`` peak). One process gets 2 intra-op threads, each rank 1 (the same 2 cores).
Steps per second: block-wise steps (every block's steps) over the block-wise phase's time, and
end-to-end steps over the end-to-end phase's time (both include their evaluation).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from ..recover_model import build
from ..report import Row, Section

HIDDEN, LAYERS = 1024, 12
ROOT = Path(__file__).resolve().parents[2]
ARGS = [
    "--format", "int8_weight_only", "--init", "kaiming_zeros", "--rank", "16",
    "--train-texts", "8", "--valid-texts", "4", "--eval-texts", "4", "--batch-size", "4",
    "--max-length", "32", "--block-epochs", "1", "--epochs", "1", "--no-progress",
]  # fmt: skip
TARGET = 0.65  # fsdp2 at 2 ranks: per-rank peak at most this fraction of the one-process peak


def _measure(work: Path, mode: str, allocator: dict | None = None) -> dict:
    out = work / (mode + ("-mmap" if allocator else ""))
    out.mkdir()
    ranks = 1 if mode == "none" else 2
    launch = [sys.executable, "-m", "benchmarks.recover_probe", str(out)]
    if ranks > 1:
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                  "--nproc-per-node", "2", "-m", "benchmarks.recover_probe", str(out)]  # fmt: skip
    threads = "2" if ranks == 1 else "1"
    path = os.pathsep.join([str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": threads, "HF_HUB_OFFLINE": "1"}
    env.update(allocator or {})
    argv = ["recover", "--model", str(work / "model"), "--parallel", mode, *ARGS]
    done = subprocess.run(
        [*launch, *argv, "--output", str(out / "run")], cwd=ROOT, env=env,
        capture_output=True, text=True,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"qpeft recover --parallel {mode} failed:\n{done.stderr[-3000:]}")
    report = json.loads((out / "run" / "report.json").read_text())
    peaks = [json.loads((out / f"rank{r}.json").read_text())["peak_rss_mb"] for r in range(ranks)]
    sec = report["seconds"]
    return {
        "peaks": peaks,
        "block_sps": len(report["block_losses"]) / max(sec["blockwise"], 1e-9),
        "e2e_sps": len(report["train_losses"]) / max(sec["recovered"], 1e-9),
        "wall": report["wall_seconds"],
        "model_mb": report["sizes"]["model_mb"],
    }


def run(repeats: int) -> Section:  # noqa: ARG001 - one fresh run per configuration
    section = Section("recover_dist", "8. distributed recover (2 ranks, gloo)")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        build(work / "model", HIDDEN, LAYERS)
        got = {mode: _measure(work, mode) for mode in ("none", "fsdp2", "ddp")}
        same = _measure(work, "none", {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)})["peaks"][0]
    one = got["none"]["peaks"][0]
    for mode in ("fsdp2", "ddp"):
        peaks, worst = got[mode]["peaks"], max(got[mode]["peaks"])
        section.rows.append(
            Row(
                f"{mode}: peak RSS per rank / one process",
                f"{worst / one:.2f}x ({' / '.join(f'{p:.0f}' for p in peaks)} vs {one:.0f} MiB)",
                f"<= {TARGET:.2f}x" if mode == "fsdp2" else "",
                worst / one <= TARGET if mode == "fsdp2" else None,
            )
        )
    section.rows.append(
        Row(
            "fsdp2: peak RSS per rank / one process with the ranks' allocator setting",
            f"{max(got['fsdp2']['peaks']) / same:.2f}x (vs {same:.0f} MiB)",
        )
    )
    for mode, r in got.items():
        name = "1 process" if mode == "none" else f"{mode}, 2 ranks"
        section.rows.append(
            Row(
                f"{name}: steps/s block-wise, end-to-end",
                f"{r['block_sps']:.2f}, {r['e2e_sps']:.2f} (wall {r['wall']:.0f} s)",
            )
        )
    section.notes.append(
        f"Llama-shaped, hidden {HIDDEN}, {LAYERS} layers, fp32 ({got['none']['model_mb']:.0f} MB "
        "of weights), int8_weight_only, LoRA rank 16 (kaiming_zeros: no SVD, to keep the run "
        "short), 8 train / 4 valid / 4 eval texts of at most 32 tokens, batch 4, one epoch per "
        "phase; one run per configuration, the whole `qpeft recover` command (rank 0 also "
        "gathers and writes the checkpoint). Ranks serve allocations above 1 MiB by mmap "
        "(glibc mallopt, set by `qpeft recover` on ranks); the extra one-process run sets the "
        "same with MALLOC_MMAP_THRESHOLD_. Timings under load (other jobs on the 2 cores)."
    )
    return section
