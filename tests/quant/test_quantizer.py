"""TensorQuantizer: calibration, enable/disable, errors, state_dict, config validation."""

import pytest
import torch
from pydantic import ValidationError

from qpeft.quant import PRESETS, QuantizerAttributeConfig, TensorQuantizer
from qpeft.quant import numerics as nq
from tests.quant.bitwise import assert_bits_equal
from tests.quant.reference import DTYPES, ref

INT8_ROW = {"num_bits": 8, "axis": 0}
INT4 = {"num_bits": 4, "block_sizes": {-1: 128, "type": "static"}}
NVFP4 = {"num_bits": (2, 1), "block_sizes": {-1: 16, "type": "dynamic", "scale_bits": (4, 3)}}
MXFP4 = {"num_bits": (2, 1), "block_sizes": {-1: 32, "type": "dynamic", "scale_bits": (8, 0)}}


def calibrated(cfg, *batches, name=None):
    q = TensorQuantizer.from_config(cfg, name=name)
    with q.calibrating():
        for b in batches:
            q(b)
    return q


@pytest.mark.parametrize("dtype", DTYPES)
def test_int8_row_calibration_and_output_match_modelopt(dtype):
    w = ref("int8_row", dtype, "x")
    q = calibrated(INT8_ROW, w)
    assert_bits_equal(q.amax, ref("int8_row", dtype, "calib_amax"))
    assert_bits_equal(q(w), ref("int8_row_calibrated", dtype, "y"))


def test_calibration_is_a_running_max():
    a, b = torch.tensor([[1.0, -5.0], [2.0, 0.5]]), torch.tensor([[-3.0, 1.0], [0.0, 1.0]])
    assert calibrated(INT8_ROW, a, b).amax.tolist() == [[5.0], [2.0]]
    assert calibrated({"num_bits": 8}, a, b).amax.item() == 5.0
    q = TensorQuantizer("int", 8)
    q.enable_calib()
    q(a)
    q.load_calib_amax()
    assert q.amax.item() == 5.0


@pytest.mark.parametrize("dtype", DTYPES)
def test_block_formats_match_modelopt(dtype):
    w = ref("int4_block", dtype, "x")  # ModelOpt calibrated its static per-block amax on w
    q = calibrated(INT4, w)
    assert q.amax.shape == (6, 2, 1)  # [rows, blocks of 128 (200 padded to 256), 1]
    assert_bits_equal(q(w), ref("int4_block", dtype, "y"))
    x = ref("mxfp4", dtype, "x")  # the reference is MXFP4QTensor's (ties toward zero)
    assert_bits_equal(TensorQuantizer.from_config(MXFP4)(x), nq.fake_quant_mxfp4(x))
    assert_bits_equal(nq.fake_quant_mxfp4(x, ties_to_even=False), ref("mxfp4", dtype, "y"))


def test_nvfp4_uses_calibrated_amax_else_input_amax():
    x = ref("nvfp4", "bf16", "x")
    q = TensorQuantizer.from_config(NVFP4)
    assert_bits_equal(q(x), ref("nvfp4", "bf16", "y"))  # reference used max |x|
    q.amax = ref("nvfp4_sat", "bf16", "amax")
    assert_bits_equal(q(x), ref("nvfp4_sat", "bf16", "y"))
    assert calibrated(NVFP4, x).amax.item() == x.float().abs().max().item()


@pytest.mark.parametrize("cfg", [INT8_ROW, {"num_bits": (4, 3)}, NVFP4, MXFP4, INT4])
def test_disabled_returns_input_object_and_calibrating_quantizes_with_the_running_amax(cfg):
    x = torch.randn(4, 32, dtype=torch.bfloat16)
    q = TensorQuantizer.from_config(cfg)
    q.disable()
    assert not q.is_enabled and q(x) is x
    q.enable()
    with q.calibrating():
        during = q(x)  # as ModelOpt with calibration and quantization both on
    assert_bits_equal(during, q(x))
    assert TensorQuantizer.from_config({**cfg, "enable": False})(x) is x


@pytest.mark.parametrize("cfg", [INT8_ROW, {"num_bits": (4, 3)}])
def test_uncalibrated_static_quantizer_raises_with_its_name(cfg):
    with pytest.raises(RuntimeError, match="layers.0.q_proj.weight_quantizer has no amax"):
        TensorQuantizer.from_config(cfg, name="layers.0.q_proj.weight_quantizer")(torch.ones(2, 2))
    with pytest.raises(RuntimeError, match=r"TensorQuantizer\((int8|fp8).*uncalibrated"):
        TensorQuantizer.from_config(cfg)(torch.ones(2, 2))


def test_state_dict_holds_amax_and_round_trips():
    w = ref("int8_row", "fp32", "x")
    q = calibrated(INT8_ROW, w)
    sd = q.state_dict()
    assert list(sd) == ["_amax"] and sd["_amax"].shape == (w.shape[0], 1)
    fresh = TensorQuantizer.from_config(INT8_ROW)
    assert "_amax" not in fresh.state_dict()
    fresh.load_state_dict(sd)
    assert_bits_equal(fresh(w), q(w))


def test_straight_through_gradients():
    x = torch.tensor([[-3.0, -1.0, 0.5, 2.0]], requires_grad=True)
    q = TensorQuantizer("int", 8, axis=0)
    q.amax = torch.tensor([[1.0]])
    q(x).sum().backward()
    assert x.grad.tolist() == [[1.0, 1.0, 1.0, 1.0]]  # ModelOpt default: pass through
    x.grad = None
    q.pass_through_bwd = False
    q(x).sum().backward()
    assert x.grad.tolist() == [[0.0, 1.0, 1.0, 0.0]]


def test_extra_repr():
    assert "int8 axis=0 amax=uncalibrated" in repr(TensorQuantizer.from_config(INT8_ROW))
    assert "int4 block=128 amax=uncalibrated" in repr(TensorQuantizer.from_config(INT4))
    assert "mxfp4 block=32 amax=dynamic" in repr(TensorQuantizer.from_config(MXFP4))
    assert "nvfp4 block=16" in repr(TensorQuantizer.from_config(NVFP4))
    q = calibrated(INT8_ROW, torch.tensor([[1.0], [-2.0]]))
    assert "amax=[1, 2](2)" in repr(q)
    assert "disabled" in repr(TensorQuantizer.from_config({"enable": False}))


def test_config_accepts_modelopt_json_layout():
    cfg = {
        "num_bits": [2, 1],
        "effective_bits": 4.5,
        "block_sizes": {"-1": 16, "type": "dynamic", "scale_bits": [4, 3]},
    }
    assert QuantizerAttributeConfig(**cfg).resolve() == ("nvfp4", 16)
    assert QuantizerAttributeConfig(**MXFP4).resolve() == ("mxfp4", 32)
    assert QuantizerAttributeConfig(**INT4).resolve() == ("int", 128)
    assert QuantizerAttributeConfig(num_bits=(4, 3), axis=None).resolve() == ("fp8", None)


@pytest.mark.parametrize(
    ("cfg", "field"),
    [
        ({"num_bits": 8, "axs": 0}, "axs"),
        ({"num_bits": (5, 2)}, "num_bits"),
        ({"num_bits": 33}, "num_bits"),
        ({"num_bits": 1}, "num_bits"),
        ({"num_bits": 8, "axis": 0, "block_sizes": {-1: 128}}, "axis"),
        (
            {"num_bits": (2, 1), "block_sizes": {-1: 16, "type": "dynamic", "scale_bits": (5, 2)}},
            "block_sizes",
        ),
        ({"num_bits": (2, 1)}, "block_sizes"),
        ({"num_bits": 4, "block_sizes": {-1: 0}}, "block_sizes"),
        ({"num_bits": 4, "block_sizes": {-1: 8, -2: 8, "type": "dynamic"}}, "block_sizes"),
        ({"num_bits": 4, "type": "dynamic", "block_sizes": {-1: 8, "type": "static"}}, "type"),
        ({"num_bits": 8, "block_sizes": {-1: 32, "scale_bits": (8, 0)}}, "block_sizes"),
        ({"num_bits": (4, 3), "unsigned": True}, "unsigned"),
        ({"num_bits": 8, "axis": ()}, "axis"),
    ],
)
def test_config_errors_name_the_field(cfg, field):
    with pytest.raises(ValidationError, match=field):
        TensorQuantizer.from_config(cfg)


def test_presets_validate_and_keep_modelopt_order():
    assert set(PRESETS) == {
        "int8", "int8_weight_only", "int4", "fp8", "fp8_weight_only",
        "nvfp4", "nvfp4_weight_only", "mxfp4", "fp8_dynamic", "int8_dynamic", "fp8_block128",
    }  # fmt: skip
    for pmap in PRESETS.values():
        assert list(pmap)[:3] == ["*", "*weight_quantizer", "*input_quantizer"]
        assert pmap["*lm_head*"] == {"enable": False} and pmap["*router*"] == {"enable": False}
        for attrs in pmap.values():
            TensorQuantizer.from_config(attrs)
    assert PRESETS["int8"]["*weight_quantizer"] == {"enable": True, "num_bits": 8, "axis": 0}
    assert PRESETS["nvfp4_weight_only"]["*input_quantizer"] == {"enable": False}


def test_quantizer_output_equals_pure_function():
    x = torch.randn(3, 40, dtype=torch.float16)
    q = TensorQuantizer("fp8")
    q.amax = x.float().abs().amax()
    assert_bits_equal(q(x), nq.fake_quant_fp8(x, x.float().abs().amax()))
