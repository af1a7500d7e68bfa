"""The shared invariants every supported Hugging Face architecture must keep under qpeft."""

import copy

import pytest
import torch

import qpeft
from tests.models import HF_MODELS, fit_random_target, hf_output, token_ids

pytest.importorskip("transformers")


@pytest.mark.parametrize("name", sorted(HF_MODELS))
def test_zero_b_is_bit_identical_and_base_checkpoint_loads(name):
    model = HF_MODELS[name]()
    base_sd = copy.deepcopy(model.state_dict())
    ids = token_ids(12)
    with torch.no_grad():
        ref = hf_output(model, ids)
    qpeft.update_model(model, {"adapter_cfg": {"*": {"rank": 4}, "*lm_head*": {"enable": False}}})
    assert len(qpeft.lora_layers(model)) >= 8
    with torch.no_grad():
        assert torch.equal(hf_output(model, ids), ref)
    missing, unexpected = model.load_state_dict(base_sd, strict=False)
    assert not unexpected and all(".adapters." in k for k in missing)
    with torch.no_grad():
        assert torch.equal(hf_output(copy.deepcopy(model), ids), ref)


@pytest.mark.parametrize("name", sorted(HF_MODELS))
def test_a_few_steps_on_the_adapters_lower_the_loss(name):
    model = HF_MODELS[name]()
    qpeft.update_model(model, {"adapter_cfg": {"*": {"rank": 4}, "*lm_head*": {"enable": False}}})
    torch.manual_seed(0)  # eval mode: dropout off, so the loss comparison is deterministic
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and all(p.requires_grad for n, p in model.named_parameters() if ".adapters." in n)
    losses = fit_random_target(model, token_ids(12), steps=8)
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_generate_still_works(name):
    model = HF_MODELS[name]()
    qpeft.update_model(
        model, {"adapter_cfg": {"*": {"rank": 4, "lora_b_init": "torch.nn.init.normal_"}}}
    )
    out = model.generate(token_ids(12)[:, :4], max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 9)


def test_gpt2_conv1d_layers_are_wrapped_and_transposed_correctly():
    model = HF_MODELS["gpt2"]()
    qpeft.update_model(
        model, {"adapter_cfg": {"*c_attn": {"rank": 3, "lora_b_init": "torch.nn.init.normal_"}}}
    )
    layer = model.transformer.h[0].attn.c_attn
    assert type(layer).__name__ == "LoRAConv1D"
    x = torch.randn(2, 5, 32)
    a = layer.adapters["default"]
    expected = x @ layer.weight + layer.bias + a.scale * (x @ a.lora_a.T @ a.lora_b.T)
    torch.testing.assert_close(layer(x), expected)
    assert a.lora_a.shape == (3, 32) and a.lora_b.shape == (96, 3)
