"""What each rank runs for compressed models (``qpeft.compress``: packed codes and scales as
buffers, no master weight) under DDP and FSDP2: training, the packed buffers, qpeft's files."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

import qpeft
from qpeft.quant.compressed import PackedDense
from qpeft.quant.compressed_experts import packed_buffer_names
from tests.models import tiny_qwen3_moe, token_ids
from tests.parallel import cases
from tests.parallel.cases import block_loss, block_model, shard, train
from tests.parallel.scenarios import _ddp, _local_batch, _to

PRESETS = ("int8", "nvfp4")
MOE_PRESET = "nvfp4"


def packed_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every packed buffer (codes and scales) of the compressed layers, as plain CPU tensors
    (fp8 scales viewed as bytes, so comparisons are bitwise)."""
    out = {}
    for name, module in sorted(model.named_modules()):
        found = module.packed_tensors() if isinstance(module, PackedDense) else {}
        found.update({key: getattr(module, key) for key in packed_buffer_names(module)})
        for key, t in sorted(found.items()):
            t = cases.full(t)
            out[f"{cases.clean(name)}.{key}"] = (
                t.view(torch.uint8) if t.is_floating_point() and t.element_size() == 1 else t
            )
    return out


def moe_model() -> nn.Module:
    """Tiny Qwen3-MoE quantized with ``MOE_PRESET`` and compressed, grouped experts included;
    adapter ``a`` on every layer, experts too."""
    model = tiny_qwen3_moe()
    ids = moe_batch()[0]
    qpeft.quantize(model, MOE_PRESET, forward_loop=lambda m: m(input_ids=ids))
    model.requires_grad_(False)
    torch.manual_seed(0)
    lora = {"rank": 4, "lora_b_init": "torch.nn.init.normal_"}
    qpeft.update_model(model, {"adapter_name": "a", "adapter_cfg": {"*": lora}})
    return qpeft.compress(model)


def moe_batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(2)
    return token_ids(length=8, batch=4), torch.randn(4, 8, 64, generator=gen)


def moe_loss(model: nn.Module, batch) -> tuple[torch.Tensor, torch.Tensor]:
    ids, target = batch
    out = model(input_ids=ids).logits
    return out, F.mse_loss(out, target)


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


def _moe_run(model: nn.Module, outdir: Path, name: str) -> dict:
    before = packed_buffers(model)
    local = _to(shard(moe_batch(), dist.get_rank(), dist.get_world_size()))
    record = train(model, local, moe_loss)
    qpeft.save_adapters(model, outdir / f"{name}_adapters")
    return {**record, "packed_before": before, "packed_after": packed_buffers(model)}


def c_moe_ddp(mesh: DeviceMesh, outdir: Path) -> dict:
    """The compressed MoE model (packed experts) under DDP."""
    return _moe_run(_ddp(moe_model()), outdir, f"c_moe_ddp_r{mesh.get_rank()}")


def c_moe_fsdp2(mesh: DeviceMesh, outdir: Path) -> dict:
    """The compressed MoE model under FSDP2, ``fully_shard`` per decoder layer then the root."""
    model = moe_model().to(cases.device())
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    return _moe_run(fully_shard(model, mesh=mesh), outdir, "c_moe_fsdp2")


COMPRESSED = [c_ddp, c_fsdp2, c_moe_ddp, c_moe_fsdp2]
