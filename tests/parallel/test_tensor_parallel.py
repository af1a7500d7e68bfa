"""Tensor parallelism of LoRA layers: plan rewriting (one process) and 2 gloo ranks vs. one
process."""

import pytest
import torch
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, SequenceParallel

import qpeft
from qpeft import LoRAColwiseParallel, LoRARowwiseParallel, lora_tp_plan
from tests.parallel import cases
from tests.parallel.cases import block_batch, block_loss, block_model, train
from tests.parallel.checks import assert_like_reference, load
from tests.parallel.scenarios import block_plan

WORLD = 2


# -- the plan ------------------------------------------------------------------------------------
def test_plan_swaps_column_and_row_styles_keeping_layouts():
    model = block_model()
    user = block_plan()
    plan = lora_tp_plan(model, user)
    assert sorted(plan) == sorted(user)
    assert type(plan["attn.q_proj"]) is LoRAColwiseParallel
    assert plan["attn.q_proj"].output_layouts == (Replicate(),)
    assert type(plan["mlp.up"]) is LoRAColwiseParallel
    assert plan["mlp.up"].output_layouts == (Shard(-1),)
    assert type(plan["mlp.down"]) is LoRARowwiseParallel
    assert type(user["mlp.up"]) is ColwiseParallel  # the user's plan is not modified


def test_plan_keeps_other_styles_and_wildcards():
    model = cases.llama_model()
    plan = lora_tp_plan(
        model, {"model.layers.*.mlp.*_proj": ColwiseParallel(), "model.norm": SequenceParallel()}
    )
    assert type(plan["model.layers.*.mlp.*_proj"]) is LoRAColwiseParallel
    assert type(plan["model.norm"]) is SequenceParallel


def test_plan_key_matching_nothing_is_an_error():
    with pytest.raises(ValueError, match="'mlp.nope' matches no submodule"):
        lora_tp_plan(block_model(), {"mlp.nope": ColwiseParallel()})


def test_plan_key_inside_a_lora_layer_is_an_error():
    with pytest.raises(ValueError, match="'mlp.up.base' inside LoRA layer 'mlp.up'"):
        lora_tp_plan(block_model(), {"mlp.up.base": ColwiseParallel()})


def test_other_style_on_a_lora_layer_is_an_error():
    with pytest.raises(ValueError, match="SequenceParallel to LoRA layer 'mlp.up'"):
        lora_tp_plan(block_model(), {"mlp.up": SequenceParallel()})


# -- 2 ranks -------------------------------------------------------------------------------------
S0, S1, R = ("S(0)",), ("S(1)",), ("R",)  # str() of Shard(0), Shard(1), Replicate()


def _layout(
    placements: dict, layer: str, weight: tuple, bias: tuple | None, a: tuple, b: tuple
) -> None:
    want = {
        f"{layer}.base.weight": weight,
        f"{layer}.adapters.a.lora_a": a,
        f"{layer}.adapters.a.lora_b": b,
    }
    if bias is not None:
        want[f"{layer}.base.bias"] = bias
    assert {k: placements[k] for k in want} == want


def test_adapters_are_sharded_like_their_base(outdir):
    """Column: W and B on out, A replicated. Row: W and A on in, B (and the bias) replicated."""
    for rank in range(WORLD):
        placements = load(outdir, "tp_block", rank)["placements"]
        _layout(placements, "mlp.up", S0, S0, R, S0)
        _layout(placements, "mlp.down", S1, R, S1, R)
        _layout(placements, "attn.q_proj", S0, S0, R, S0)
        assert not any(
            k.startswith(("lm_head", "attn.v_proj")) for k in placements
        )  # not in the plan
        gpt2 = load(outdir, "tp_gpt2_conv1d", rank)["placements"]  # Conv1D stores W as [in, out]
        _layout(gpt2, "transformer.h.0.mlp.c_fc", S1, S0, R, S0)
        _layout(gpt2, "transformer.h.1.mlp.c_proj", S0, R, S1, R)


def test_tiny_block_outputs_grads_and_training_match_one_process(outdir):
    ref = train(block_model(), block_batch(), block_loss)
    for rank in range(WORLD):
        assert_like_reference(load(outdir, "tp_block", rank), ref, f"tp rank {rank}")


def test_llama_with_two_adapters_matches_one_process(outdir):
    ref = train(cases.llama_model(), cases.llama_batch(), cases.llama_loss)
    assert any("o_proj.adapters.a" in k for k in ref["grads"])  # a row-parallel layer is covered
    for rank in range(WORLD):
        assert_like_reference(load(outdir, "tp_llama", rank), ref, f"tp llama rank {rank}")


def test_adapters_add_no_communication_to_the_forward(outdir):
    for rank in range(WORLD):
        counts = load(outdir, "tp_comms", rank)
        assert counts["lora"] == counts["base"]
        assert sum(counts["base"].values()) == 2  # q_proj's all-gather, down's one all-reduce


def test_parallelize_lora_rejects_a_bad_plan_before_sharding():
    model = block_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="inside LoRA layer"):
        qpeft.parallelize_lora(
            model, None, {"mlp.up": ColwiseParallel(), "mlp.down.base": RowwiseParallel()}
        )
    assert all(
        type(v) is torch.Tensor and torch.equal(v, before[k]) for k, v in model.state_dict().items()
    )


def test_gpt2_conv1d_layers_shard_on_their_stored_layout(outdir):
    ref = train(cases.gpt2_model(), cases.llama_batch(), cases.llama_loss)
    assert any("mlp.c_proj.adapters.a" in k for k in ref["grads"])
    for rank in range(WORLD):
        assert_like_reference(load(outdir, "tp_gpt2_conv1d", rank), ref, f"tp gpt2 rank {rank}")
