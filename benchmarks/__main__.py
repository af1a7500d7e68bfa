"""``python -m benchmarks [scenario ...] [--repeats N]``: run scenarios, print, rewrite
RESULTS.md."""

from __future__ import annotations

import argparse
import importlib
import os
import time

import torch

from .report import machine, save

SCENARIOS = ["train", "infer", "quant", "svd", "serve", "memory", "compress", "recover_dist"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument(
        "scenarios",
        nargs="*",
        choices=[[], *SCENARIOS],
        default=[],
        help=f"scenarios to run (default: all of {', '.join(SCENARIOS)})",
    )
    parser.add_argument(
        "--repeats", type=int, default=10, help="timed repeats per candidate (>= 10)"
    )
    args = parser.parse_args(argv)
    chosen = args.scenarios or SCENARIOS
    torch.set_num_threads(2)
    for key in chosen:
        start = time.perf_counter()
        module = importlib.import_module(f"benchmarks.scenarios.{key}")
        load_before = machine()
        section = module.run(args.repeats)
        section.machine = load_before + f"; load at the end {os.getloadavg()[0]:.1f}"
        print(f"== {section.title} ({time.perf_counter() - start:.0f} s)")
        for row in section.rows:
            met = "" if row.met is None else ("  [met]" if row.met else "  [MISSED]")
            print(f"  {row.comparison}: {row.value}  {row.target}{met}")
        for note in section.notes:
            print(f"  - {note}")
        path = save([section], SCENARIOS)  # after each scenario: a long run keeps what it measured
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
