"""svdquant init on quantized layers (both orders, quality, padding, errors) and refine_svdquant."""

import pytest
import torch
from torch import nn

import qpeft
from qpeft.lora.init import truncated_svd
from tests.tolerances import FP32_ATOL, SVD_OPTIMALITY_RATIO

SVD = {"lora_init_method": "svdquant"}


def _weights(out_f, in_f, seed=0):
    """A weight like a trained one: a decaying low-rank part plus noise."""
    g = torch.Generator().manual_seed(seed)
    u, v = torch.randn(out_f, 32, generator=g), torch.randn(32, in_f, generator=g)
    decay = torch.logspace(0, -2, 32)
    return (u * decay) @ v / 8 + 0.02 * torch.randn(out_f, in_f, generator=g)


def _model(out_f=192, in_f=256, preset="nvfp4_weight_only", seed=0):
    model = nn.Sequential(nn.Linear(in_f, out_f))
    with torch.no_grad():
        model[0].weight.copy_(_weights(out_f, in_f, seed))
    return qpeft.quantize(model, preset)


def _residual(layer):
    w = layer.weight.detach()
    return (w - layer.weight_quantizer(w)).float()


@pytest.mark.parametrize("preset", ["nvfp4_weight_only", "int4", "int8_weight_only", "mxfp4"])
@pytest.mark.parametrize(("rank", "scale"), [(8, 1.0), (16, 2.0), (64, 0.5)])
def test_svdquant_reaches_the_eckart_young_optimum(preset, rank, scale):
    model = _model(preset=preset)
    qpeft.update_model(model, {"adapter_cfg": {"*": {**SVD, "rank": rank, "scale": scale}}})
    layer, residual = model[0], _residual(model[0])
    err = (residual - layer.adapters["default"].delta_weight()).norm()
    optimum = torch.linalg.svdvals(residual)[rank:].square().sum().sqrt()
    assert err <= SVD_OPTIMALITY_RATIO * optimum
    # at init the layer computes about W x: closer than the quantized base alone
    x = torch.randn(7, 256)
    exact = x @ layer.weight.T + layer.bias
    assert (layer(x) - exact).norm() < (layer.base(x) - exact).norm()


@pytest.mark.parametrize("shape", [(192, 256), (48, 40)])
def test_randomized_and_exact_paths_are_both_near_optimal(shape):
    residual = _residual(_model(*shape)[0])
    for rank in (4, 12, 40):
        u, s, vh = truncated_svd(residual, rank)
        err = (residual - u * s @ vh).norm()
        optimum = torch.linalg.svdvals(residual)[rank:].square().sum().sqrt()
        assert err <= SVD_OPTIMALITY_RATIO * optimum + FP32_ATOL * residual.norm()  # full rank: 0


def test_rank_above_min_dim_pads_with_zero_components():
    model = _model(6, 10)
    qpeft.update_model(model, {"adapter_cfg": {"*": {**SVD, "rank": 9}}})
    ad = model[0].adapters["default"]
    assert ad.lora_a.shape == (9, 10) and ad.lora_b.shape == (6, 9)
    assert not ad.lora_a[6:].any() and not ad.lora_b[:, 6:].any()
    torch.testing.assert_close(ad.delta_weight(), _residual(model[0]), atol=FP32_ATOL, rtol=0)


def test_order_two_has_no_quantizer_yet_so_it_falls_back_with_a_warning():
    model = nn.Sequential(nn.Linear(32, 16))
    with pytest.warns(UserWarning, match=r"layer '0' has no enabled weight quantizer.*zero"):
        qpeft.update_model(model, {"adapter_cfg": {"*": {**SVD, "rank": 4}}})
    qpeft.quantize(model, "nvfp4_weight_only")
    ad = model[0].adapters["default"]
    assert not ad.lora_a.any() and not ad.lora_b.any()


def test_disabled_weight_quantizer_falls_back_too():
    model = nn.Sequential()
    model.add_module("lm_head", nn.Linear(32, 16))
    qpeft.quantize(model, "int4")  # the preset leaves lm_head's quantizers disabled
    with pytest.warns(UserWarning, match="'lm_head'"):
        qpeft.update_model(model, {"adapter_cfg": {"*": {**SVD, "rank": 4}}})


def test_non_finite_weight_is_an_error_naming_the_layer_and_changes_nothing():
    model = _model(16, 32)
    with torch.no_grad():
        model[0].weight[3, 5] = float("inf")
    with pytest.raises(ValueError, match="layer '0' has non-finite weights"):
        qpeft.update_model(model, {"adapter_cfg": {"*": {**SVD, "rank": 4}}})
    assert not qpeft.is_peft_model(model)


def test_gpt2_conv1d_residual_is_taken_in_out_in_layout():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(48, 40))  # weight [in=40, out=48]
    qpeft.quantize(model, "int4")
    qpeft.update_model(model, {"adapter_cfg": {"*": {**SVD, "rank": 40}}})
    layer = model[0]
    residual = (layer.weight - layer.weight_quantizer(layer.weight)).detach().T
    torch.testing.assert_close(
        layer.adapters["default"].delta_weight(), residual, atol=FP32_ATOL, rtol=0
    )


# ------------------------------------------------------------------------------ refine_svdquant
def _relative_error(layer, w0):
    q = layer.weight_quantizer(layer.weight).float()
    return (
        (w0 - layer.to_out_in(q) - layer.adapters["default"].delta_weight()).norm() / w0.norm()
    ).item()


@pytest.mark.parametrize(
    "preset", ["nvfp4_weight_only", "int4", "int8_weight_only", "fp8_weight_only"]
)
def test_refine_keeps_the_best_iterate_and_never_gets_worse(preset):
    model = _model(96, 128, preset)
    qpeft.update_model(model, {"adapter_cfg": {"*": {**SVD, "rank": 8}}})
    layer = model[0]
    w0 = layer.weight.detach().clone()
    before = _relative_error(layer, w0)
    errors = qpeft.refine_svdquant(model, iters=4)["0"]
    assert len(errors) == 5 and errors[0] == pytest.approx(before, rel=1e-5)
    after = _relative_error(layer, w0)
    assert after == pytest.approx(min(errors), rel=1e-4)
    assert after <= before
    if preset != "fp8_weight_only":  # per-tensor fp8 has no structure the alternation can exploit
        assert after < before
    if layer.weight_quantizer.amax is not None:  # the amax follows the rewritten master weight
        fresh = qpeft.TensorQuantizer.from_config(qpeft.PRESETS[preset]["*weight_quantizer"])
        with fresh.calibrating():
            fresh(layer.weight)
        assert torch.equal(fresh.amax, layer.weight_quantizer.amax)


def test_refine_from_zero_factors_is_loftq_and_improves_on_plain_quantization():
    model = _model(96, 128, "nvfp4_weight_only")
    qpeft.update_model(
        model, {"adapter_cfg": {"*": {"rank": 8, "lora_a_init": "torch.nn.init.zeros_"}}}
    )
    w0 = model[0].weight.detach().clone()
    plain = (_residual(model[0]).norm() / w0.norm()).item()
    errors = qpeft.refine_svdquant(model, iters=3)["0"]
    assert errors[0] == pytest.approx(plain, rel=1e-6)  # zero factors: the plain quantization error
    assert errors[1] < errors[0] and _relative_error(model[0], w0) == pytest.approx(
        min(errors), rel=1e-4
    )


def test_refine_with_a_bf16_sidecar_and_a_conv1d_layer():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(96, 128))
    qpeft.quantize(model, "nvfp4_weight_only")
    qpeft.update_model(model, {"adapter_cfg": {"*": {**SVD, "rank": 8, "lora_dtype": "bf16"}}})
    w0 = model[0].to_out_in(model[0].weight.detach()).clone()
    errors = qpeft.refine_svdquant(model, iters=3)["0"]
    assert model[0].adapters["default"].lora_a.dtype == torch.bfloat16
    assert _relative_error(model[0], w0) == pytest.approx(min(errors), rel=1e-3)
    assert min(errors) < errors[0]


def test_refine_errors_leave_the_model_unchanged():
    model = _model(16, 32)
    with pytest.raises(ValueError, match="refine_svdquant: model has no LoRA layers"):
        qpeft.refine_svdquant(model)
    qpeft.update_model(model, {"adapter_cfg": {"*": {**SVD, "rank": 4}}})
    with pytest.raises(ValueError, match="iters must be a positive integer"):
        qpeft.refine_svdquant(model, iters=0)
    with pytest.raises(ValueError, match="no adapter named 'other'; the model has \\['default'\\]"):
        qpeft.refine_svdquant(model, adapter_name="other")
    qpeft.disable_quantizer(model, "*")
    with pytest.raises(ValueError, match="enabled weight quantizer; call qpeft.quantize first"):
        qpeft.refine_svdquant(model)
    qpeft.enable_quantizer(model, "*weight_quantizer")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="layer '0' has non-finite weights"):
        qpeft.refine_svdquant(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items() if k != "0.weight")


def test_refine_is_logged_and_replay_plus_strict_load_restores_it():
    model = _model(32, 64)
    qpeft.update_model(model, {"adapter_cfg": {"*": {**SVD, "rank": 4}}})
    qpeft.refine_svdquant(model, iters=2)
    entry = qpeft.state(model)[-1]
    assert entry == {
        "mode": "refine_svdquant",
        "config": {"adapter_name": "default", "iters": 2, "layers": ["0"]},
    }
    fresh = nn.Sequential(nn.Linear(64, 32))
    qpeft.core.modes.replay(fresh, qpeft.state(model))
    fresh.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(3, 64)
    assert torch.equal(fresh(x), model(x))
