"""Careless calls on converted models: a clear error naming the problem, the model unchanged."""

import pytest
import torch

import qpeft
from tests.checkpoint.helpers import randomize_adapters, untouched
from tests.models import TinyBlock, tiny_gpt2, tiny_llama, token_ids


def _two_adapters():
    model = TinyBlock()
    qpeft.update_model(model, {"adapter_name": "a", "adapter_cfg": {"*": {"rank": 2}}})
    qpeft.update_model(model, {"adapter_name": "b", "adapter_cfg": {"*mlp*": {"rank": 2}}})
    randomize_adapters(model)
    return model


@pytest.mark.parametrize(
    "call",
    [
        lambda m: qpeft.disable_adapters(m, adapters_to_disable="nope"),
        lambda m: qpeft.enable_adapters(m, adapters_to_enable=["a", "nope"]),
        lambda m: qpeft.freeze_lora_weights(m, adapter_patterns="nope"),
        lambda m: qpeft.unfreeze_lora_weights(m, adapter_patterns="nope"),
    ],
)
def test_an_adapter_name_no_layer_has_is_an_error_naming_the_known_ones(call):
    model = _two_adapters()
    unchanged = untouched(model)
    with pytest.raises(ValueError, match=r"no adapter named 'nope'; the model has \['a', 'b'\]"):
        call(model)
    unchanged()


def test_a_wildcard_matching_nothing_stays_a_no_op():
    model = _two_adapters()
    qpeft.disable_adapters(model, adapters_to_disable="z*")
    assert all(
        a.enable for layer in qpeft.lora_layers(model).values() for a in layer.adapters.values()
    )


@pytest.mark.parametrize(
    ("call", "what"),
    [
        (lambda m: qpeft.merge_adapters(m, "a"), "merge_adapters"),
        (lambda m: qpeft.delete_adapter(m, "b"), "delete_adapter"),
        (lambda m: qpeft.export(m), "export"),
    ],
)
def test_structural_changes_inside_adapter_routing_are_refused(call, what):
    model = _two_adapters()
    x = torch.randn(2, 16)
    with qpeft.adapter_routing(model, ["a", "b"]):
        before = model(x)
        unchanged = untouched(model)
        with pytest.raises(ValueError, match=f"{what} is not allowed inside qpeft.adapter_routing"):
            call(model)
        unchanged()
        assert torch.equal(model(x), before)


def _tied(build):
    model = build()
    qpeft.update_model(model, {"adapter_cfg": {"*lm_head*": {"rank": 2}}})
    randomize_adapters(model)
    return model


@pytest.mark.parametrize("build", [tiny_gpt2, lambda: _llama_tied()], ids=["gpt2", "llama_tied"])
@pytest.mark.parametrize("call", [qpeft.merge_adapters, qpeft.export])
def test_folding_into_a_tied_head_is_refused_naming_the_pair(build, call):
    model = _tied(build)
    ids = token_ids()
    with torch.no_grad():
        before = model(ids).logits
    unchanged = untouched(model)
    with pytest.raises(ValueError, match=r"tied to \[.*(wte|embed_tokens).*\]"):
        call(model)
    unchanged()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)


def _llama_tied():
    from transformers import LlamaConfig, LlamaForCausalLM

    base = tiny_llama()
    cfg = LlamaConfig(**{**base.config.to_dict(), "tie_word_embeddings": True})
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


def test_an_untied_head_still_merges():
    model = _tied(tiny_llama)
    assert model.lm_head.base.weight is not model.model.embed_tokens.weight
    ids = token_ids()
    with torch.no_grad():
        before = model(ids).logits
        qpeft.merge_adapters(model)
        torch.testing.assert_close(model(ids).logits, before, atol=1e-5, rtol=1e-5)
