"""What each rank runs for qpeft's own save / restore / adapter files on sharded models.

The single-process references (``ref_ckpt``: the trained block; ``ref_adapters``: its adapters
with ``b`` disabled) are written by conftest.py before the ranks start.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

import qpeft
from tests.models import TinyBlock
from tests.parallel import cases
from tests.parallel.cases import block_batch, block_loss, train
from tests.parallel.scenarios import _ddp, _fsdp2_block, _local_batch, _to, _tp_block, block_plan

GPT2_PLAN = {
    "transformer.h.*.mlp.c_fc": ColwiseParallel(),
    "transformer.h.*.mlp.c_proj": RowwiseParallel(),
}


def _x() -> torch.Tensor:
    return _to(block_batch())[0]


def ck_save_sharded(mesh: DeviceMesh, outdir: Path) -> dict:
    """Train under FSDP2 and under TP, then save and save_adapters on every rank to one path."""
    record = {}
    for name, model, batch in [
        ("fsdp2", _fsdp2_block(mesh), _local_batch()),
        ("tp", _tp_block(mesh), _to(block_batch())),
    ]:
        train(model, batch, block_loss)
        qpeft.save(model, outdir / f"ck_{name}")
        qpeft.save_adapters(model, outdir / f"ck_{name}_adapters")
        seen = sorted(p.name for p in (outdir / f"ck_{name}").iterdir())  # in place on return
        record[name] = {"out": cases.full(model(_x())), "seen": seen}
    return record


def ck_save_tied_and_ddp(mesh: DeviceMesh, outdir: Path) -> dict:
    """GPT-2 (tied embedding and head) saved under TP and FSDP2; a DDP model saved by each rank."""
    qpeft.save(
        qpeft.parallelize_lora(cases.gpt2_model().to(cases.device()), mesh, GPT2_PLAN),
        outdir / "ck_gpt2_tp",
    )
    qpeft.save(
        fully_shard(cases.gpt2_model().to(cases.device()), mesh=mesh), outdir / "ck_gpt2_fsdp2"
    )
    qpeft.save(_ddp(cases.block_model()), outdir / f"ck_ddp_r{dist.get_rank()}")
    return {}


def ck_rank0_writes(mesh: DeviceMesh, outdir: Path) -> dict:
    """Each rank passes its own path (only rank 0's is written); then rank 0's save fails."""
    rank = dist.get_rank()
    qpeft.save_adapters(_tp_block(mesh), outdir / f"ck_only_r{rank}")
    blocked = outdir / "ck_blocked"
    if rank == 0:  # a foreign non-empty directory: rank 0 refuses to replace it
        blocked.mkdir()
        (blocked / "notes.txt").write_text("not a checkpoint")
    dist.barrier()
    try:
        qpeft.save(_fsdp2_block(mesh), blocked)
    except (FileExistsError, RuntimeError) as err:
        return {"error": f"{type(err).__name__}: {err}"}
    return {"error": ""}


def _only_adapter_a(mesh: DeviceMesh) -> torch.nn.Module:
    torch.manual_seed(0)
    model = TinyBlock(16)
    qpeft.update_model(
        model, {"adapter_name": "a", "adapter_cfg": {"*": {"rank": 4, "lora_b_init": cases.NORMAL}}}
    )
    return fully_shard(model.to(cases.device()), mesh=mesh)


def ck_load_adapters(mesh: DeviceMesh, outdir: Path) -> dict:
    """The reference's adapter file into FSDP2 / TP models that have the adapters; a refusal."""
    record = {}
    for name, model in [("fsdp2", _fsdp2_block(mesh)), ("tp", _tp_block(mesh))]:
        qpeft.load_adapters(model, outdir / "ref_adapters")
        record[name] = {"out": cases.full(model(_x())), "params": cases.adapter_params(model)}
    lacking = _only_adapter_a(mesh)
    before, modes = cases.adapter_params(lacking), qpeft.state(lacking)
    try:
        qpeft.load_adapters(lacking, outdir / "ref_adapters")
        record["error"] = ""
    except ValueError as err:
        record["error"] = str(err)
    after = cases.adapter_params(lacking)
    record["untouched"] = qpeft.state(lacking) == modes and all(
        torch.equal(after[k], v) for k, v in before.items()
    )
    return record


def ck_restore_then_shard(mesh: DeviceMesh, outdir: Path) -> dict:
    """The documented route: restore on every rank, then shard; restoring into a sharded model
    fails."""
    record = {}
    for name in ("fsdp2", "tp"):
        model = qpeft.restore(TinyBlock(16), outdir / "ref_ckpt").to(cases.device())
        if name == "fsdp2":
            fully_shard(model.mlp, mesh=mesh)
            fully_shard(model, mesh=mesh)
        else:
            qpeft.parallelize_lora(model, mesh, block_plan())
        record[name] = cases.full(model(_x()))
    try:
        qpeft.restore(fully_shard(TinyBlock(16).to(cases.device()), mesh=mesh), outdir / "ref_ckpt")
        record["error"] = ""
    except ValueError as err:
        record["error"] = str(err)
    return record


CHECKPOINT = [
    ck_save_sharded,
    ck_save_tied_and_ddp,
    ck_rank0_writes,
    ck_load_adapters,
    ck_restore_then_shard,
]
