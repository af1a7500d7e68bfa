"""Fusing the base matmul: plain nn.Linear and weight-only QuantLinear bases, equal to the
reference."""

import pytest
import torch

import qpeft
from qpeft.lora.layer import reference_forward
from tests.models import TinyBlock
from tests.tolerances import FASTPATH_ATOL, FASTPATH_RTOL


def _model(preset, order, base_trainable=False):
    torch.manual_seed(0)
    model, x = TinyBlock(), torch.randn(5, 16)
    lora = {
        "adapter_cfg": {"*": {"rank": 4, "scale": 2.0, "lora_b_init": "torch.nn.init.normal_"}},
        "freeze_base_model": not base_trainable,
    }
    if order == "quant_first":
        qpeft.quantize(model, preset, forward_loop=lambda m: m(x))
        qpeft.update_model(model, lora)
    else:
        qpeft.update_model(model, lora)
        qpeft.quantize(model, preset, forward_loop=lambda m: m(x))
    return model.attn.q_proj


def _grads(layer, x, fast):
    x = x.clone().requires_grad_(True)
    y = layer(x) if fast else reference_forward(layer, x, layer.base(x))
    (y * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    layer.zero_grad()
    return y, x.grad, grads


@pytest.mark.parametrize("base_trainable", [False, True])
@pytest.mark.parametrize("order", ["quant_first", "lora_first"])
@pytest.mark.parametrize(
    ("preset", "grad_fn"),
    [("nvfp4_weight_only", "_LinearLoRABackward"), ("int8", "_LoRAAddmmBackward")],
)
def test_quantized_base_fast_path_equals_reference(preset, grad_fn, order, base_trainable):
    layer = _model(preset, order, base_trainable)
    x = torch.randn(3, 4, 16)
    y, gx, grads = _grads(layer, x, fast=True)
    assert type(y.grad_fn).__name__ == grad_fn  # int8 quantizes the input: the base runs itself
    y_ref, gx_ref, grads_ref = _grads(layer, x, fast=False)
    torch.testing.assert_close(y, y_ref, atol=FASTPATH_ATOL, rtol=FASTPATH_RTOL)
    torch.testing.assert_close(gx, gx_ref, atol=FASTPATH_ATOL, rtol=FASTPATH_RTOL)
    assert grads.keys() == grads_ref.keys() and ("base.base.weight" in grads) == base_trainable
    for k in grads:
        torch.testing.assert_close(
            grads[k], grads_ref[k], atol=FASTPATH_ATOL, rtol=FASTPATH_RTOL, msg=k
        )


def test_disabling_the_input_quantizer_switches_to_the_fused_path():
    layer = _model("int8", "quant_first")
    qpeft.disable_quantizer(layer, "*input_quantizer")
    x = torch.randn(2, 16)
    assert type(layer(x).grad_fn).__name__ == "_LinearLoRABackward"
    torch.testing.assert_close(
        layer(x), reference_forward(layer, x, layer.base(x)), atol=FASTPATH_ATOL, rtol=FASTPATH_RTOL
    )
