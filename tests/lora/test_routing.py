"""adapter_routing: per-sample adapters in one batch equal running each sample alone."""

import pytest
import torch

import qpeft
import qpeft.lora.routing
from tests.models import TinyBlock, tiny_llama
from tests.tolerances import BF16_ATOL, BF16_RTOL, FASTPATH_ATOL, FASTPATH_RTOL

DEFAULT_MARGIN = qpeft.lora.routing.DENSE_MARGIN  # before the fixture below patches it


@pytest.fixture(autouse=True, params=["dense", "gathered"])
def path(request, monkeypatch):
    """Run every test on both routed paths: the dense masked one (few tokens) and the gathered
    one."""
    monkeypatch.setattr(
        qpeft.lora.routing, "DENSE_MARGIN", 10**9 if request.param == "dense" else -1
    )
    return request.param


def _model():
    torch.manual_seed(0)
    model = TinyBlock()
    init = {"lora_b_init": "torch.nn.init.normal_"}
    qpeft.update_model(model, {"adapter_name": "a", "adapter_cfg": {"*": {"rank": 4, **init}}})
    qpeft.update_model(
        model, {"adapter_name": "b", "adapter_cfg": {"*": {"rank": 2, "scale": 3.0, **init}}}
    )
    # "c" only on the attention layers, in bf16
    qpeft.update_model(
        model,
        {"adapter_name": "c", "adapter_cfg": {"*attn*": {"rank": 3, "lora_dtype": "bf16", **init}}},
    )
    return model


def _alone(model, x, name):
    """One sample through the model with only ``name`` enabled (None: no adapter)."""
    with qpeft.disabled_adapters(model):
        for layer in qpeft.lora_layers(model).values():
            if name in layer.adapters:
                layer.adapters[name].enable = True
        return model(x)


NAMES = ["a", "b", None, "a", "c", "b"]


def test_routed_batch_equals_each_sample_alone():
    model = _model()
    x = torch.randn(len(NAMES), 5, 16)
    with torch.no_grad(), qpeft.adapter_routing(model, NAMES):
        y = model(x)
    with torch.no_grad():
        for i, name in enumerate(NAMES):
            tol = (BF16_ATOL, BF16_RTOL) if name == "c" else (FASTPATH_ATOL, FASTPATH_RTOL)
            torch.testing.assert_close(
                y[i : i + 1], _alone(model, x[i : i + 1], name), atol=tol[0], rtol=tol[1]
            )
        with qpeft.disabled_adapters(model):
            assert torch.equal(y[2], model(x)[2])  # None: the base output, bit for bit


def test_routing_ignores_enable_flags_and_restores_state():
    model = _model()
    qpeft.disable_adapters(model, adapters_to_disable="a")
    log = qpeft.state(model)
    x = torch.randn(2, 16)
    with torch.no_grad(), qpeft.adapter_routing(model, ["a", "a"]):
        y = model(x)
    with torch.no_grad():
        torch.testing.assert_close(y, _alone(model, x, "a"), atol=FASTPATH_ATOL, rtol=FASTPATH_RTOL)
    assert all(layer._routing is None for layer in qpeft.lora_layers(model).values())
    assert qpeft.state(model) == log
    assert not qpeft.lora_layers(model)["attn.q_proj"].adapters["a"].enable


def test_routed_gradients_equal_per_sample_gradients():
    model = _model()
    x = torch.randn(4, 16)
    names = ["a", "b", "a", None]
    with qpeft.adapter_routing(model, names):
        model(x).square().sum().backward()
    routed = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    for i, name in enumerate(names):
        if name is not None:  # a sample with no adapter gives the (frozen) model no gradient
            _alone(model, x[i : i + 1], name).square().sum().backward()
    alone = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert routed.keys() == alone.keys() and routed
    for k in routed:  # rounding is relative to the largest partial sums, so scale atol with them
        scale = max(1.0, alone[k].abs().max().item())
        torch.testing.assert_close(
            routed[k], alone[k], atol=FASTPATH_ATOL * scale, rtol=FASTPATH_RTOL, msg=k
        )


def test_errors_name_the_problem_and_change_nothing():
    model = _model()
    with (
        pytest.raises(ValueError, match="no adapter named 'zz'"),
        qpeft.adapter_routing(model, ["a", "zz"]),
    ):
        pass
    with pytest.raises(TypeError, match="list of adapter names"), qpeft.adapter_routing(model, "a"):
        pass
    with pytest.raises(TypeError, match=r"names\[1\]"), qpeft.adapter_routing(model, ["a", 3]):
        pass
    with pytest.raises(ValueError, match="empty"), qpeft.adapter_routing(model, []):
        pass
    with (
        pytest.raises(ValueError, match="no LoRA layers"),
        qpeft.adapter_routing(torch.nn.Linear(2, 2), ["a"]),
    ):
        pass
    assert all(layer._routing is None for layer in qpeft.lora_layers(model).values())
    with (
        pytest.raises(ValueError, match=r"3 adapter names .*layer 'attn.q_proj'.*batch 2"),
        qpeft.adapter_routing(model, ["a", "b", "a"]),
    ):
        model(torch.randn(2, 16))
    assert all(layer._routing is None for layer in qpeft.lora_layers(model).values())


def test_generate_with_routing_equals_generating_each_sample_alone():
    model = tiny_llama()
    for name, seed in (("a", 1), ("b", 2)):
        torch.manual_seed(seed)
        qpeft.update_model(
            model,
            {
                "adapter_name": name,
                "adapter_cfg": {
                    "*": {"rank": 4, "lora_b_init": "torch.nn.init.normal_"},
                    "*lm_head*": {"enable": False},
                },
            },
        )
    ids = torch.randint(0, 64, (3, 6))
    names = ["b", None, "a"]
    kw = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad(), qpeft.adapter_routing(model, names):
        out = model.generate(ids, **kw)
    for i, name in enumerate(names):
        with torch.no_grad(), qpeft.adapter_routing(model, [name]):
            assert torch.equal(out[i : i + 1], model.generate(ids[i : i + 1], **kw))


def test_routing_refuses_merged_adapters():
    model = _model()
    qpeft.merge_adapters(model, ["a"])
    with pytest.raises(ValueError, match="merged"), qpeft.adapter_routing(model, ["a", "b"]):
        pass
    qpeft.unmerge_adapters(model)
    with qpeft.adapter_routing(model, ["a", "b"]):
        assert model(torch.randn(2, 16)).shape == (2, 10)


def test_reused_factors_follow_in_place_edits_and_scale_changes():
    model = _model()
    x = torch.randn(len(NAMES), 5, 16)
    layer = qpeft.lora_layers(model)["attn.q_proj"]
    with torch.no_grad(), qpeft.adapter_routing(model, NAMES):
        model(x)  # builds and keeps the stacked factors
        layer.adapters["a"].lora_b.mul_(-2.0)
        layer.adapters["b"].scale = 0.5
        y = model(x)
    with torch.no_grad():
        for i, name in enumerate(NAMES):
            tol = (BF16_ATOL, BF16_RTOL) if name == "c" else (FASTPATH_ATOL, FASTPATH_RTOL)
            torch.testing.assert_close(
                y[i : i + 1], _alone(model, x[i : i + 1], name), atol=tol[0], rtol=tol[1]
            )


@pytest.mark.parametrize(("tokens", "gathers"), [(1, False), (64, True)])
def test_default_rule_decodes_densely_and_gathers_for_long_inputs(tokens, gathers, monkeypatch):
    monkeypatch.setattr(qpeft.lora.routing, "DENSE_MARGIN", DEFAULT_MARGIN)
    calls = []
    real = torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = _model()
    with torch.no_grad(), qpeft.adapter_routing(model, NAMES):
        model(torch.randn(len(NAMES), tokens, 16))
    assert bool(calls) == gathers  # the gathered path runs bmm; the dense path plain matmuls
