"""Packing: ``unpack(pack(W))`` is the quantizer's ``Q(W)`` bit for bit, in the stated bytes."""

import pytest
import torch

import qpeft
from qpeft.quant.packing import PackSpec, bytes_per_weight, pack, packed_layout, unpack
from qpeft.quant.quantizer import TensorQuantizer
from tests.quant.bitwise import assert_bits_equal

FORMATS = {
    "int8_row": dict(fmt="int", num_bits=8, axis=0),
    "int8_tensor": dict(fmt="int", num_bits=8),
    "int8_narrow": dict(fmt="int", num_bits=8, axis=0, narrow_range=True),
    "int4_block128": dict(fmt="int", num_bits=4, block_sizes={-1: 128}),
    "int4_row": dict(fmt="int", num_bits=4, axis=0),
    "int8_dynamic_row": dict(fmt="int", num_bits=8, axis=0, dynamic=True),
    "fp8_tensor": dict(fmt="fp8"),
    "fp8_row": dict(fmt="fp8", axis=0),
    "fp8_block128x128": dict(fmt="fp8", block_sizes={-1: 128, -2: 128}),
    "nvfp4": dict(fmt="nvfp4"),
    "mxfp4": dict(fmt="mxfp4"),
}


def _weight(shape, dtype):
    torch.manual_seed(0)
    w = torch.randn(shape) * 0.05
    w[0, :7] = 0.0  # +0, -0 and values that round to -0 / +0
    w[1, :5] = torch.tensor([-0.0, -1e-9, 1e-9, -1e-30, 1e-30])
    w[2] = 0.0  # an all-zero row: tiny amax for per-row formats
    w[3, :40] *= 1e4  # wide dynamic range inside blocks
    return w.to(dtype)


def _spec(q, shape):
    blocks = None if q.block_sizes is None else tuple(sorted(q.block_sizes.items()))
    return PackSpec(q.fmt, tuple(shape), q.num_bits, q.axis, blocks, q.narrow_range)


def _packed(kwargs, w):
    q = TensorQuantizer(**kwargs)
    with q.calibrating():
        q(w)
    amax = q._fresh_amax(w) if q.dynamic else q.amax
    tensors, spec = pack(w, _spec(q, w.shape), amax)
    return q, tensors, spec


@pytest.mark.parametrize("name", sorted(FORMATS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(256, 1024), (72, 200), (5, 17)])
def test_unpack_is_the_quantizer_bit_for_bit(name, dtype, shape):
    w = _weight(shape, dtype)
    q, tensors, spec = _packed(FORMATS[name], w)
    layout = packed_layout(spec)
    assert {k: (tuple(t.shape), t.dtype) for k, t in tensors.items()} == layout
    assert_bits_equal(unpack(tensors, spec, dtype), q(w))
    assert spec.neg_zero  # the calibrated amax covers the weight: -0 has its code


def test_int_codes_keep_negative_zero_and_fall_back_when_the_clamp_saturates():
    w = torch.tensor([[-1e-6, 1e-6, -0.5, 0.5, -2.0, 2.0]])
    q = TensorQuantizer("int", 8, axis=0)
    q.amax = torch.tensor([[1.0]])  # smaller than max |w|: code -128 is a real value
    tensors, spec = pack(w, _spec(q, w.shape), q.amax)
    assert not spec.neg_zero
    y = unpack(tensors, spec, torch.float32)
    assert torch.equal(y, q(w))  # equal values; -0 comes back +0
    assert torch.signbit(q(w)[0, 0]) and not torch.signbit(y[0, 0])
    q.amax = torch.tensor([[2.0]])
    tensors, spec = pack(w, _spec(q, w.shape), q.amax)
    assert spec.neg_zero and tensors["packed"][0, 0] == -128
    assert_bits_equal(unpack(tensors, spec, torch.float32), q(w))


def test_int_tiny_and_infinite_amax_dequantize_like_the_fake_quant():
    w = torch.tensor([[0.25, -0.25], [1e-30, -1e-30], [0.5, -0.5]])
    q = TensorQuantizer("int", 8, axis=0)
    q.amax = torch.tensor([[1.0], [2.0**-25], [float("inf")]])
    tensors, spec = pack(w, _spec(q, w.shape), q.amax)
    assert_bits_equal(unpack(tensors, spec, torch.float32), q(w))


BOUNDS = {"nvfp4": 0.57, "mxfp4": 0.57, "int4": 0.57, "int8": 1.01, "fp8": 1.01}


@pytest.mark.parametrize("preset", sorted(BOUNDS))
def test_bytes_per_weight_of_a_compressed_layer(preset):
    torch.manual_seed(0)
    layer = torch.nn.Linear(1024, 1024, bias=False)
    layer = qpeft.quantize(
        layer, f"{preset}_weight_only" if preset in ("int8", "nvfp4", "fp8") else preset
    )
    layer.weight.requires_grad_(False)
    layer = qpeft.compress(layer)
    state = layer.state_dict()
    assert "weight" not in state
    total = sum(t.numel() * t.element_size() for t in state.values())
    per_weight = total / (1024 * 1024)
    print(f"{preset}: {per_weight:.4f} bytes per weight")
    assert per_weight <= BOUNDS[preset]
    assert bytes_per_weight(layer.base.packed_tensors(), layer.base.spec) == per_weight


def test_spec_round_trips_through_json():
    spec = PackSpec("fp8", (256, 512), 8, None, ((-2, 128), (-1, 128)), False, False)
    assert PackSpec.from_json(spec.to_json()) == spec
    spec = PackSpec("int", (8, 16), 8, (0,), None, True, True)
    assert PackSpec.from_json(spec.to_json()) == spec
