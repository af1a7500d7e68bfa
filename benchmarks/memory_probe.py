"""Child process of scenario 6: peak RSS of training steps with AdamW for one library.

``python -m benchmarks.memory_probe {qpeft|hf-peft} RANK`` prints one JSON line:
``{"before_mb": RSS after building the model, "peak_mb": peak RSS after the steps}``.
"""

from __future__ import annotations

import json
import resource
import sys

import torch

from .models import base_model, hf_model, qpeft_model, token_batch

STEPS = 3


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))
    return kb / 1024


def main(lib: str, rank: int) -> None:
    torch.set_num_threads(2)
    build = {"qpeft": qpeft_model, "hf-peft": hf_model}[lib]
    model, ids = build(base_model(), rank), token_batch()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    before = _rss_mb()
    for _ in range(STEPS):
        opt.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"before_mb": before, "peak_mb": peak}))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
