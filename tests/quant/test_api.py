"""quantize(): presets, config validation, calibration, re-quantization, the mode log and replay."""

import copy

import pytest
import torch
from torch import nn

import qpeft
from qpeft.quant import model_quantizers, quantized_layers
from tests.models import TinyBlock

PRESET_NAMES = sorted(qpeft.PRESETS)
STATIC_INPUTS = {"int8", "fp8"}


def _model_and_data():
    torch.manual_seed(0)
    return TinyBlock(), torch.randn(6, 16)


@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_every_preset_quantizes_all_but_the_head(preset):
    model, x = _model_and_data()
    ref = model(x)
    qpeft.quantize(model, preset, forward_loop=lambda m: m(x))
    layers = quantized_layers(model)
    assert set(layers) == {"attn.q_proj", "attn.v_proj", "mlp.up", "mlp.down", "lm_head"}
    head = model.lm_head
    assert not head.weight_quantizer.is_enabled and not head.input_quantizer.is_enabled
    q = model.attn.q_proj
    assert q.weight_quantizer.is_enabled
    weight_only = preset.endswith("weight_only") or preset in ("int4", "fp8_block128")
    assert q.input_quantizer.is_enabled == (not weight_only)
    assert torch.equal(q.weight_quantizer(q.weight), q.quantized_weight())
    assert not torch.equal(q.weight_quantizer(q.weight), q.weight)
    out = model(x)
    assert out.shape == ref.shape and torch.isfinite(out).all() and not torch.equal(out, ref)
    if preset in STATIC_INPUTS:
        assert q.input_quantizer.amax is not None


def test_layer_output_is_linear_of_quantized_input_and_weight():
    model, x = _model_and_data()
    qpeft.quantize(model, "int8", forward_loop=lambda m: m(x))
    layer = model.attn.q_proj
    expected = layer.input_quantizer(x) @ layer.weight_quantizer(layer.weight).T + layer.bias
    assert torch.equal(layer(x), expected)
    # weight amax: max |W| per output row; input amax: max |x| seen in the forward loop
    assert torch.equal(
        layer.weight_quantizer.amax, layer.weight.detach().abs().amax(1, keepdim=True)
    )
    assert layer.input_quantizer.amax.item() == x.abs().max().item()


def test_calibration_runs_on_the_unquantized_model():
    model, x = _model_and_data()
    ref = model(x)
    qpeft.quantize(model, "int8", forward_loop=lambda m: m(x))
    assert not torch.equal(model(x), ref)
    seen = []
    qpeft.quantize(model, "fp8", forward_loop=lambda m: seen.append(m(x)))
    assert torch.equal(seen[0], ref)  # the old quantizers were off during calibration
    assert model.attn.q_proj.input_quantizer.is_enabled  # and the new ones are on after it


def test_uncalibrated_static_input_warns_then_raises_at_forward():
    model, x = _model_and_data()
    with pytest.warns(UserWarning, match="input quantizer"):
        qpeft.quantize(model, "int8")
    with pytest.raises(RuntimeError, match=r"attn\.q_proj\.input_quantizer has no amax"):
        model(x)


def test_all_quantizers_disabled_is_bit_identical():
    model, x = _model_and_data()
    ref = model(x)
    qpeft.quantize(model, "nvfp4", forward_loop=lambda m: m(x))
    assert not torch.equal(model(x), ref)
    qpeft.disable_quantizer(model, "*")
    assert torch.equal(model(x), ref)
    qpeft.enable_quantizer(model, "*weight_quantizer")
    assert not model.attn.q_proj.input_quantizer.is_enabled
    assert model.lm_head.weight_quantizer.is_enabled  # explicitly re-enabled by the pattern


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ("int3", r"unknown quantization preset 'int3'; presets: \['fp8'"),
        (
            {"quant_cfg": {"*": {"num_bit": 8}}},
            r"quant_cfg\['\*'\]: unknown field\(s\) \['num_bit'\]",
        ),
        ({"quant_cfg": {"*weight*": {"num_bits": 33}}}, r"quant_cfg\['\*weight\*'\]: num_bits"),
        ({"quant_cfg": {"*": {"num_bits": 8}}, "algo": "max"}, "algo"),
        ({"quant_cfg": {"*": {"num_bits": 8}}, "algorithm": "awq"}, "algorithm"),
        (
            {"quant_cfg": {"*weight*": {"num_bits": (2, 1)}}},
            r"quantizer 'attn\.q_proj\.weight_quantizer': block_sizes",
        ),
        (
            {"quant_cfg": {"*nothing*": {"num_bits": 8}}},
            r"patterns \['\*nothing\*'\] match no quantizer",
        ),
        ({"quant_cfg": {}}, "quant_cfg"),
    ],
)
def test_bad_configs_raise_naming_the_problem_and_leave_the_model(config, match):
    model, x = _model_and_data()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=match):
        qpeft.quantize(model, config)
    assert not quantized_layers(model) and qpeft.state(model) == []
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_failing_forward_loop_leaves_the_model_untouched():
    model, x = _model_and_data()
    ref = model(x)

    def loop(m):
        m(x)
        raise KeyError("data")

    with pytest.raises(KeyError, match="data"):
        qpeft.quantize(model, "int8", forward_loop=loop)
    assert not quantized_layers(model) and qpeft.state(model) == []
    assert not model.attn.q_proj._forward_pre_hooks
    assert torch.equal(model(x), ref)


def test_config_object_with_callables_and_key_by_key_merge():
    model, x = _model_and_data()
    cfg = qpeft.QuantizeConfig(
        quant_cfg={
            "*weight_quantizer": {"num_bits": 4, "block_sizes": {-1: 128, "type": "static"}},
            lambda n: n.startswith("mlp.") and n.endswith("weight_quantizer"): {"num_bits": 8},
            "*lm_head*": {"enable": False},
        }
    )
    qpeft.quantize(model, cfg)
    qs = model_quantizers(model)
    assert (qs["mlp.up.weight_quantizer"].num_bits, qs["mlp.up.weight_quantizer"].block_size) == (
        8,
        128,
    )
    assert qs["attn.q_proj.weight_quantizer"].num_bits == 4
    assert not qs["attn.q_proj.input_quantizer"].is_enabled  # matched by no entry
    assert not qs["lm_head.weight_quantizer"].is_enabled
    entry = qpeft.state(model)[-1]
    assert entry["mode"] == "quantize" and entry["config"]["algorithm"] == "max"
    assert entry["config"]["layers"]["mlp.up"]["weight_quantizer"]["attributes"]["num_bits"] == 8


def test_unmatched_layers_are_left_alone():
    model, x = _model_and_data()
    qpeft.quantize(model, {"quant_cfg": {"*mlp*weight_quantizer": {"num_bits": 8, "axis": 0}}})
    assert set(quantized_layers(model)) == {"mlp.up", "mlp.down"}
    assert type(model.attn.q_proj) is torch.nn.Linear


def test_quantizing_again_replaces_the_quantizers():
    model, x = _model_and_data()
    qpeft.quantize(model, "int8", forward_loop=lambda m: m(x))
    layer_before = model.attn.q_proj
    qpeft.quantize(model, "nvfp4_weight_only")
    layer = model.attn.q_proj
    assert layer is not layer_before and layer.base is layer_before.base
    assert layer.weight_quantizer.fmt == "nvfp4" and not layer.input_quantizer.is_enabled
    assert type(layer.base) is torch.nn.Linear  # never a quantizer around a quantizer
    qpeft.quantize(model, "fp8", forward_loop=lambda m: m(x))
    # recalibrated on the unquantized model: the inputs of the first layer are the raw inputs
    assert model.attn.q_proj.input_quantizer.amax.item() == x.abs().max().item()
    assert [e["mode"] for e in qpeft.state(model)] == ["quantize"] * 3


@pytest.mark.parametrize("preset", ["int8", "nvfp4", "int4", "fp8_weight_only"])
def test_replay_on_a_fresh_model_then_strict_load_is_bit_identical(preset):
    model, x = _model_and_data()
    qpeft.quantize(model, preset, forward_loop=lambda m: m(x))
    qpeft.disable_quantizer(model, "mlp.down.*")
    fresh = TinyBlock()
    qpeft.core.modes.replay(fresh, qpeft.state(model))
    assert qpeft.state(fresh) == qpeft.state(model)
    fresh.load_state_dict(model.state_dict(), strict=True)
    assert torch.equal(fresh(x), model(x))
    assert not fresh.mlp.down.weight_quantizer.is_enabled


def test_replay_onto_a_model_missing_a_layer_fails_cleanly():
    model, x = _model_and_data()
    qpeft.quantize(model, "int8_weight_only")
    other = torch.nn.Sequential()
    other.add_module("lm_head", torch.nn.Linear(16, 10))
    with pytest.raises(ValueError, match="no quantizable layer 'attn.q_proj'"):
        qpeft.core.modes.replay(other, qpeft.state(model))
    assert type(other.lm_head) is torch.nn.Linear


def test_toggle_errors():
    model, x = _model_and_data()
    with pytest.raises(ValueError, match="no quantizers; call qpeft.quantize first"):
        qpeft.enable_quantizer(model, "*")
    qpeft.quantize(model, "int8_weight_only")
    with pytest.raises(ValueError, match=r"pattern '\*nope\*' matches none of the 10 quantizers"):
        qpeft.disable_quantizer(model, "*nope*")
    with pytest.raises(TypeError):
        qpeft.disable_quantizer(model, 3)


def test_disabled_parent_classes_get_disabled_quantizers():
    from qpeft.quant.registry import REGISTRY

    class Embedding(torch.nn.Linear):  # a registered type whose class name ModelOpt excludes
        pass

    model = torch.nn.Sequential(Embedding(4, 4), torch.nn.Linear(4, 4))
    qpeft.quantize(model, "int8_weight_only")
    assert not model[0].weight_quantizer.is_enabled and model[1].weight_quantizer.is_enabled
    assert Embedding not in REGISTRY.types


@pytest.mark.parametrize(
    ("attrs", "words"),
    [
        ({"num_bits": "8"}, "num_bits.*expected an integer"),
        ({"num_bits": 8.0}, "num_bits.*expected an integer"),
        ({"num_bits": True}, "num_bits"),
        ({"num_bits": 8, "axis": "0"}, "axis.*expected an integer"),
        ({"num_bits": 8, "axis": 5}, "axis 5 is out of range for a 2-D tensor"),
        ({"num_bits": 8, "axis": -3}, "axis -3 is out of range for a 2-D tensor"),
        ({"num_bits": 8, "enable": 1}, "enable"),
        ({"num_bits": 8, "narrow_range": "yes"}, "narrow_range"),
        ({"num_bits": 4, "block_sizes": {-1: True}}, "block size of axis -1"),
    ],
)
def test_loose_types_and_axes_a_weight_lacks_are_errors(attrs, words):
    model = nn.Sequential(nn.Linear(16, 16))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=words):
        qpeft.quantize(model, {"quant_cfg": {"*weight_quantizer": attrs}})
    assert not qpeft.state(model) and type(model[0]) is nn.Linear
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
