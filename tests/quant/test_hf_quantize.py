"""quantize() on tiny Hugging Face Llama / GPT-2 / BERT: every preset runs, heads stay
unquantized."""

import pytest
import torch

import qpeft
from qpeft.quant import model_quantizers
from tests.models import HF_MODELS, fit_random_target, hf_output, token_ids

pytest.importorskip("transformers")


@pytest.mark.parametrize("preset", sorted(qpeft.PRESETS))
@pytest.mark.parametrize("name", sorted(HF_MODELS))
def test_each_preset_runs_and_leaves_the_head_alone(name, preset):
    model, ids = HF_MODELS[name](), token_ids(9)
    with torch.no_grad():
        ref = hf_output(model, ids)
        qpeft.quantize(model, preset, forward_loop=lambda m: m(input_ids=ids))
        out = hf_output(model, ids)
    assert out.shape == ref.shape and torch.isfinite(out).all() and not torch.equal(out, ref)
    quantizers = model_quantizers(model)
    enabled = [n for n, q in quantizers.items() if q.is_enabled]
    assert len(enabled) >= 8
    assert not any("lm_head" in n for n in enabled)
    assert all(".weight_quantizer" in n for n in enabled) or "weight_only" not in preset


@pytest.mark.parametrize("name", sorted(HF_MODELS))
def test_lora_on_a_quantized_hf_model_trains_and_restores(name):
    model, ids = HF_MODELS[name](), token_ids(9)
    qpeft.quantize(model, "int8", forward_loop=lambda m: m(input_ids=ids))
    qpeft.update_model(model, {"adapter_cfg": {"*": {"rank": 4}, "*lm_head*": {"enable": False}}})
    losses = fit_random_target(model, ids, steps=5)  # eval mode, so no dropout noise
    assert losses[-1] < losses[0]
    fresh = HF_MODELS[name]().eval()
    qpeft.core.modes.replay(fresh, qpeft.state(model))
    fresh.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(hf_output(fresh, ids), hf_output(model, ids))
