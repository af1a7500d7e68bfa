"""What each rank runs for compressed models (``qpeft.compress``: packed codes and scales as
buffers, no master weight) under DDP and FSDP2: training, the packed buffers, qpeft's files."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

import qpeft
from qpeft.quant.compressed import PackedDense
from tests.parallel import cases
from tests.parallel.cases import block_loss, block_model, train
from tests.parallel.scenarios import _ddp, _local_batch

PRESETS = ("int8", "nvfp4")


def packed_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every packed buffer (codes and scales) of the compressed layers, as plain CPU tensors
    (fp8 scales viewed as bytes, so comparisons are bitwise)."""
    out = {}
    for name, module in sorted(model.named_modules()):
        if isinstance(module, PackedDense):
            for key, t in sorted(module.packed_tensors().items()):
                t = cases.full(t)
                out[f"{cases.clean(name)}.{key}"] = (
                    t.view(torch.uint8) if t.is_floating_point() and t.element_size() == 1 else t
                )
    return out


def _fsdp2(model: nn.Module, mesh: DeviceMesh) -> nn.Module:
    """``fully_shard`` per block (each attention projection, the MLP), then the root."""
    for layer in model.attn.values():  # v_proj has no bias: a compressed layer of adapters only
        fully_shard(layer, mesh=mesh)
    fully_shard(model.mlp, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def _run(model: nn.Module, outdir: Path, name: str) -> dict:
    """Train on this rank's rows, then ``qpeft.save`` and ``save_adapters`` (collectives under
    FSDP2); record the packed buffers before and after and any that became a DTensor."""
    before = packed_buffers(model)
    record = train(model, _local_batch(), block_loss)
    qpeft.save(model, outdir / f"{name}_ckpt")
    qpeft.save_adapters(model, outdir / f"{name}_adapters")
    sharded = [n for n, b in model.named_buffers() if isinstance(b, DTensor)]
    return {
        **record,
        "packed_before": before,
        "packed_after": packed_buffers(model),
        "dtensor_buffers": sharded,
    }


def c_ddp(mesh: DeviceMesh, outdir: Path) -> dict:
    return {
        p: _run(_ddp(block_model(quant=p, compress=True)), outdir, f"c_ddp_{p}_r{mesh.get_rank()}")
        for p in PRESETS
    }


def c_fsdp2(mesh: DeviceMesh, outdir: Path) -> dict:
    """As ``c_ddp`` under FSDP2, plus the gathered state dict (``qpeft.full_state_dict``)."""
    models = {
        p: _fsdp2(block_model(quant=p, compress=True).to(cases.device()), mesh) for p in PRESETS
    }
    return {
        p: {**_run(m, outdir, f"c_fsdp2_{p}"), "full": qpeft.full_state_dict(m)}
        for p, m in models.items()
    }


COMPRESSED = [c_ddp, c_fsdp2]
