"""A bare layer as the model: ``update_model`` / ``quantize`` / ``restore`` / ``export`` return the
wrapper (or, for export, the base) that becomes the model's root, carrying the mode log."""

import pytest
import torch
from torch import nn

import qpeft
from qpeft.quant.layer import QuantLinear
from tests.tolerances import FP32_ATOL, FP32_RTOL, MERGE_ROUNDTRIP_ATOL

LORA = {"adapter_cfg": {"*": {"rank": 2, "scale": 0.5, "lora_b_init": "torch.nn.init.normal_"}}}
X = torch.randn(5, 16, generator=torch.Generator().manual_seed(1))


def _linear():
    torch.manual_seed(0)
    return nn.Linear(16, 8)


def _in_container(steps):
    """The same steps on the same Linear inside a container: the reference outputs."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8))
    for step in steps:
        model = step(model)
    return model


def _lora(model):
    torch.manual_seed(5)  # the same A on the root and in the container
    return qpeft.update_model(model, LORA)


def _quant(model):
    return qpeft.quantize(model, "int8_weight_only")


ORDERS = {
    "lora": [_lora],
    "quant": [_quant],
    "quant_then_lora": [_quant, _lora],
    "lora_then_quant": [_lora, _quant],
}


def _out(model):
    with torch.no_grad():
        return model(X)


@pytest.mark.parametrize("order", sorted(ORDERS))
def test_the_returned_wrapper_is_the_model(order):
    steps = ORDERS[order]
    linear = _linear()
    model = linear
    for step in steps:
        model = step(model)
    assert model is not linear and qpeft.state(linear) == []
    assert [e["mode"] for e in qpeft.state(model)] == [
        "peft" if s is _lora else "quantize" for s in steps
    ]
    chain, inner = [], model
    while hasattr(inner, "base"):
        chain.append(type(inner).__name__)
        inner = inner.base
    assert inner is linear
    assert chain == (["LoRALinear"] if _lora in steps else []) + (
        ["QuantLinear"] if _quant in steps else []
    )
    assert torch.equal(_out(model), _out(_in_container(steps)))
    if _lora in steps:
        with qpeft.disabled_adapters(model):
            assert torch.equal(
                _out(model), _out(_in_container([_quant] if _quant in steps else []))
            )


@pytest.mark.parametrize("order", sorted(ORDERS))
def test_save_restore_of_a_root_layer_is_bit_exact(order, tmp_path):
    model = _linear()
    for step in ORDERS[order]:
        model = step(model)
    qpeft.save(model, tmp_path / "ckpt")
    fresh = _linear()
    with torch.no_grad():
        fresh.weight.add_(1.0)  # the saved tensors are loaded
    restored = qpeft.restore(fresh, tmp_path / "ckpt")
    assert type(restored) is type(model) and restored is not fresh
    assert qpeft.state(restored) == qpeft.state(model) and qpeft.state(fresh) == []
    assert torch.equal(_out(restored), _out(model))
    for key, value in model.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value), key


def test_merge_unmerge_and_export_of_a_root_lora_layer():
    linear = _linear()
    weight = linear.weight.detach().clone()
    model = _lora(linear)
    out = _out(model)
    assert qpeft.merge_adapters(model) is model
    torch.testing.assert_close(_out(model), out, atol=FP32_ATOL, rtol=FP32_RTOL)
    qpeft.unmerge_adapters(model)
    torch.testing.assert_close(linear.weight, weight, atol=MERGE_ROUNDTRIP_ATOL, rtol=0)
    exported = qpeft.export(model)
    assert exported is linear and not qpeft.is_peft_model(exported)
    torch.testing.assert_close(_out(exported), out, atol=FP32_ATOL, rtol=FP32_RTOL)
    assert [e["mode"] for e in qpeft.state(exported)] == [
        "peft",
        "merge_adapters",
        "unmerge_adapters",
        "export",
    ]


def test_export_of_a_root_lora_over_a_quantized_layer_returns_the_quantized_layer(tmp_path):
    model = _lora(_quant(_linear()))
    with pytest.warns(UserWarning, match="quantized layer"):
        exported = qpeft.export(model)
    assert type(exported) is QuantLinear
    qpeft.save(exported, tmp_path / "ckpt")
    restored = qpeft.restore(_linear(), tmp_path / "ckpt")
    assert type(restored) is QuantLinear and torch.equal(_out(restored), _out(exported))


def test_quantizing_a_root_quantized_layer_again_replaces_its_quantizers():
    linear = _linear()
    model = qpeft.quantize(qpeft.quantize(linear, "int4"), "int8_weight_only")
    assert type(model) is QuantLinear and model.base is linear  # not nested
    assert torch.equal(_out(model), _out(_in_container([_quant])))
