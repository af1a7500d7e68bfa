"""The recipe's view of quantized layers: linear, ``Conv1D`` and grouped MoE experts (3-D
weights, stored ``[E, out, in]`` or transposed)."""

from __future__ import annotations

import pytest
import torch

import qpeft
from qpeft.recover.layers import check_rank, layer_errors, quantized_names
from tests.models import tiny_gpt2, tiny_qwen3_moe


def _experts_model(arch: str):
    """2 decoder layers whose experts have every side 16 or more and a smaller side of 16."""
    from transformers import GptOssConfig, GptOssForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    sizes = {"vocab_size": 64, "hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 2}
    attention = {"num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 32}
    torch.manual_seed(0)
    if arch == "qwen3_moe":  # gate_up_proj [E, 32, 16], down_proj [E, 16, 16]
        config = Qwen3MoeConfig(
            **sizes, **attention, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2
        )
        return Qwen3MoeForCausalLM(config).eval()
    # GPT-OSS: transposed gate_up_proj [E, 16, 32] and down_proj [E, 16, 16]
    config = GptOssConfig(
        **sizes, **attention, head_dim=4, num_local_experts=4, num_experts_per_tok=2
    )
    return GptOssForCausalLM(config).eval()


def test_quantized_names_include_grouped_experts():
    model = tiny_qwen3_moe()
    qpeft.quantize(model, "int8_weight_only")
    names = quantized_names(model)
    assert [n for n in names if n.endswith("experts")] == [
        "model.layers.0.mlp.experts",
        "model.layers.1.mlp.experts",
    ]
    assert len(names) == 2 * 5 and not any("lm_head" in n or "gate" in n for n in names)


def test_check_rank_names_the_experts_projection_that_is_too_small():
    model = tiny_qwen3_moe()  # down_proj [E, 32, 16]: 16 is its smaller side
    qpeft.quantize(model, "int8_weight_only")
    experts = [n for n in quantized_names(model) if n.endswith("experts")]
    check_rank(model, experts, 16)
    with pytest.raises(ValueError, match=r"--rank 17 .*mlp\.experts' projection 'down_proj'"):
        check_rank(model, experts, 17)


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss", "gpt2"])
def test_full_rank_svdquant_leaves_no_weight_error(arch):
    # rank = the smaller side of every adapted weight: svdquant's factors are the whole residual
    # W - Q(W), so the error is fp32 rounding only when residual and factors share a layout
    model = tiny_gpt2() if arch == "gpt2" else _experts_model(arch)
    qpeft.quantize(model, "int4")
    names = [n for n in quantized_names(model) if arch == "gpt2" or n.endswith("experts")]
    rank = 32 if arch == "gpt2" else 16  # GPT-2: c_attn [32, 96], c_proj [32, 32], c_fc [32, 128]
    check_rank(model, names, rank)
    before = layer_errors(model, names)
    chosen = set(names)
    qpeft.update_model(
        model,
        {"adapter_cfg": {lambda n: n in chosen: {"rank": rank, "lora_init_method": "svdquant"}}},
    )
    assert sorted(qpeft.lora_layers(model)) == sorted(names)
    after = layer_errors(model, names)
    for name in names:
        assert before[name] > 1e-2, name  # int4 moves every weight
        assert after[name] < 1e-4, (name, after[name])
