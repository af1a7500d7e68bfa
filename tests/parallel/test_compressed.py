"""Compressed models (``qpeft.compress``) under DDP and FSDP2 (``fully_shard`` per block) on 2 gloo
ranks vs. one process: the adapters train alike, the packed buffers stay whole and equal on every
rank, and ``qpeft.save`` / ``save_adapters`` restore on one process. Dense layers, and a Qwen3-MoE
whose grouped experts are packed too (adapters on the experts)."""

import pytest
import torch

import qpeft
from tests.models import TinyBlock
from tests.parallel.cases import block_batch, block_loss, block_model, train, trained_block
from tests.parallel.checks import assert_close, assert_like_reference, assert_same_tensors, load
from tests.parallel.compressed_scenarios import (
    PRESETS,
    moe_batch,
    moe_loss,
    moe_model,
    packed_buffers,
)

WORLD = 2


def _adapters(model):
    return {k: v for k, v in model.state_dict().items() if qpeft.parallel.is_adapter_key(k)}


def _assert_bitwise(got: dict, want: dict, what: str) -> None:
    assert sorted(got) == sorted(want) and want, f"{what}: keys differ"
    for key in sorted(want):
        assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), (what, key)


@pytest.mark.parametrize("engine", ["c_ddp", "c_fsdp2"])
@pytest.mark.parametrize("preset", PRESETS)
def test_compressed_model_trains_like_one_process(outdir, engine, preset):
    ref = train(block_model(quant=preset, compress=True), block_batch(), block_loss)
    packed = packed_buffers(block_model(quant=preset, compress=True))
    for rank in range(WORLD):
        record = load(outdir, engine, rank)[preset]
        what = f"{engine} {preset} rank {rank}"
        assert_like_reference(record, ref, what, (rank, WORLD))
        assert record["dtensor_buffers"] == [], what  # FSDP2 shards parameters, not buffers
        _assert_bitwise(record["packed_before"], packed, f"{what} packed before")
        _assert_bitwise(record["packed_after"], packed, f"{what} packed after")


@pytest.mark.parametrize("engine", ["c_ddp", "c_fsdp2"])
@pytest.mark.parametrize("preset", PRESETS)
def test_checkpoints_of_compressed_distributed_models_restore_on_one_process(
    outdir, engine, preset
):
    ref = trained_block(preset, compress=True)
    x = block_batch()[0]
    names = [f"{engine}_{preset}_r{r}" for r in range(WORLD)] if engine == "c_ddp" else []
    for name in names or [f"{engine}_{preset}"]:
        restored = qpeft.restore(TinyBlock(16), outdir / f"{name}_ckpt")
        assert qpeft.state(restored) == qpeft.state(ref), name
        _assert_bitwise(packed_buffers(restored), packed_buffers(ref), f"{name} packed")
        assert_same_tensors(_adapters(restored), _adapters(ref), f"{name} adapters")
        assert_close(restored(x).detach(), ref(x).detach(), f"{name} output")
        fresh = block_model(quant=preset, compress=True)
        for adapter in ("a", "b"):
            qpeft.delete_adapter(fresh, adapter)
        qpeft.load_adapters(fresh, outdir / f"{name}_adapters")
        assert_same_tensors(_adapters(fresh), _adapters(ref), f"{name} adapter file")


@pytest.mark.parametrize("preset", PRESETS)
def test_gathered_state_dict_of_a_compressed_fsdp2_model(outdir, preset):
    want = trained_block(preset, compress=True).state_dict()
    for rank in range(WORLD):
        got = load(outdir, "c_fsdp2", rank)[preset]["full"]
        assert sorted(got) == sorted(want), f"rank {rank}: keys differ"
        bytes_ = {k: v.view(torch.uint8) for k, v in want.items() if v.element_size() == 1}
        _assert_bitwise({k: got[k].view(torch.uint8) for k in bytes_}, bytes_, f"rank {rank}")
        others = {k: v for k, v in want.items() if k not in bytes_}
        assert_same_tensors({k: got[k] for k in others}, others, f"rank {rank}")


@pytest.mark.parametrize("engine", ["c_moe_ddp", "c_moe_fsdp2"])
def test_compressed_moe_model_trains_like_one_process(outdir, engine):
    ref_model = moe_model()
    packed = packed_buffers(ref_model)
    assert any("experts" in k for k in packed), "the experts are not packed"
    ref = train(ref_model, moe_batch(), moe_loss)
    assert any("experts" in k for k in ref["grads"]), "no adapter on the experts"
    for rank in range(WORLD):
        record = load(outdir, engine, rank)
        what = f"{engine} rank {rank}"
        assert_like_reference(record, ref, what, (rank, WORLD))
        _assert_bitwise(record["packed_before"], packed, f"{what} packed before")
        _assert_bitwise(record["packed_after"], packed, f"{what} packed after")
    name = f"{engine}_r0" if engine == "c_moe_ddp" else engine
    fresh = moe_model()
    qpeft.delete_adapter(fresh, "a")
    qpeft.load_adapters(fresh, outdir / f"{name}_adapters")
    assert_same_tensors(_adapters(fresh), _adapters(ref_model), f"{name} adapter file")
