"""Adapter management: enable/disable, freeze/unfreeze, delete, the disabled context."""

import pytest
import torch

import qpeft
from qpeft import update_model
from tests.models import TinyBlock


def _model():
    torch.manual_seed(0)
    model = TinyBlock()
    ones = {"rank": 2, "lora_b_init": "torch.nn.init.ones_"}
    update_model(model, {"adapter_cfg": {"*": ones}})
    update_model(model, {"adapter_name": "extra", "adapter_cfg": {"*mlp*": ones}})
    return model


def _flags(model, attr="enable"):
    return {
        (layer, name): (getattr(a, attr) if attr == "enable" else a.lora_a.requires_grad)
        for layer, m in qpeft.lora_layers(model).items()
        for name, a in m.adapters.items()
    }


def test_disable_and_enable_by_layer_and_adapter_patterns():
    model = _model()
    qpeft.disable_adapters(
        model, layers_to_disable=lambda n: n.startswith("mlp"), adapters_to_disable="ext*"
    )
    flags = _flags(model)
    assert flags[("mlp.up", "extra")] is False and flags[("mlp.up", "default")] is True
    qpeft.disable_adapters(model)
    assert not any(_flags(model).values())
    qpeft.enable_adapters(model, layers_to_enable="*q_proj")
    assert {k for k, v in _flags(model).items() if v} == {("attn.q_proj", "default")}


def test_all_disabled_equals_base_model():
    model = _model()
    x = torch.randn(3, 16)
    with qpeft.disabled_adapters(model):
        y_off = model(x)
    base = TinyBlock()
    base.load_state_dict({k: v for k, v in model.state_dict().items() if "adapters" not in k})
    assert torch.equal(y_off, base(x))
    assert all(_flags(model).values())  # restored on exit
    assert not torch.equal(model(x), y_off)


def test_adapter_patterns_must_not_be_callables_and_model_must_be_peft():
    with pytest.raises(TypeError):
        qpeft.enable_adapters(_model(), adapters_to_enable=lambda n: True)
    with pytest.raises(ValueError, match="no LoRA layers"):
        qpeft.disable_adapters(TinyBlock())


def test_freeze_and_unfreeze():
    model = _model()
    qpeft.freeze_lora_weights(model, adapter_patterns="extra")
    flags = _flags(model, "grad")
    assert flags[("mlp.up", "extra")] is False and flags[("mlp.up", "default")] is True
    qpeft.unfreeze_lora_weights(model, layer_patterns=["mlp.up"])
    assert _flags(model, "grad")[("mlp.up", "extra")] is True
    assert _flags(model, "grad")[("mlp.down", "extra")] is False


def test_delete_adapter():
    model = _model()
    qpeft.delete_adapter(model, "extra")
    assert all(m.adapter_names == ["default"] for m in qpeft.lora_layers(model).values())
    with pytest.raises(ValueError, match="'extra'"):
        qpeft.delete_adapter(model, "extra")


def test_every_change_is_recorded_as_json():
    model = _model()
    qpeft.disable_adapters(model, layers_to_disable=lambda n: "mlp" in n)
    log = qpeft.state(model)
    assert [e["mode"] for e in log] == ["peft", "peft", "disable_adapters"]
    assert log[2]["config"]["selection"] == {
        "mlp.up": ["default", "extra"],
        "mlp.down": ["default", "extra"],
    }
    # a deleted adapter's history no longer shapes the model: it leaves the log (lora/history.py)
    qpeft.delete_adapter(model, "extra")
    log = qpeft.state(model)
    assert [e["mode"] for e in log] == ["peft", "disable_adapters"]
    assert log[1]["config"]["selection"] == {"mlp.up": ["default"], "mlp.down": ["default"]}
