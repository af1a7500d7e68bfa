"""What each rank runs: one function per scenario, ``(mesh, outdir) -> record`` (saved by worker).

Data parallelism gives each rank its slice of the batch; tensor parallelism gives every rank the
whole batch. Models are built from the same seed on every rank and moved to ``cases.device()``.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
from torch.distributed.tensor import Replicate
from torch.distributed.tensor.debug import CommDebugMode
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel
from torch.nn.parallel import DistributedDataParallel as DDP

import qpeft
from tests.parallel import cases
from tests.parallel.cases import block_batch, block_loss, block_model, shard, train


def _to(batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return tuple(t.to(cases.device()) for t in batch)


def _local_batch() -> tuple[torch.Tensor, ...]:
    return _to(shard(block_batch(), dist.get_rank(), dist.get_world_size()))


def _ddp(model: torch.nn.Module, **kwargs) -> DDP:
    dev = cases.device()
    return DDP(model.to(dev), device_ids=[dev.index] if dev.type == "cuda" else None, **kwargs)


def block_plan() -> dict:
    """A user's plan for TinyBlock: MLP column then row; q_proj column, gathered back."""
    return {
        "attn.q_proj": ColwiseParallel(output_layouts=Replicate()),
        "mlp.up": ColwiseParallel(),
        "mlp.down": RowwiseParallel(),
    }


def llama_plan() -> dict:
    """The usual Megatron-style plan for a Llama decoder."""
    col, row = ColwiseParallel, RowwiseParallel
    layer = "model.layers.*."
    return {
        **{layer + f"self_attn.{p}": col() for p in ("q_proj", "k_proj", "v_proj")},
        layer + "self_attn.o_proj": row(),
        layer + "mlp.gate_proj": col(),
        layer + "mlp.up_proj": col(),
        layer + "mlp.down_proj": row(),
    }


# -- data parallel -------------------------------------------------------------------------------
def ddp_find_unused(mesh: DeviceMesh, outdir: Path) -> dict:
    return train(
        _ddp(block_model(disable_b=True), find_unused_parameters=True), _local_batch(), block_loss
    )


def ddp_static_graph(mesh: DeviceMesh, outdir: Path) -> dict:
    return train(_ddp(block_model(disable_b=True), static_graph=True), _local_batch(), block_loss)


def ddp_unfreeze_after_wrap(mesh: DeviceMesh, outdir: Path) -> dict:
    model = block_model()
    qpeft.freeze_lora_weights(model, adapter_patterns="b")
    ddp = _ddp(model)
    qpeft.unfreeze_lora_weights(model, adapter_patterns="b")
    return train(ddp, _local_batch(), block_loss, steps=1)


def fsdp2(mesh: DeviceMesh, outdir: Path) -> dict:
    model = block_model(disable_b=True).to(cases.device())
    fully_shard(model.mlp, mesh=mesh)  # frozen base and trainable adapters in one FSDP group
    fully_shard(model, mesh=mesh)
    return train(model, _local_batch(), block_loss)


def fsdp1_orig_params(mesh: DeviceMesh, outdir: Path) -> dict:
    dev = cases.device()
    model = FullyShardedDataParallel(block_model().to(dev), use_orig_params=True, device_id=dev)
    whole = partial(FullyShardedDataParallel.summon_full_params, with_grads=True)
    return train(model, _local_batch(), block_loss, view=whole)


def fsdp1_without_orig_params(mesh: DeviceMesh, outdir: Path) -> dict:
    try:
        FullyShardedDataParallel(block_model().to(cases.device()), device_id=cases.device())
    except ValueError as err:  # raised on every rank while flattening, before any collective
        return {"error": str(err)}
    return {"error": ""}


def ddp_unused_without_flag(mesh: DeviceMesh, outdir: Path) -> dict:
    try:
        train(_ddp(block_model(disable_b=True)), _local_batch(), block_loss, steps=2)
    except RuntimeError as err:
        return {"error": str(err)}
    return {"error": ""}


DATA_PARALLEL = [
    ddp_find_unused,
    ddp_static_graph,
    ddp_unfreeze_after_wrap,
    fsdp2,
    fsdp1_orig_params,
    fsdp1_without_orig_params,
    ddp_unused_without_flag,
]


# -- tensor parallel -----------------------------------------------------------------------------
def tp_block(mesh: DeviceMesh, outdir: Path) -> dict:
    model = qpeft.parallelize_lora(block_model().to(cases.device()), mesh, block_plan())
    return {**train(model, _to(block_batch()), block_loss), "placements": cases.placements(model)}


def tp_llama(mesh: DeviceMesh, outdir: Path) -> dict:
    model = qpeft.parallelize_lora(cases.llama_model().to(cases.device()), mesh, llama_plan())
    return train(model, _to(cases.llama_batch()), cases.llama_loss)


def tp_gpt2_conv1d(mesh: DeviceMesh, outdir: Path) -> dict:
    """GPT-2's MLP: ``Conv1D`` layers (weight ``[in, out]``), column then row parallel."""
    plan = {
        "transformer.h.*.mlp.c_fc": ColwiseParallel(),
        "transformer.h.*.mlp.c_proj": RowwiseParallel(),
    }
    model = qpeft.parallelize_lora(cases.gpt2_model().to(cases.device()), mesh, plan)
    record = train(model, _to(cases.llama_batch()), cases.llama_loss)
    return {**record, "placements": cases.placements(model)}


def _comm_counts(model: torch.nn.Module, x: torch.Tensor) -> dict[str, int]:
    with CommDebugMode() as comm:
        model(x)
    return {str(op): n for op, n in sorted(comm.get_comm_counts().items(), key=str)}


def tp_comms(mesh: DeviceMesh, outdir: Path) -> dict:
    model = qpeft.parallelize_lora(block_model().to(cases.device()), mesh, block_plan())
    x = _to(block_batch())[0]
    with qpeft.disabled_adapters(model):
        base = _comm_counts(model, x)
    return {"lora": _comm_counts(model, x), "base": base}


TENSOR_PARALLEL = [tp_block, tp_llama, tp_gpt2_conv1d, tp_comms]


# -- quantized bases (qpeft.quantize) --------------------------------------------------------------
def _record_error(run) -> dict:
    try:
        return run()
    except RuntimeError as err:  # raised identically on every rank, before any collective
        return {"error": str(err)}


def q_ddp_nvfp4(mesh: DeviceMesh, outdir: Path) -> dict:
    return train(_ddp(block_model(quant="nvfp4")), _local_batch(), block_loss)


def q_fsdp2_nvfp4(mesh: DeviceMesh, outdir: Path) -> dict:
    model = block_model(quant="nvfp4").to(cases.device())
    fully_shard(model.mlp, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return train(model, _local_batch(), block_loss)


def q_tp_int8(mesh: DeviceMesh, outdir: Path) -> dict:
    model = qpeft.parallelize_lora(block_model(quant="int8").to(cases.device()), mesh, block_plan())
    return _record_error(lambda: train(model, _to(block_batch()), block_loss))


def q_tp_nvfp4(mesh: DeviceMesh, outdir: Path) -> dict:
    model = qpeft.parallelize_lora(
        block_model(quant="nvfp4").to(cases.device()), mesh, block_plan()
    )
    return _record_error(lambda: train(model, _to(block_batch()), block_loss))


def q_state_dict(mesh: DeviceMesh, outdir: Path) -> dict:
    """Gather a trained int8 TP model; load the reference's trained nvfp4 state into FSDP2."""
    tp = qpeft.parallelize_lora(block_model(quant="int8").to(cases.device()), mesh, block_plan())
    train(tp, _to(block_batch()), block_loss)
    fsdp = block_model(quant="nvfp4").to(cases.device())
    fully_shard(fsdp.mlp, mesh=mesh)
    fully_shard(fsdp, mesh=mesh)
    qpeft.load_full_state_dict(fsdp, torch.load(outdir / "ref_nvfp4_sd.pt"))
    return {
        "tp_int8": qpeft.full_state_dict(tp),
        "fsdp2_nvfp4": cases.full(fsdp(_to(block_batch())[0])),
    }


QUANTIZED = [q_ddp_nvfp4, q_fsdp2_nvfp4, q_tp_int8, q_tp_nvfp4, q_state_dict]


# -- state dicts and checkpoints -----------------------------------------------------------------
def _fsdp2_block(mesh: DeviceMesh) -> torch.nn.Module:
    model = block_model().to(cases.device())
    fully_shard(model.mlp, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def _tp_block(mesh: DeviceMesh) -> torch.nn.Module:
    return qpeft.parallelize_lora(block_model().to(cases.device()), mesh, block_plan())


def sd_gathered(mesh: DeviceMesh, outdir: Path) -> dict:
    """Full state dicts gathered from trained FSDP2, TP and DDP models."""
    record = {}
    for name, model, batch in [
        ("fsdp2", _fsdp2_block(mesh), _local_batch()),
        ("tp", _tp_block(mesh), _to(block_batch())),
        ("ddp", _ddp(block_model()), _local_batch()),
    ]:
        train(model, batch, block_loss)
        record[name] = qpeft.full_state_dict(model)
        record[name + "_adapters"] = qpeft.full_state_dict(model, adapters_only=True)
        record[name + "_rank0"] = sorted(qpeft.full_state_dict(model, rank0_only=True))
    return record


def sd_load_full(mesh: DeviceMesh, outdir: Path) -> dict:
    """Load the reference's trained state dict (whole, then adapters only) into sharded models."""
    ref = torch.load(outdir / "ref_sd.pt")
    adapters = {k: v for k, v in ref.items() if ".adapters." in k}
    x = _to(block_batch())[0]
    fsdp, tp = _fsdp2_block(mesh), _tp_block(mesh)
    qpeft.load_full_state_dict(fsdp, ref)
    qpeft.load_full_state_dict(tp, adapters)
    return {"fsdp2": cases.full(fsdp(x)), "tp": cases.full(tp(x))}


def sd_dcp(mesh: DeviceMesh, outdir: Path) -> dict:
    """torch.distributed.checkpoint: save from TP and from FSDP2, load into fresh TP models."""
    record = {}
    for name, model, batch in [
        ("tp", _tp_block(mesh), _to(block_batch())),
        ("fsdp2", _fsdp2_block(mesh), _local_batch()),
    ]:
        train(model, batch, block_loss)
        dcp.save(get_model_state_dict(model), checkpoint_id=outdir / f"dcp_{name}")
        fresh = _tp_block(mesh)
        state = get_model_state_dict(fresh)
        dcp.load(state, checkpoint_id=outdir / f"dcp_{name}")
        set_model_state_dict(fresh, state)
        record[name] = cases.full(fresh(_to(block_batch())[0]))
    return record


def sd_qpeft_save(mesh: DeviceMesh, outdir: Path) -> dict:
    """qpeft.save of a trained TP model: gather, load into a plain replica on rank 0, save that."""
    model = _tp_block(mesh)
    train(model, _to(block_batch()), block_loss)
    full = qpeft.full_state_dict(model, rank0_only=True)  # a collective: every rank calls it
    if dist.get_rank() == 0:
        replica = block_model()  # same modes as the sharded model, plain tensors
        replica.load_state_dict(full)
        qpeft.save(replica, outdir / "qpeft_ckpt")
    return {}


STATE_DICT = [sd_gathered, sd_load_full, sd_dcp, sd_qpeft_save]
