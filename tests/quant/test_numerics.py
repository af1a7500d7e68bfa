"""Bit-exact fake-quant numerics against ModelOpt 0.47.0 and hand-computed cases."""

import pytest
import torch

import tests.quant.reference as _ref_module
from qpeft.quant import numerics as nq
from tests.quant.bitwise import assert_bits_equal
from tests.quant.reference import DTYPES, ref

POS, NEG = 0.0, -0.0

# case name in the reference file -> how to compute it from the stored x (and amax)
CASES = {
    "int8_tensor": lambda c, d: nq.fake_quant_int(ref(c, d, "x"), ref(c, d, "amax")),
    "int8_ties": lambda c, d: nq.fake_quant_int(ref(c, d, "x"), ref(c, d, "amax")),
    "int8_tiny": lambda c, d: nq.fake_quant_int(ref(c, d, "x"), ref(c, d, "amax")),
    "int8_row": lambda c, d: nq.fake_quant_int(ref(c, d, "x"), ref(c, d, "amax")),
    "int4_block": lambda c, d: nq.fake_quant_int_blockwise(ref(c, d, "x"), 4, 128),
    "int4_block_even": lambda c, d: nq.fake_quant_int_blockwise(ref(c, d, "x"), 4, 128),
    "fp8_tensor": lambda c, d: nq.fake_quant_fp8(ref(c, d, "x"), ref(c, d, "amax")),
    "fp8_row": lambda c, d: nq.fake_quant_fp8(ref(c, d, "x"), ref(c, d, "amax")),
    "fp8_tiny": lambda c, d: nq.fake_quant_fp8(ref(c, d, "x"), ref(c, d, "amax")),
    "nvfp4": lambda c, d: nq.fake_quant_nvfp4(ref(c, d, "x"), ref(c, d, "amax")),
    "nvfp4_sat": lambda c, d: nq.fake_quant_nvfp4(ref(c, d, "x"), ref(c, d, "amax")),
    "nvfp4_pad": lambda c, d: nq.fake_quant_nvfp4(ref(c, d, "x"), ref(c, d, "amax")),
    "nvfp4_ties": lambda c, d: nq.fake_quant_nvfp4(ref(c, d, "x"), ref(c, d, "amax")),
    # stored from MXFP4QTensor, which rounds ties toward zero (see make_quant_reference.py)
    "mxfp4": lambda c, d: nq.fake_quant_mxfp4(ref(c, d, "x"), ties_to_even=False),
    "mxfp4_pad": lambda c, d: nq.fake_quant_mxfp4(ref(c, d, "x"), ties_to_even=False),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_bit_exact_vs_modelopt(case, dtype):
    assert_bits_equal(CASES[case](case, dtype), ref(case, dtype, "y"))


@pytest.mark.parametrize("dtype", DTYPES)
def test_int8_per_row_with_calibrated_amax_vs_modelopt(dtype):
    y = nq.fake_quant_int(ref("int8_row", dtype, "x"), ref("int8_row", dtype, "calib_amax"))
    assert_bits_equal(y, ref("int8_row_calibrated", dtype, "y"))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ["int8_row", "fp8_tensor"])
def test_clipped_ste_gradient_vs_modelopt(case, dtype):
    x = ref(case, dtype, "x").requires_grad_(True)
    amax = ref(case, dtype, "amax")
    fn = nq.fake_quant_int if case == "int8_row" else nq.fake_quant_fp8
    y = nq.apply_ste(fn, x, amax, clip_amax=amax)
    y.backward(ref(case, dtype, "grad_out"))
    assert_bits_equal(y, ref(case, dtype, "y"))
    assert_bits_equal(x.grad, ref(case, dtype, "grad"))


def test_int_ties_round_half_to_even_and_clamp():
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -2.5, 200.0, -200.0, 126.5])
    y = nq.fake_quant_int(x, torch.tensor(127.0))
    assert_bits_equal(y, torch.tensor([POS, 2.0, 2.0, NEG, -2.0, 127.0, -128.0, 126.0]))
    y = nq.fake_quant_int(x, torch.tensor(127.0), narrow_range=True)
    assert y[6].item() == -127.0


def test_int_tiny_amax_row_gives_zero():
    x = torch.tensor([[1.0, -2.0], [3.0, -4.0]])
    amax = torch.tensor([[2.0**-24], [4.0]])
    y = nq.fake_quant_int(x, amax, num_bits=8)
    assert_bits_equal(y[0], torch.tensor([POS, NEG]))
    assert y[1].tolist() == [
        (
            torch.round(torch.tensor(3.0) * (127 / torch.tensor(4.0))) / (127 / torch.tensor(4.0))
        ).item(),
        -4.0,
    ]


def test_int4_blockwise_hand_computed_with_padding():
    x = torch.tensor([[7.0, 3.5, -3.5, 1.0, 2.0, -1.0]])
    y = nq.fake_quant_int_blockwise(x, num_bits=4, block_size=4)
    s = torch.tensor(7.0) / torch.tensor(2.0)  # second block: amax 2 (padding is zeros)
    expected = torch.tensor([[7.0, 4.0, -4.0, 1.0, 2.0, (torch.tensor(-4.0) / s).item()]])
    assert_bits_equal(y, expected)


def test_fp8_hand_computed_ties_and_saturation():
    # amax 448 gives scale fp32(1/448) * 448 == 1: a saturating E4M3 round-half-even cast
    x = torch.tensor([1.0625, 1.1875, 500.0, -1000.0, 2.0**-9, 2.0**-10, -(2.0**-10)])
    y = nq.fake_quant_fp8(x, torch.tensor(448.0))
    assert_bits_equal(y, torch.tensor([1.0, 1.25, 448.0, -448.0, 2.0**-9, POS, NEG]))


def test_fp8_tiny_amax_behaves_like_amax_one():
    # ModelOpt replaces amax <= 2^-24 by 1, so the scale is 448 (not 1)
    x = torch.linspace(-3, 3, 50)
    assert_bits_equal(
        nq.fake_quant_fp8(x, torch.tensor(0.0)), nq.fake_quant_fp8(x, torch.tensor(1.0))
    )


def test_nvfp4_hand_computed_ties_to_even_and_positive_zero():
    block = [6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 5.5, -0.1, -0.0, 0.0, -3.5, -6.0, 9.0, 1.0]
    x = torch.tensor([block])
    # global amax 2688 gives global scale 1; block max 9 gives block scale e4m3(1.5) = 1.5
    y = nq.fake_quant_nvfp4(x, torch.tensor(2688.0))
    q = [4.0, 0.0, 0.5, 1.0, 1.0, 1.5, 2.0, 3.0, 4.0, 0.0, 0.0, 0.0, -2.0, -4.0, 6.0, 0.5]
    assert_bits_equal(y, torch.tensor([q]) * 1.5)


def test_mxfp4_ties_round_to_even_as_modelopts_fake_quant_kernel():
    # ModelOpt's MXFP4 fake-quant test: block max 5 -> exponent ceil(log2(5 / 6)) = 0, scale 1
    x = torch.tensor([[0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 0.0]])
    y = nq.fake_quant_mxfp4(x, block_size=8)
    assert_bits_equal(y, torch.tensor([[POS, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, NEG]]))


def test_mxfp4_hand_computed_ties_toward_zero_as_mxfp4qtensor_and_negative_zero():
    x = torch.tensor([[6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], [7.0, 0.0, 1.0, 0, 0, 0, 0, 0]])
    y = nq.fake_quant_mxfp4(x, block_size=8, ties_to_even=False)
    # exact zeros come out as -0 (ModelOpt's sign bit), 0.25 -> +0.
    # row 1: amax 7 -> exponent ceil(log2(7 / 6)) = 1, scale 2: 7 / 2 = 3.5 ties down to 3
    expected = torch.tensor(
        [[6.0, POS, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0], [6.0, NEG, 1.0, NEG, NEG, NEG, NEG, NEG]]
    )
    assert_bits_equal(y, expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ["mxfp4", "mxfp4_pad"])
def test_mxfp4_differs_from_mxfp4qtensor_reference_only_at_ties(case, dtype):
    x, old = ref(case, dtype, "x"), ref(case, dtype, "y")
    y = nq.fake_quant_mxfp4(x)
    differ = y.double() != old.double()
    assert differ.sum() < x.numel() // 20
    assert case != "mxfp4" or differ.any()  # its row 5 is a block of ties
    xd = x.double()[differ]
    # where they differ x is exactly halfway between both results, and qpeft's is larger: the
    # even E2M1 neighbour of 0.75, 1.75 and 3.5 (times the scale) is the upper one
    assert torch.equal((y.double()[differ] - xd).abs(), (old.double()[differ] - xd).abs())
    assert (y.double()[differ].abs() > old.double()[differ].abs()).all()


def test_pow2_is_exact_over_the_e8m0_range():
    e = torch.arange(-149, 128, dtype=torch.float32)
    assert_bits_equal(nq.pow2(e), torch.exp2(e.double()).float())


def test_e2m1_grid_saturates_and_nan_goes_to_max():
    a = torch.tensor([0.0, 0.2, 0.3, 5.1, 100.0, float("inf"), float("nan")])
    assert nq.e2m1_magnitude(a).tolist() == [0.0, 0.0, 0.5, 6.0, 6.0, 6.0, 6.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_output_dtype_and_shape_follow_input(dtype):
    x = torch.randn(3, 5, 40, generator=torch.Generator().manual_seed(0)).to(dtype)
    for y in (
        nq.fake_quant_int(x, torch.tensor(1.0)),
        nq.fake_quant_int_blockwise(x, 4, 16),
        nq.fake_quant_fp8(x, torch.tensor(1.0)),
        nq.fake_quant_nvfp4(x, x.float().abs().amax()),
        nq.fake_quant_mxfp4(x),
    ):
        assert y.dtype == dtype and y.shape == x.shape


def test_pass_through_ste_is_identity_and_forward_exact():
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    g = torch.randn(4, 32, generator=torch.Generator().manual_seed(2))
    y = nq.apply_ste(nq.fake_quant_mxfp4, x, 32)
    y.backward(g)
    assert_bits_equal(y, nq.fake_quant_mxfp4(x.detach(), 32))
    assert_bits_equal(x.grad, g)


def test_clipped_ste_masks_outside_amax():
    x = torch.tensor([-2.0, -1.0, 0.5, 1.0, 3.0], requires_grad=True)
    nq.apply_ste(
        nq.fake_quant_fp8, x, torch.tensor(1.0), clip_amax=torch.tensor(1.0)
    ).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]


def test_invalid_arguments_raise():
    with pytest.raises(ValueError, match="amax"):
        nq.fake_quant_int(torch.ones(2), torch.tensor(-1.0))
    with pytest.raises(ValueError, match="block_size"):
        nq.fake_quant_mxfp4(torch.ones(2, 4), block_size=0)


def test_zero_global_amax_nvfp4_is_finite():
    y = nq.fake_quant_nvfp4(torch.zeros(2, 16), torch.tensor(0.0))
    assert torch.equal(y, torch.zeros(2, 16))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_reference(monkeypatch):
    """The same code on a GPU gives the same bits (no GPU in CI: skipped there)."""
    expected = {(c, d): ref(c, d, "y") for c in CASES for d in DTYPES}
    monkeypatch.setattr(f"{__name__}.ref", lambda c, d, k: _ref_module.ref(c, d, k).cuda())
    for (case, dtype), want in expected.items():
        assert_bits_equal(CASES[case](case, dtype).cpu(), want)
