"""The fused LoRA path (one autograd function, addmm) equals the simple reference path."""

import pytest
import torch
from torch import nn

import qpeft
from qpeft.lora.layer import reference_forward
from tests.tolerances import BF16_ATOL, BF16_RTOL, FASTPATH_ATOL, FASTPATH_RTOL


class _SubLinear(nn.Linear):
    """Not exactly nn.Linear: the LoRA layer must call its forward (the lora_addmm path)."""


# "linear": the base matmul is fused too (linear_lora); "addmm": the base runs its own forward.
PATHS = {"linear": nn.Linear, "addmm": _SubLinear}
GRAD_FN = {"linear": "_LinearLoRABackward", "addmm": "_LoRAAddmmBackward"}


@pytest.fixture(params=sorted(PATHS))
def path(request):
    return request.param


def _layer(specs, base_trainable=False, bias=True, path="linear"):
    torch.manual_seed(0)
    base = PATHS[path](24, 20, bias=bias)
    model = nn.Sequential(base)
    for name, rank, scale, dtype in specs:
        cfg = {"rank": rank, "scale": scale, "lora_b_init": "torch.nn.init.normal_"}
        if dtype:
            cfg["lora_dtype"] = dtype
        qpeft.update_model(
            model,
            {
                "adapter_name": name,
                "adapter_cfg": {"*": cfg},
                "freeze_base_model": not base_trainable,
            },
        )
    return model[0]


def _run(layer, x, fast):
    x = x.clone().requires_grad_(True)
    y = layer(x) if fast else reference_forward(layer, x, layer.base(x))
    (y * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    params = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    layer.zero_grad()
    return y.detach(), x.grad, params


def _assert_same(layer, x, atol=FASTPATH_ATOL, rtol=FASTPATH_RTOL):
    y1, gx1, gp1 = _run(layer, x, fast=True)
    y2, gx2, gp2 = _run(layer, x, fast=False)
    torch.testing.assert_close(y1, y2, atol=atol, rtol=rtol)
    torch.testing.assert_close(gx1, gx2, atol=atol, rtol=rtol)
    assert gp1.keys() == gp2.keys() and gp1
    for k in gp1:
        torch.testing.assert_close(gp1[k], gp2[k], atol=atol, rtol=rtol, msg=k)


@pytest.mark.parametrize("shape", [(7, 24), (3, 5, 24), (2, 2, 3, 24)])
def test_single_adapter_outputs_and_gradients(shape, path):
    layer = _layer([("a", 4, 2.0, None)], path=path)
    _assert_same(layer, torch.randn(*shape))


def test_several_adapters_fused_with_different_ranks_and_scales(path):
    specs = [("a", 4, 2.0, None), ("b", 3, 0.5, None), ("c", 6, 1.0, None)]
    layer = _layer(specs, base_trainable=True, path=path)
    _assert_same(layer, torch.randn(3, 5, 24))


def test_scale_one_and_disabled_and_frozen_adapters(path):
    layer = _layer(
        [("a", 4, 1.0, None), ("b", 3, 1.0, None), ("c", 2, 3.0, None)], bias=False, path=path
    )
    qpeft.disable_adapters(layer_model := nn.Sequential(layer), adapters_to_disable="c")
    qpeft.freeze_lora_weights(layer_model, adapter_patterns="a")
    _, _, grads = _run(layer, torch.randn(4, 24), fast=True)
    assert not any(k.startswith("adapters.a.") or k.startswith("adapters.c.") for k in grads)
    _assert_same(layer, torch.randn(4, 24))


def test_mixed_dtypes_use_the_fused_and_the_simple_path_together(path):
    layer = _layer([("a", 4, 2.0, None), ("b", 3, 0.5, "bf16")], path=path)
    _assert_same(layer, torch.randn(3, 24), atol=BF16_ATOL, rtol=BF16_RTOL)


def test_bf16_base_and_adapter_take_the_fused_path(path):
    layer = _layer([("a", 4, 2.0, None)], path=path).to(torch.bfloat16)
    y1, _, _ = _run(layer, torch.randn(3, 24, dtype=torch.bfloat16), fast=True)
    assert y1.dtype == torch.bfloat16
    _assert_same(layer, torch.randn(3, 24, dtype=torch.bfloat16), atol=BF16_ATOL, rtol=BF16_RTOL)


def test_fused_update_is_one_autograd_node(path):
    layer = _layer([("a", 4, 2.0, None), ("b", 3, 0.5, None)], path=path)
    y = layer(torch.randn(3, 24))
    assert type(y.grad_fn).__name__ == GRAD_FN[path]


def test_base_hooks_still_run_and_switch_to_the_addmm_path():
    layer = _layer([("a", 4, 2.0, None)])
    seen = []
    handle = layer.base.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    y = layer(torch.randn(3, 24))
    assert seen == [(3, 20)] and type(y.grad_fn).__name__ == GRAD_FN["addmm"]
    handle.remove()
    _assert_same(layer, torch.randn(3, 24))


def test_zero_b_keeps_the_base_output_bit_for_bit(path):
    layer = _layer([("a", 4, 2.0, None)], path=path)
    torch.nn.init.zeros_(layer.adapters["a"].lora_b)
    x = torch.randn(2, 7, 24)
    assert torch.equal(layer(x), layer.base(x))


def test_layer_compiles_with_fullgraph(path):
    layer = _layer([("a", 4, 2.0, None), ("b", 3, 0.5, None)], path=path)
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = torch.randn(3, 5, 24)
    xc = x.clone().requires_grad_(True)
    yc = compiled(xc)
    yc.sum().backward()
    y, gx, _ = _run(layer, x, fast=True)
    torch.testing.assert_close(yc.detach(), y, atol=FASTPATH_ATOL, rtol=FASTPATH_RTOL)
    xr = x.clone().requires_grad_(True)
    layer(xr).sum().backward()
    torch.testing.assert_close(xc.grad, xr.grad, atol=FASTPATH_ATOL, rtol=FASTPATH_RTOL)


def test_autocast_matches_the_reference_path(path):
    layer = _layer([("a", 4, 2.0, None)], path=path)
    x = torch.randn(3, 5, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast, ref = layer(x), reference_forward(layer, x, layer.base(x))
    assert fast.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(fast, ref, atol=BF16_ATOL, rtol=BF16_RTOL)


def test_non_contiguous_input(path):
    layer = _layer([("a", 4, 2.0, None), ("b", 2, 0.5, None)], path=path)
    _assert_same(layer, torch.randn(24, 5, 3).transpose(0, 2))


@pytest.mark.parametrize(
    "specs", [[("a", 4, 2.0, None)], [("a", 4, 2.0, None), ("b", 3, 0.5, None)]]
)
def test_without_autograd_the_same_values_come_without_a_graph(specs, path):
    layer = _layer(specs, path=path)
    x = torch.randn(3, 5, 24)
    with_graph = layer(x.clone().requires_grad_(True))
    assert with_graph.grad_fn is not None
    with torch.no_grad():
        without = layer(x)
    assert without.grad_fn is None and torch.equal(without, with_graph.detach())
    assert torch.equal(layer(x), without)  # grad mode on, but nothing requires grad
