"""Entry point of one rank: ``python -m tests.parallel.worker GROUP[,GROUP...] OUTDIR`` (launch.py).

The groups run their scenarios in order on one process group and save each scenario's record
as ``OUTDIR/<scenario>.rank<r>.pt``; the tests compare them with the single-process reference.
Names are iterated in sorted order everywhere: the ranks must issue collectives identically.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from tests.parallel import checkpoint_scenarios, compressed_scenarios, scenarios

GROUPS: dict[str, list[Callable]] = {
    "data_parallel": scenarios.DATA_PARALLEL,
    "tensor_parallel": scenarios.TENSOR_PARALLEL,
    "state_dict": scenarios.STATE_DICT,
    "quantized": scenarios.QUANTIZED,
    "checkpoint": checkpoint_scenarios.CHECKPOINT,
    "compressed": compressed_scenarios.COMPRESSED,
}


def main(groups: str, outdir: Path) -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    cuda = os.environ.get("QPEFT_TEST_DEVICE", "cpu") == "cuda"
    dist.init_process_group(
        "nccl" if cuda else "gloo",
        init_method=f"file://{os.environ['QPEFT_STORE']}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=90),
    )
    try:
        mesh: DeviceMesh = init_device_mesh("cuda" if cuda else "cpu", (world,))
        for scenario in [s for group in groups.split(",") for s in GROUPS[group]]:
            torch.manual_seed(0)
            record = scenario(mesh, outdir)
            torch.save(record, outdir / f"{scenario.__name__}.rank{rank}.pt")
            dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
