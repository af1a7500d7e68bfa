"""Quantized bases (``qpeft.quantize``, LoRA over ``QuantLinear``) under DDP, FSDP2 and tensor
parallelism on 2 gloo ranks vs. one process."""

import pytest

from tests.parallel.cases import block_batch, block_loss, block_model, train, trained_block
from tests.parallel.checks import assert_close, assert_like_reference, assert_same_tensors, load

WORLD = 2


@pytest.mark.parametrize("scenario", ["q_ddp_nvfp4", "q_fsdp2_nvfp4"])
def test_data_parallel_on_a_quantized_base_matches_one_process(outdir, scenario):
    ref = train(block_model(quant="nvfp4"), block_batch(), block_loss)
    for rank in range(WORLD):
        assert_like_reference(
            load(outdir, scenario, rank), ref, f"{scenario} rank {rank}", (rank, WORLD)
        )


@pytest.mark.parametrize("preset", ["int8", "nvfp4"])
def test_tensor_parallel_on_a_quantized_base_matches_one_process(outdir, preset):
    ref = train(block_model(quant=preset), block_batch(), block_loss)
    for rank in range(WORLD):
        record = load(outdir, f"q_tp_{preset}", rank)
        assert "error" not in record, record.get("error")
        assert_like_reference(record, ref, f"tp {preset} rank {rank}")


def test_state_dicts_of_quantized_sharded_models(outdir):
    """Gathered keys include the quantizers' amax; a full state loads into an FSDP2 model."""
    ref_int8 = trained_block("int8")
    want_out = trained_block("nvfp4")(block_batch()[0]).detach()
    assert any(k.endswith("weight_quantizer._amax") for k in ref_int8.state_dict())
    for rank in range(WORLD):
        record = load(outdir, "q_state_dict", rank)
        assert_same_tensors(record["tp_int8"], ref_int8.state_dict(), f"tp int8 rank {rank}")
        assert_close(record["fsdp2_nvfp4"], want_out, f"fsdp2 nvfp4 rank {rank}")
