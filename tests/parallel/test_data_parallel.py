"""DDP, FSDP2 ``fully_shard`` and FSDP1 (``use_orig_params``) on 2 gloo ranks vs. one process.

Each rank trains on its half of the batch; the reference trains on the whole batch. Gradients are
averaged across ranks, so outputs, step-0 adapter gradients and adapters after 3 SGD steps match.
"""

import pytest
import torch

from tests.parallel.cases import block_batch, block_loss, block_model, shard, train
from tests.parallel.checks import assert_close, assert_like_reference, load

WORLD = 2


@pytest.mark.parametrize("scenario", ["ddp_find_unused", "ddp_static_graph"])
def test_ddp_with_a_disabled_adapter_matches_one_process(outdir, scenario):
    ref = train(block_model(disable_b=True), block_batch(), block_loss)
    assert not any(".adapters.b." in k for k in ref["grads"])  # b is unused in forward
    for rank in range(WORLD):
        assert_like_reference(
            load(outdir, scenario, rank), ref, f"{scenario} rank {rank}", (rank, WORLD)
        )


def test_ddp_without_unused_flag_fails_on_second_step(outdir):
    for rank in range(WORLD):
        assert (
            "find_unused_parameters=True" in load(outdir, "ddp_unused_without_flag", rank)["error"]
        )


def test_ddp_unfreezing_after_wrapping_skips_grad_sync(outdir):
    full = train(block_model(), block_batch(), block_loss, steps=1)["grads"]
    grads = [load(outdir, "ddp_unfreeze_after_wrap", r)["grads"] for r in range(WORLD)]
    for rank in range(WORLD):
        local = train(block_model(), shard(block_batch(), rank, WORLD), block_loss, steps=1)[
            "grads"
        ]
        for key in sorted(full):
            want = full[key] if ".adapters.a." in key else local[key]  # b: never averaged
            assert_close(grads[rank][key], want, f"rank {rank} {key}")
    b_key = "mlp.up.adapters.b.lora_b"
    assert not torch.allclose(grads[0][b_key], grads[1][b_key])


def test_fsdp2_frozen_base_and_adapters_in_one_group_matches_one_process(outdir):
    ref = train(block_model(disable_b=True), block_batch(), block_loss)
    for rank in range(WORLD):
        assert_like_reference(load(outdir, "fsdp2", rank), ref, f"fsdp2 rank {rank}", (rank, WORLD))


def test_fsdp1_use_orig_params_matches_one_process(outdir):
    ref = train(block_model(), block_batch(), block_loss)
    for rank in range(WORLD):
        record = load(outdir, "fsdp1_orig_params", rank)
        assert_like_reference(record, ref, f"fsdp1 rank {rank}", (rank, WORLD))


def test_fsdp1_without_use_orig_params_refuses_frozen_and_trainable_together(outdir):
    for rank in range(WORLD):
        assert "uniform `requires_grad`" in load(outdir, "fsdp1_without_orig_params", rank)["error"]
