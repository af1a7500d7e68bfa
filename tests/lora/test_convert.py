"""update_model: conversion, targeting, updates, freezing, errors that leave the model untouched."""

import copy
import warnings

import pytest
import torch
from torch import nn

import qpeft
from qpeft import LoRAModule, update_model
from tests.models import TinyBlock


def _snapshot(model):
    return copy.deepcopy(model), {k: v.clone() for k, v in model.state_dict().items()}


def _same(model, snap):
    ref, sd = snap
    return (
        repr(model) == repr(ref)
        and model.state_dict().keys() == sd.keys()
        and all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())
        and qpeft.state(model) == qpeft.state(ref)
    )


def test_targets_by_ordered_patterns_key_by_key():
    model = TinyBlock()
    update_model(
        model,
        {"adapter_cfg": {"*": {"rank": 8}, "*attn*": {"scale": 2}, "*lm_head*": {"enable": False}}},
    )
    layers = qpeft.lora_layers(model)
    assert set(layers) == {"attn.q_proj", "attn.v_proj", "mlp.up", "mlp.down"}
    assert layers["attn.q_proj"].adapters["default"].rank == 8
    assert layers["attn.q_proj"].adapters["default"].scale == 2
    assert layers["mlp.up"].adapters["default"].scale == 1
    assert isinstance(model.lm_head, nn.Linear)


def test_default_config_creates_adapters_everywhere():
    model = TinyBlock()
    update_model(model, {})
    assert len(qpeft.lora_layers(model)) == 5
    assert all(m.adapters["default"].rank == 64 for m in qpeft.lora_layers(model).values())


def test_callable_patterns():
    model = TinyBlock()
    update_model(model, {"adapter_cfg": {lambda n: n.endswith("proj"): {"rank": 2}}})
    assert set(qpeft.lora_layers(model)) == {"attn.q_proj", "attn.v_proj"}


def test_new_adapter_is_bit_identical_and_wraps_the_same_object():
    model = TinyBlock().eval()
    x = torch.randn(5, 16)
    y0 = model(x)
    q = model.attn["q_proj"]
    update_model(model, {"adapter_cfg": {"*": {"rank": 4}}})
    assert torch.equal(model(x), y0)
    assert model.attn["q_proj"].base is q


def test_forward_is_base_plus_scaled_lora_sum():
    torch.manual_seed(0)
    lin = nn.Linear(6, 5)
    model = nn.Sequential(lin)
    update_model(
        model,
        {"adapter_cfg": {"*": {"rank": 3, "scale": 0.5, "lora_b_init": torch.nn.init.normal_}}},
    )
    update_model(
        model,
        {
            "adapter_name": "two",
            "adapter_cfg": {"*": {"rank": 2, "scale": 3.0, "lora_b_init": "torch.nn.init.ones_"}},
        },
    )
    layer = model[0]
    a1, a2 = layer.adapters["default"], layer.adapters["two"]
    x = torch.randn(4, 6)
    expected = (
        lin(x) + 0.5 * (x @ a1.lora_a.T @ a1.lora_b.T) + 3.0 * (x @ a2.lora_a.T @ a2.lora_b.T)
    )
    torch.testing.assert_close(model(x), expected)
    assert layer.adapter_names == ["default", "two"]


def test_state_dict_keys_are_preserved_and_plain_checkpoints_load():
    model = TinyBlock()
    base_sd = copy.deepcopy(model.state_dict())
    update_model(model, {"adapter_cfg": {"*": {"rank": 2}}})
    keys = set(model.state_dict())
    assert set(base_sd) <= keys and all("adapters" in k for k in keys - set(base_sd))
    missing, unexpected = model.load_state_dict(base_sd, strict=False)
    assert unexpected == [] and all("adapters" in k for k in missing)
    model.load_state_dict(model.state_dict())  # strict round trip
    fresh = TinyBlock()
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if "adapters" not in k})


def test_deepcopy_of_a_converted_model():
    model = TinyBlock()
    update_model(model, {"adapter_cfg": {"*": {"rank": 2, "lora_b_init": "torch.nn.init.ones_"}}})
    clone = copy.deepcopy(model)
    x = torch.randn(2, 16)
    assert torch.equal(clone(x), model(x))
    assert clone.attn["q_proj"].base is not model.attn["q_proj"].base
    assert set(clone.state_dict()) == set(model.state_dict())


def test_lora_dtype_sidecar_runs_in_its_dtype_and_returns_base_dtype():
    model = TinyBlock()
    update_model(
        model,
        {
            "adapter_cfg": {
                "*": {"rank": 4, "lora_dtype": "bf16", "lora_b_init": "torch.nn.init.ones_"}
            }
        },
    )
    layer = model.attn["q_proj"]
    assert layer.adapters["default"].lora_a.dtype == torch.bfloat16
    assert layer.weight.dtype == torch.float32
    seen = []
    layer.adapters["default"].register_forward_hook(
        lambda m, i, o: seen.append((i[0].dtype, o.dtype))
    )
    assert model(torch.randn(2, 16)).dtype == torch.float32
    assert seen == [(torch.bfloat16, torch.bfloat16)]


def test_freeze_flags():
    model = TinyBlock()
    update_model(model, {"adapter_cfg": {"*": {"rank": 2}}})
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters.default." in n for n in trainable)
    update_model(
        model,
        {"adapter_name": "frozen", "freeze_lora_weights": True, "adapter_cfg": {"*": {"rank": 2}}},
    )
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".frozen." in n)
    assert all(p.requires_grad for n, p in model.named_parameters() if ".default." in n)
    update_model(
        model,
        {"adapter_name": "x", "freeze_base_model": False, "adapter_cfg": {"*q_proj": {"rank": 2}}},
    )
    assert model.lm_head.weight.requires_grad and model.attn["q_proj"].base.weight.requires_grad


def test_update_existing_adapter_changes_scale_and_enable_keeps_weights():
    model = TinyBlock()
    update_model(model, {"adapter_cfg": {"*": {"rank": 4, "lora_b_init": "torch.nn.init.normal_"}}})
    adapter = model.mlp.up.adapters["default"]
    b = adapter.lora_b.detach().clone()
    update_model(model, {"adapter_cfg": {"*": {"scale": 3.0}, "*mlp.down": {"enable": False}}})
    assert model.mlp.up.adapters["default"] is adapter and torch.equal(adapter.lora_b, b)
    assert adapter.scale == 3.0 and adapter.rank == 4
    assert model.mlp.down.adapters["default"].enable is False


@pytest.mark.parametrize(
    "change, word",
    [
        ({"rank": 8}, "rank"),
        ({"lora_a_init": "torch.nn.init.zeros_"}, "lora_a_init"),
        ({"lora_init_method": "svdquant"}, "lora_init_method"),
        ({"lora_dtype": "fp16"}, "lora_dtype"),
    ],
)
def test_update_refuses_fixed_changes_and_leaves_model_untouched(change, word):
    model = TinyBlock()
    update_model(model, {"adapter_cfg": {"*": {"rank": 4}}})
    snap = _snapshot(model)
    with pytest.raises(ValueError) as err:
        update_model(model, {"adapter_cfg": {"*": {"scale": 2.0}, "*mlp.down": change}})
    assert (
        word in str(err.value) and "'default'" in str(err.value) and "'mlp.down'" in str(err.value)
    )
    assert _same(model, snap) and model.mlp.up.adapters["default"].scale == 1.0


@pytest.mark.parametrize(
    "config",
    [
        {"adapter_name": "1bad"},
        {"adapter_cfg": {"*": {"rank": 0}}},
        {"adapter_cfg": {"nothing*": {"rank": 2}}},
        {"adapter_type": "ia3"},
        {"bogus": True},
    ],
)
def test_bad_configs_leave_model_untouched(config):
    model = TinyBlock()
    update_model(model, {"adapter_cfg": {"*q_proj": {"rank": 2}}})
    snap = _snapshot(model)
    with pytest.raises(ValueError):
        update_model(model, config)
    assert _same(model, snap)


def test_model_without_supported_layers():
    with pytest.raises(ValueError, match="no layer"):
        update_model(nn.Sequential(nn.ReLU()), {})


def test_svdquant_without_quantizer_warns_and_zero_inits():
    model = TinyBlock()
    x = torch.randn(3, 16)
    y0 = model(x)
    with pytest.warns(UserWarning, match="'mlp.up'"):
        update_model(
            model, {"adapter_cfg": {"*mlp.up": {"rank": 4, "lora_init_method": "svdquant"}}}
        )
    adapter = model.mlp.up.adapters["default"]
    assert not adapter.lora_a.any() and not adapter.lora_b.any()
    assert torch.equal(model(x), y0)


def test_training_lowers_the_loss():
    torch.manual_seed(0)
    model = TinyBlock()
    update_model(model, {"adapter_cfg": {"*": {"rank": 4}}})
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    x, target = torch.randn(32, 16), torch.randn(32, 10)
    losses = []
    for _ in range(20):
        loss = nn.functional.mse_loss(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]


def test_is_peft_model_and_lora_module_base_class():
    model = TinyBlock()
    assert not qpeft.is_peft_model(model)
    update_model(model, {"adapter_cfg": {"*": {"rank": 2}}})
    assert qpeft.is_peft_model(model)
    assert all(isinstance(m, LoRAModule) for m in qpeft.lora_layers(model).values())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert model.attn["q_proj"].in_features == 16  # attribute falls through to the base
