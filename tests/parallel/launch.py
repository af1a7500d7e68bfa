"""Run a function of :mod:`tests.parallel.worker` on several ranks, each a fresh Python process.

Ranks meet through a file store in the run's folder (no TCP port to pick, so no port clash), use
gloo on CPU (nccl with ``QPEFT_TEST_DEVICE=cuda`` on a machine with enough GPUs), and are killed
if they outlive ``timeout`` so a hung collective cannot stall the suite.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 180.0


def run_ranks(group: str, outdir: Path, world_size: int = 2, timeout: float = TIMEOUT_S) -> None:
    """Run ``worker.GROUPS[group]`` on ``world_size`` ranks; results are files under ``outdir``.

    Raises:
        AssertionError: a rank failed or timed out; the message holds the tail of each rank's log.
    """
    outdir.mkdir(parents=True, exist_ok=True)
    store = outdir / "store"
    store.unlink(missing_ok=True)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]),
        "WORLD_SIZE": str(world_size),
        "QPEFT_STORE": str(store),
        "OMP_NUM_THREADS": "1",
    }
    procs, logs = [], []
    for rank in range(world_size):
        log = open(outdir / f"rank{rank}.log", "w")  # noqa: SIM115 - closed below
        logs.append(log)
        cmd = [sys.executable, "-m", "tests.parallel.worker", group, str(outdir)]
        procs.append(
            subprocess.Popen(
                cmd, cwd=ROOT, env={**env, "RANK": str(rank)}, stdout=log, stderr=subprocess.STDOUT
            )
        )
    failed = _wait(procs, time.monotonic() + timeout)
    for log in logs:
        log.close()
    if failed:
        tails = [
            f"--- rank {r} ---\n" + (outdir / f"rank{r}.log").read_text()[-3000:]
            for r in range(world_size)
        ]
        raise AssertionError(f"ranks {failed} of group {group!r} failed\n" + "\n".join(tails))


def _wait(procs: list[subprocess.Popen], deadline: float) -> list[str]:
    """Poll until every rank exits; one failing or the deadline passing kills the rest."""
    while True:
        codes = [p.poll() for p in procs]
        failed = [f"{r} (exit {c})" for r, c in enumerate(codes) if c not in (None, 0)]
        if not failed and all(c == 0 for c in codes):
            return []
        if not failed and time.monotonic() > deadline:
            failed = [f"{r} (timed out)" for r, c in enumerate(codes) if c is None]
        if failed:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
            return failed
        time.sleep(0.05)
