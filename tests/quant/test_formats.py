"""Quantizer attributes as ModelOpt defines them: enable-only entries, dynamic amax, blocks on any
axes, tuple axes, unsigned and wide integers, calibration semantics; hand-computed exact cases."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qpeft
from qpeft.quant import TensorQuantizer
from qpeft.quant import numerics as nq
from tests.quant.bitwise import assert_bits_equal

NVFP4 = {"num_bits": (2, 1), "block_sizes": {-1: 16, "type": "dynamic", "scale_bits": (4, 3)}}
INT8_TOKEN = {"num_bits": 8, "type": "dynamic", "block_sizes": {-1: None}}
X = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(0))


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16))


def test_an_enable_only_entry_keeps_the_configured_attributes():
    model = _model()
    cfg = {
        "*weight_quantizer": {"num_bits": 4, "block_sizes": {-1: 8}},
        "*input_quantizer": NVFP4,
        "1.input_quantizer": {"enable": False},
    }
    qpeft.quantize(model, {"quant_cfg": cfg})
    q = model[1].input_quantizer
    assert not q.is_enabled and (q.fmt, q.block_size) == ("nvfp4", 16)
    qpeft.enable_quantizer(model, "1.input_quantizer")
    h = model[0](X)
    w = model[1].weight_quantizer(model[1].weight)
    expected = F.linear(nq.fake_quant_nvfp4(h, h.abs().amax()), w, model[1].bias)
    assert_bits_equal(model[1](h), expected)


def test_dynamic_per_token_int8_hand_computed():
    q = TensorQuantizer.from_config(INT8_TOKEN)
    x = torch.tensor([[1.0, -0.5, 0.25], [100.0, 50.0, -25.0]])
    # per-row amax 1 and 100: scale 127 / amax; 0.5 * 127 = 63.5 ties to 64
    expected = torch.tensor([[127.0, -64.0, 32.0], [127.0, 64.0, -32.0]])
    expected = expected / torch.tensor([[127.0], [1.27]])
    assert_bits_equal(q(x), expected)
    assert q.amax is None and q.dynamic
    y = q(X)  # [batch, tokens, hidden]: one amax per token
    assert_bits_equal(y, nq.fake_quant_int(X, X.abs().amax(dim=-1, keepdim=True)))
    per_tensor = TensorQuantizer.from_config({"num_bits": 8, "type": "dynamic"})
    assert_bits_equal(per_tensor(X), nq.fake_quant_int(X, X.abs().amax()))


@pytest.mark.parametrize("preset", ["fp8_dynamic", "int8_dynamic"])
def test_dynamic_presets_need_no_calibration_and_round_trip(preset, tmp_path):
    model = _model()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        qpeft.quantize(model, preset)
    layer = model[0]
    fn = nq.fake_quant_fp8 if preset.startswith("fp8") else nq.fake_quant_int
    w = layer.weight
    qw = fn(w, w.abs().amax(dim=1, keepdim=True))  # per output row (axis 0), static
    qx = fn(X, X.abs().amax(dim=-1, keepdim=True))  # per token, dynamic
    assert_bits_equal(layer(X), F.linear(qx, qw, layer.bias))
    assert layer.input_quantizer.amax is None
    qpeft.save(model, tmp_path / "ckpt")
    restored = qpeft.restore(_model(), tmp_path / "ckpt")
    assert restored[0].input_quantizer.dynamic
    assert_bits_equal(restored(X), model(X))


def test_fp8_2d_blocks_hand_computed():
    q = TensorQuantizer.from_config({"num_bits": (4, 3), "block_sizes": {-1: 2, -2: 2}})
    x = torch.tensor(
        [
            [448.0, 1.0, 0.5, 0.25],
            [2.0, -3.0, 0.1, 0.125],
            [1.0, 1.0, 2.0, 2.0],
            [1.0, 1.0, 2.0, 4.0],
        ]
    )
    with q.calibrating():
        q(x)
    assert q.amax.shape == (2, 1, 2, 1)
    assert q.amax.flatten().tolist() == [448.0, 0.5, 1.0, 4.0]
    amax = torch.tensor([[448.0, 0.5], [1.0, 4.0]]).repeat_interleave(2, 0).repeat_interleave(2, 1)
    assert_bits_equal(q(x), nq.fake_quant_fp8(x, amax))
    # block amax 448 gives scale 1: 448, 1, 2, -3 are e4m3 values and come back unchanged
    assert q(x)[:2, :2].tolist() == [[448.0, 1.0], [2.0, -3.0]]


def test_fp8_block128_preset_saves_and_restores_its_block_amax(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 200))
    qpeft.quantize(model, "fp8_block128")
    q = model[0].weight_quantizer
    assert q.amax.shape == (2, 1, 2, 1)  # 200 rows padded to 256: 2 x 2 blocks of 128 x 128
    w = model[0].weight
    assert q.amax[1, 0, 0, 0] == w[128:, :128].abs().amax()
    qpeft.save(model, tmp_path / "ckpt")
    restored = qpeft.restore(nn.Sequential(nn.Linear(256, 200)), tmp_path / "ckpt")
    assert_bits_equal(restored[0].weight_quantizer.amax, q.amax)
    x = torch.randn(4, 256)
    assert_bits_equal(restored(x), model(x))


def test_int_blocks_keep_a_static_per_block_amax(tmp_path):
    model = _model()
    qpeft.quantize(
        model, {"quant_cfg": {"*weight_quantizer": {"num_bits": 4, "block_sizes": {-1: 8}}}}
    )
    q = model[0].weight_quantizer
    w = model[0].weight.detach().clone()
    assert q.amax.shape == (16, 2, 1)
    assert_bits_equal(q.amax, w.abs().reshape(16, 2, 8).amax(-1, keepdim=True))
    with torch.no_grad():
        model[0].weight.mul_(2.0)  # the amax stays what was calibrated (static, as ModelOpt)
    assert_bits_equal(
        q(model[0].weight),
        nq.fake_quant_int(w * 2, q.amax.repeat_interleave(8, 1).reshape(16, 16), 4),
    )
    qpeft.save(model, tmp_path / "ckpt")
    restored = qpeft.restore(_model(), tmp_path / "ckpt")
    assert_bits_equal(restored[0].weight_quantizer.amax, q.amax)


def test_tuple_axis_keeps_the_amax_over_the_given_axes():
    q = TensorQuantizer.from_config({"num_bits": 8, "axis": (0, 1)})
    with q.calibrating():
        q(X)
    assert q.amax.shape == (3, 5, 1)
    assert_bits_equal(q(X), nq.fake_quant_int(X, X.abs().amax(dim=-1, keepdim=True)))


def test_unsigned_and_16_bit_integers_hand_computed():
    q = TensorQuantizer.from_config({"num_bits": 4, "unsigned": True})
    q.amax = torch.tensor(15.0)  # scale 15 / 15 = 1, range [0, 15]
    x = torch.tensor([0.0, 1.5, 2.5, 15.0, 20.0])
    assert q(x).tolist() == [0.0, 2.0, 2.0, 15.0, 15.0]
    assert q.step_size.item() == 1.0
    with pytest.raises(ValueError, match="unsigned"):
        q(torch.tensor([-1.0]))
    q16 = TensorQuantizer.from_config({"num_bits": 16})
    q16.amax = torch.tensor(32767.0)
    assert q16(torch.tensor([0.5, 1.5, 40000.0, -40000.0])).tolist() == [
        0.0,
        2.0,
        32767.0,
        -32768.0,
    ]


def test_a_calibrating_quantizer_quantizes_with_the_running_amax():
    q = TensorQuantizer.from_config({"num_bits": 8})
    small, big = torch.tensor([0.5, -1.0]), torch.tensor([4.0, 0.3])
    q.enable_calib()
    assert_bits_equal(q(small), nq.fake_quant_int(small, torch.tensor(1.0)))
    assert_bits_equal(q(big), nq.fake_quant_int(big, torch.tensor(4.0)))
    q.load_calib_amax()
    assert q.amax.item() == 4.0


def test_load_calib_amax_with_nothing_collected_raises_and_step_size():
    q = TensorQuantizer.from_config({"num_bits": 8, "axis": 0}, name="w")
    q.enable_calib()
    with pytest.raises(RuntimeError, match="w: load_calib_amax with nothing collected"):
        q.load_calib_amax()
    q.amax = torch.tensor([[2.54], [1.27]])
    assert torch.equal(q.step_size, q.amax / 127.0)
    assert TensorQuantizer.from_config({"num_bits": 8}).step_size is None


def test_forward_loop_may_take_no_argument():
    model = _model()
    qpeft.quantize(model, "int8", forward_loop=lambda: model(X))
    assert model[0].input_quantizer.amax.item() == X.abs().amax().item()
