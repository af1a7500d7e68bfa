"""QuantLinear / QuantConv1D: forward math, state_dict, Conv1D layout, the frozen-weight cache."""

import copy
import pickle

import pytest
import torch
from torch import nn

import qpeft
from qpeft.quant import QuantLinear, TensorQuantizer
from tests.quant.bitwise import assert_bits_equal

INT8_ROW = {"num_bits": 8, "axis": 0}
NVFP4 = {"num_bits": (2, 1), "block_sizes": {-1: 16, "type": "dynamic", "scale_bits": (4, 3)}}
INT4 = {"num_bits": 4, "block_sizes": {-1: 128, "type": "static"}}


def _layer(cfg=INT8_ROW, frozen=True):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 24))
    model.requires_grad_(not frozen)
    qpeft.quantize(model, {"quant_cfg": {"*weight_quantizer": cfg}})
    return model, model[0]


def test_state_dict_keys_and_attribute_fall_through():
    model, layer = _layer()
    assert isinstance(layer, QuantLinear) and layer.weight is layer.base.weight
    assert layer.in_features == 32 and layer.bias is layer.base.bias
    assert list(model.state_dict()) == ["0.weight_quantizer._amax", "0.weight", "0.bias"]
    plain = nn.Sequential(nn.Linear(32, 24))
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    assert missing == [] and unexpected == ["0.weight_quantizer._amax"]


@pytest.mark.parametrize("cfg", [INT8_ROW, NVFP4, INT4])
def test_gpt2_conv1d_quantizes_in_out_in_layout_like_modelopt(cfg):
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(24, 32)  # weight [in=32, out=24]
    nn.init.normal_(conv.weight)
    linear = nn.Linear(32, 24)  # what ModelOpt turns it into: weight = conv.weight.T
    with torch.no_grad():
        linear.weight.copy_(conv.weight.T)
        linear.bias.copy_(conv.bias)
    a, b = nn.Sequential(conv), nn.Sequential(linear)
    for m in (a, b):
        qpeft.quantize(m, {"quant_cfg": {"*weight_quantizer": cfg}})
    assert type(a[0]).__name__ == "QuantConv1D"
    qa, qb = a[0].weight_quantizer, b[0].weight_quantizer
    assert_bits_equal(qa(conv.weight), qb(linear.weight).T)
    if qb.amax is not None:
        assert qa.amax.shape == qb.amax.shape and torch.equal(qa.amax, qb.amax)
    x = torch.randn(2, 3, 32)
    torch.testing.assert_close(a(x), b(x))
    expected = x @ qa(conv.weight) + conv.bias
    assert torch.equal(a(x), expected)


def test_conv1d_with_quantizers_disabled_is_bit_identical():
    from tests.models import tiny_gpt2

    model = tiny_gpt2()
    ids = torch.randint(0, 64, (2, 7))
    ref = model(input_ids=ids).logits
    qpeft.quantize(model, "int8", forward_loop=lambda m: m(input_ids=ids))
    assert not torch.equal(model(input_ids=ids).logits, ref)
    qpeft.disable_quantizer(model, "*")
    assert torch.equal(model(input_ids=ids).logits, ref)


# ------------------------------------------------------------------------------ the weight cache
def _cached(layer):
    return layer._weight_caches["weight_quantizer"].is_filled


def test_frozen_weight_is_quantized_once_and_reused():
    _, layer = _layer(NVFP4)
    x = torch.randn(4, 32)
    y1 = layer(x)
    first = layer.quantized_weight()
    assert _cached(layer) and layer.quantized_weight() is first
    assert torch.equal(layer(x), y1)
    assert_bits_equal(first, layer.weight_quantizer(layer.weight))


def test_a_view_made_afresh_each_call_hits_the_cache_until_its_base_changes():
    # GroupedMLP's quantized wrapper reads [E, in, out] views of its 2-D weights: a new view
    # object at every forward must not mean a new Q(W)
    from qpeft.quant.cache import WeightCache

    weight = nn.Parameter(torch.randn(4, 32), requires_grad=False)
    quantizer = TensorQuantizer.from_config(NVFP4)
    cache = WeightCache()
    first = cache.get(weight.view(2, 2, 32), quantizer)
    assert cache.get(weight.view(2, 2, 32), quantizer) is first
    assert cache.get(weight.view(4, 32), quantizer) is not first  # another shape
    with torch.no_grad():
        weight.mul_(2)
    assert not torch.equal(cache.get(weight.view(2, 2, 32), quantizer), first)


def _edit_in_place(layer):
    with torch.no_grad():
        layer.weight.mul_(0.5)


def _load_state(layer):
    sd = {k: v * 0.5 if k == "weight" else v for k, v in layer.state_dict().items()}
    layer.load_state_dict(sd)


def _toggle(layer):
    layer.weight_quantizer.disable()
    layer.quantized_weight()
    layer.weight_quantizer.enable()


def _new_amax(layer):
    layer.weight_quantizer.amax = layer.weight_quantizer.amax * 0.5


def _amax_in_place(layer):
    with torch.no_grad():
        layer.weight_quantizer.amax.mul_(0.5)


def _replace_data(layer):
    layer.base.weight.data = layer.weight.data * 0.5


def _num_bits(layer):
    layer.weight_quantizer.num_bits = 4


@pytest.mark.parametrize(
    "change",
    [_edit_in_place, _load_state, _toggle, _new_amax, _amax_in_place, _replace_data, _num_bits],
)
def test_cache_is_invalidated_by_each_trigger(change):
    _, layer = _layer(INT8_ROW)
    before = layer.quantized_weight()
    change(layer)
    after = layer.quantized_weight()
    assert after is not before
    assert_bits_equal(after, layer.weight_quantizer(layer.weight))


def test_cache_invalidated_by_dtype_change():
    _, layer = _layer(NVFP4)
    before = layer.quantized_weight()
    layer.to(torch.bfloat16)
    after = layer.quantized_weight()
    assert after.dtype == torch.bfloat16 and after is not before


def test_disabled_quantizer_returns_the_weight_itself_and_caches_nothing():
    _, layer = _layer(INT8_ROW)
    layer.weight_quantizer.disable()
    assert layer.quantized_weight() is layer.weight and not _cached(layer)


def test_trainable_weight_is_quantized_every_forward_with_ste():
    _, layer = _layer(NVFP4, frozen=False)
    x = torch.randn(4, 32)
    layer(x).sum().backward()
    assert not _cached(layer)
    assert torch.equal(layer.weight.grad, torch.ones(4, 24).T @ x)  # STE: as if unquantized
    a, b = layer.quantized_weight(), layer.quantized_weight()
    assert a is not b and a.requires_grad


def test_requires_grad_flip_invalidates():
    _, layer = _layer(INT8_ROW)
    frozen = layer.quantized_weight()
    layer.weight.requires_grad_(True)
    trainable = layer.quantized_weight()
    assert trainable is not frozen and trainable.requires_grad
    layer.weight.requires_grad_(False)
    assert layer.quantized_weight() is not frozen


def test_cache_is_not_in_state_dict_and_not_deep_copied():
    _, layer = _layer(NVFP4)
    x = torch.randn(4, 32)
    y = layer(x)
    assert all("cache" not in k for k in layer.state_dict())
    clone = copy.deepcopy(layer)
    assert not _cached(clone) and _cached(layer)
    assert torch.equal(clone(x), y)
    with torch.no_grad():
        clone.weight.zero_()
    assert torch.equal(layer(x), y)  # the original's cache is unaffected
    assert not _cached(pickle.loads(pickle.dumps(layer)))


def test_quantizer_wrapping_rules():
    with pytest.raises(TypeError, match="cannot wrap a quantized layer"):
        QuantLinear(QuantLinear(nn.Linear(2, 2)))
    with pytest.raises(TypeError, match="not a QuantModule subclass"):
        qpeft.register_quant(nn.Linear, nn.Linear)
    assert isinstance(QuantLinear(nn.Linear(2, 2)).input_quantizer, TensorQuantizer)
