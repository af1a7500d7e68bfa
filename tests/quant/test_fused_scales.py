"""quantize(..., tie_fused_scales=True): layers an engine fuses share their per-tensor amaxes."""

import pytest
import torch

import qpeft
from qpeft.quant import fake_quant_nvfp4
from tests.models import tiny_llama, token_ids

QKV = ["q_proj", "k_proj", "v_proj"]


def _attn(model, layer=0):
    return model.model.layers[layer].self_attn


def test_nvfp4_global_amaxes_are_the_groups_max_and_the_weights_quantize_with_it():
    untied, tied = tiny_llama(), tiny_llama()
    qpeft.quantize(untied, "nvfp4_weight_only")
    qpeft.quantize(tied, "nvfp4_weight_only", tie_fused_scales=True)
    own = [getattr(_attn(untied), p).weight_quantizer.amax for p in QKV]
    assert len({a.item() for a in own}) > 1  # the test model's projections differ
    top = torch.stack(own).max()
    for p in QKV:
        layer = getattr(_attn(tied), p)
        assert torch.equal(layer.weight_quantizer.amax, top.reshape(own[0].shape))
        want = fake_quant_nvfp4(layer.weight.detach(), top)
        assert torch.equal(layer.quantized_weight(), want)
    gate, up = tied.model.layers[0].mlp.gate_proj, tied.model.layers[0].mlp.up_proj
    assert torch.equal(gate.weight_quantizer.amax, up.weight_quantizer.amax)
    down = tied.model.layers[0].mlp.down_proj  # not fused with anything: its own amax
    assert torch.equal(
        down.weight_quantizer.amax, untied.model.layers[0].mlp.down_proj.weight_quantizer.amax
    )


def test_static_input_amaxes_tie_and_per_row_weight_amaxes_stay():
    ids = token_ids()
    model = tiny_llama()
    qpeft.quantize(model, "int8", lambda m: m(ids), tie_fused_scales=True)
    entry = qpeft.state(model)[-1]["config"]
    assert [
        "model.layers.0.self_attn.k_proj",
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.v_proj",
    ] in entry["tied_scales"]
    attn = _attn(model)
    assert attn.q_proj.weight_quantizer.amax.numel() > 1  # per row: an engine keeps it per row
    assert not torch.equal(attn.q_proj.weight_quantizer.amax, attn.k_proj.weight_quantizer.amax)
    assert torch.equal(attn.q_proj.input_quantizer.amax, attn.k_proj.input_quantizer.amax)


def test_tied_scales_survive_save_and_restore(tmp_path):
    model = tiny_llama()
    qpeft.quantize(model, "nvfp4_weight_only", tie_fused_scales=True)
    qpeft.save(model, tmp_path / "ck")
    restored = qpeft.restore(tiny_llama(), tmp_path / "ck")
    for p in QKV:
        assert torch.equal(
            getattr(_attn(restored), p).weight_quantizer.amax,
            getattr(_attn(model), p).weight_quantizer.amax,
        )
    ids = token_ids()
    with torch.no_grad():
        assert torch.equal(restored(ids).logits, model(ids).logits)


def test_a_non_bool_is_refused_and_the_model_kept():
    model = tiny_llama()
    with pytest.raises(TypeError, match="tie_fused_scales must be a bool"):
        qpeft.quantize(model, "nvfp4_weight_only", tie_fused_scales="yes")
    assert qpeft.state(model) == []
