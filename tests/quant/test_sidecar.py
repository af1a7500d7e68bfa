"""LoRA on a quantized base, in both orders: structure, names, the sidecar math and dtype,
training."""

import pytest
import torch

import qpeft
from qpeft.quant import QuantLinear, model_quantizers
from tests.models import TinyBlock
from tests.tolerances import BF16_ATOL, BF16_RTOL, FP32_ATOL, FP32_RTOL

LORA = {
    "adapter_cfg": {
        "*": {"rank": 4, "lora_b_init": "torch.nn.init.normal_"},
        "*lm_head*": {"enable": False},
    }
}


def _build(order, preset="int8", lora=LORA):
    torch.manual_seed(0)
    model, x = TinyBlock(), torch.randn(5, 16)

    def quant(m):
        return qpeft.quantize(m, preset, forward_loop=lambda mm: mm(x))

    if order == "quant_first":
        qpeft.update_model(quant(model), lora)
    else:
        quant(qpeft.update_model(model, lora))
    return model, x


@pytest.mark.parametrize("order", ["quant_first", "lora_first"])
def test_both_orders_give_lora_over_quant_with_the_same_names(order):
    model, x = _build(order)
    layer = model.attn.q_proj
    assert type(layer).__name__ == "LoRALinear" and isinstance(layer.base, QuantLinear)
    assert type(layer.base.base) is torch.nn.Linear
    assert (
        layer.weight is layer.base.base.weight
        and layer.weight_quantizer is layer.base.weight_quantizer
    )
    names = set(model_quantizers(model))
    assert "attn.q_proj.weight_quantizer" in names and "mlp.down.input_quantizer" in names
    keys = set(model.state_dict())
    assert {
        "attn.q_proj.weight",
        "attn.q_proj.weight_quantizer._amax",
        "attn.q_proj.adapters.default.lora_a",
    } <= keys
    assert not any(".base." in k for k in keys)


def test_both_orders_compute_the_same_thing():
    a, x = _build("quant_first")
    b, _ = _build("lora_first")
    assert set(a.state_dict()) == set(b.state_dict())
    b.load_state_dict(a.state_dict())
    assert torch.equal(a(x), b(x))


@pytest.mark.parametrize("order", ["quant_first", "lora_first"])
def test_sidecar_sees_the_unquantized_input(order):
    model, x = _build(order)
    layer = model.attn.q_proj
    ad = layer.adapters["default"]
    wq, iq = layer.weight_quantizer, layer.input_quantizer
    assert wq.is_enabled and iq.is_enabled
    expected = iq(x) @ wq(layer.weight).T + layer.bias + ad.scale * (x @ ad.lora_a.T @ ad.lora_b.T)
    torch.testing.assert_close(layer(x), expected, atol=FP32_ATOL, rtol=FP32_RTOL)
    assert not any(".adapters." in n for n in model_quantizers(model))


@pytest.mark.parametrize("preset", ["nvfp4_weight_only", "int4"])
@pytest.mark.parametrize("order", ["quant_first", "lora_first"])
def test_bf16_sidecar_on_an_fp32_quantized_base(order, preset):
    lora = {
        "adapter_cfg": {
            "*": {"rank": 4, "lora_dtype": "bf16", "lora_b_init": "torch.nn.init.normal_"},
            "*lm_head*": {"enable": False},
        }
    }
    model, x = _build(order, preset, lora)
    layer = model.mlp.up
    ad = layer.adapters["default"]
    assert ad.lora_a.dtype == torch.bfloat16 and layer.weight.dtype == torch.float32
    y = layer(x)
    assert y.dtype == torch.float32
    base = x @ layer.weight_quantizer(layer.weight).T + layer.bias
    side = (ad.scale * (x.bfloat16() @ ad.lora_a.T @ ad.lora_b.T)).float()
    torch.testing.assert_close(y, base + side, atol=BF16_ATOL, rtol=BF16_RTOL)
    assert torch.equal(y, layer.base(x) + ad(x.bfloat16()).float())  # the sidecar ran in bf16


@pytest.mark.parametrize("order", ["quant_first", "lora_first"])
def test_training_on_a_quantized_base_lowers_the_loss(order):
    model, x = _build(order, "nvfp4")
    target = torch.randn(5, 10)
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and all(".adapters." in n for n, p in model.named_parameters() if p.requires_grad)
    opt = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for _ in range(10):
        loss = torch.nn.functional.mse_loss(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]
    assert model.attn.q_proj.base._weight_caches[
        "weight_quantizer"
    ].is_filled  # frozen base: quantized once


def test_replay_of_lora_then_quant_then_strict_load_is_bit_identical():
    model, x = _build("lora_first", "nvfp4")
    fresh = TinyBlock()
    qpeft.core.modes.replay(fresh, qpeft.state(model))
    fresh.load_state_dict(model.state_dict(), strict=True)
    assert torch.equal(fresh(x), model(x))
