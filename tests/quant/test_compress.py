"""``qpeft.compress``: bit-identical outputs and gradients, nothing dense left, clean refusals."""

import copy

import pytest
import torch
from torch import nn

import qpeft
from qpeft.quant import CompressedLinear, PackedLinear
from tests.checkpoint.helpers import untouched
from tests.models import TinyBlock, tiny_gpt2, token_ids
from tests.quant.bitwise import assert_bits_equal

LORA = {
    "adapter_cfg": {
        "*": {"rank": 4, "lora_b_init": "torch.nn.init.normal_"},
        "*lm_head*": {"enable": False},
    }
}


class Odd(nn.Module):
    """Layers whose weight shapes no activation of the test shares."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(24, 40)
        self.b = nn.Linear(40, 36, bias=False)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def _quantized(preset, dtype=torch.float32, model=None, shape=(3, 5, 16)):
    torch.manual_seed(0)
    model = (model or TinyBlock()).to(dtype)
    x = torch.randn(*shape, dtype=dtype)
    model = qpeft.quantize(model, preset, forward_loop=lambda m: m(x))
    model.requires_grad_(False)
    return model, x


def _run(model, x):
    x = x.clone().requires_grad_(True)
    y = model(x)
    (y.float() * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return y, x.grad, grads


def _assert_same_run(a, b):
    assert_bits_equal(a[0], b[0])
    assert_bits_equal(a[1], b[1])
    assert a[2].keys() == b[2].keys()
    for name in a[2]:
        assert_bits_equal(a[2][name], b[2][name])


@pytest.mark.parametrize("preset", sorted(qpeft.PRESETS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("order", ["no_lora", "lora_before", "lora_after"])
def test_compressed_model_is_bit_identical_to_the_fake_quantized_one(preset, dtype, order):
    model, x = _quantized(preset, dtype)
    if order == "lora_before":
        qpeft.update_model(model, LORA)
    reference = copy.deepcopy(model)
    model = qpeft.compress(model)
    if order == "lora_after":
        for m in (model, reference):
            torch.manual_seed(1)
            qpeft.update_model(m, LORA)
    assert isinstance(
        model.attn.q_proj.base if order != "no_lora" else model.attn.q_proj, CompressedLinear
    )
    _assert_same_run(_run(model, x), _run(reference, x))


@pytest.mark.parametrize("preset", ["int8", "nvfp4_weight_only", "int4"])
def test_conv1d_layers_compress_bit_exactly(preset):
    ids = token_ids()
    model = tiny_gpt2()
    model = qpeft.quantize(model, preset, forward_loop=lambda m: m(input_ids=ids))
    model.requires_grad_(False)
    qpeft.update_model(model, LORA)
    reference = copy.deepcopy(model)
    model = qpeft.compress(model)
    assert type(model.transformer.h[0].attn.c_attn.base).__name__ == "CompressedConv1D"
    for m in (model, reference):
        m(input_ids=ids).logits.float().square().mean().backward()
    assert_bits_equal(model(input_ids=ids).logits, reference(input_ids=ids).logits)
    ref = dict(reference.named_parameters())
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trained and trained.keys() == {n for n, p in ref.items() if p.requires_grad}
    for name, p in trained.items():
        assert_bits_equal(p.grad, ref[name].grad)


def test_training_steps_stay_bit_identical():
    model, x = _quantized("nvfp4", torch.bfloat16)
    qpeft.update_model(model, LORA)
    reference = copy.deepcopy(model)
    model = qpeft.compress(model)
    runs = []
    for m in (model, reference):
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
        for _ in range(3):
            opt.zero_grad()
            m(x).float().square().mean().backward()
            opt.step()
        runs.append(m(x))
    assert_bits_equal(runs[0], runs[1])


def _dense_shapes(model):
    return {(m.out_features, m.in_features) for m in model.modules() if isinstance(m, PackedLinear)}


def _saved_shapes(model, x):
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x.clone().requires_grad_(True)).sum()
    return saved


@pytest.mark.parametrize("preset", ["int8", "int8_weight_only", "nvfp4_weight_only"])
@pytest.mark.parametrize("lora", [False, True])
def test_nothing_dense_survives_and_backward_saves_no_dense_weight(preset, lora):
    model, x = _quantized(preset, model=Odd(), shape=(7, 24))
    if lora:
        qpeft.update_model(model, {"adapter_cfg": {"*": {"rank": 4}}})
    reference = copy.deepcopy(model)
    model = qpeft.compress(model)
    dense = {(40, 24), (36, 40), (24, 40), (40, 36)}
    assert _dense_shapes(model) == {(40, 24), (36, 40)}
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if "adapters" not in name:
            assert not (t.is_floating_point() and t.dim() == 2 and tuple(t.shape) in dense), name
    assert all(not getattr(m, "_weight_caches", {}) for m in model.modules())
    assert not any(s in dense and d.is_floating_point for s, d in _saved_shapes(model, x))
    # the fake-quantized model does save its dense Q(W): the check above can fail
    assert any(s in dense for s, _ in _saved_shapes(reference, x))


def test_weight_reads_the_dequantized_value_and_state_dict_holds_packed_tensors():
    model, x = _quantized("int4")
    expected = model.attn.q_proj.weight_quantizer(model.attn.q_proj.weight)
    model = qpeft.compress(model)
    layer = model.attn.q_proj
    assert_bits_equal(layer.weight, expected)
    assert not layer.weight.requires_grad
    keys = set(model.state_dict())
    assert {"attn.q_proj.weight_packed", "attn.q_proj.weight_scale", "attn.q_proj.bias"} <= keys
    assert "attn.q_proj.weight" not in keys and "attn.q_proj.weight_quantizer._amax" not in keys
    assert "lm_head.weight" in keys  # its weight quantizer is disabled: left alone
    assert qpeft.state(model)[-1]["mode"] == "compress"


def test_layer_patterns_choose_the_layers():
    model, _ = _quantized("int8")
    model = qpeft.compress(model, layer_patterns="*mlp*")
    assert isinstance(model.mlp.up, CompressedLinear) and isinstance(
        model.mlp.down, CompressedLinear
    )
    assert not isinstance(model.attn.q_proj, CompressedLinear)
    model = qpeft.compress(model, layer_patterns=["attn.q_proj"])
    assert isinstance(model.attn.q_proj, CompressedLinear)
    assert not isinstance(model.attn.v_proj, CompressedLinear)


def test_a_bare_layer_compresses_into_the_returned_wrapper():
    layer = qpeft.quantize(nn.Linear(16, 8), "int8_weight_only")
    layer.weight.requires_grad_(False)
    x = torch.randn(3, 16)
    expected = layer(x)
    layer = qpeft.compress(layer)
    assert isinstance(layer, CompressedLinear)
    assert_bits_equal(layer(x), expected)


# ------------------------------------------------------------------------------- refusals
def _refused(model, match, call=qpeft.compress):
    check = untouched(model)
    with pytest.raises(ValueError, match=match):
        call(model)
    check()


def test_refuses_a_trainable_weight():
    model, _ = _quantized("int8")
    model.mlp.up.weight.requires_grad_(True)
    _refused(model, r"'mlp\.up'.*trainable")


def test_refuses_an_uncalibrated_weight_quantizer():
    model, _ = _quantized("int8")
    model.mlp.down.weight_quantizer.reset_amax()
    _refused(model, r"'mlp\.down'.*not calibrated")


def test_refuses_non_finite_weights_and_nothing_to_compress():
    model, _ = _quantized("int8")
    with torch.no_grad():
        model.attn.q_proj.weight[0, 0] = float("inf")
    _refused(model, r"'attn\.q_proj'.*non-finite")
    _refused(TinyBlock(), "no quantized layer")


def test_grouped_experts_compress_bit_exactly_with_lora_on_the_experts():
    from tests.models import MOE_MODELS

    ids = token_ids()
    torch.manual_seed(0)
    model = MOE_MODELS["qwen3_moe"]()
    model = qpeft.quantize(model, "nvfp4", forward_loop=lambda m: m(input_ids=ids))
    model.requires_grad_(False)
    qpeft.update_model(model, LORA)
    reference = copy.deepcopy(model)
    model = qpeft.compress(model)
    experts = model.model.layers[0].mlp.experts
    assert type(experts.base).__name__ == "CompressedHFExperts"
    assert "model.layers.0.mlp.experts.gate_up_proj_packed" in model.state_dict()
    runs = []
    for m in (model, reference):
        y = m(input_ids=ids).logits
        y.float().square().mean().backward()
        runs.append((y, {n: p.grad for n, p in m.named_parameters() if p.requires_grad}))
    assert_bits_equal(runs[0][0], runs[1][0])
    assert runs[0][1].keys() == runs[1][1].keys() and any("experts" in n for n in runs[0][1])
    for name, grad in runs[1][1].items():
        assert_bits_equal(runs[0][1][name], grad)


def _compressed_lora(**lora):
    model, x = _quantized("int8")
    qpeft.update_model(model, {"adapter_cfg": {"*": {"rank": 4, **lora}}})
    return qpeft.compress(model), x


def test_operations_that_need_the_master_weight_refuse_compressed_layers():
    model, _ = _compressed_lora()
    _refused(model, "merge_adapters.*compressed.*before qpeft.compress", qpeft.merge_adapters)
    _refused(model, "export.*compressed.*export_hf_checkpoint", qpeft.export)
    _refused(model, "refine_svdquant.*compressed", qpeft.refine_svdquant)
    svd = {"adapter_name": "svd", "adapter_cfg": {"*": {"rank": 2, "lora_init_method": "svdquant"}}}
    _refused(model, "svdquant init.*compressed", lambda m: qpeft.update_model(m, svd))


def test_unmerge_of_an_adapter_merged_before_compress_is_refused():
    model, _ = _quantized("int8")
    qpeft.update_model(model, {"adapter_cfg": {"*": {"rank": 4}}})
    qpeft.merge_adapters(model)
    model = qpeft.compress(model)
    _refused(model, "unmerge_adapters.*compressed", qpeft.unmerge_adapters)


@pytest.mark.parametrize("preset", ["nvfp4_weight_only", "int4", "fp8_block128"])
def test_a_layer_dequantized_in_several_bands_stays_bit_identical(preset):
    from qpeft.quant.dequant import BAND_ELEMS

    torch.manual_seed(0)
    layer = nn.Linear(384, BAND_ELEMS // 384 * 2 + 5).to(torch.bfloat16)  # 3 bands of rows
    x = torch.randn(6, 384, dtype=torch.bfloat16)
    layer = qpeft.quantize(layer, preset, forward_loop=lambda m: m(x))
    layer.weight.requires_grad_(False)
    layer = qpeft.update_model(layer, LORA)
    reference = copy.deepcopy(layer)
    layer = qpeft.compress(layer)
    run = _run(layer, x)
    assert len(run[2]) == 2  # the LoRA factors got gradients
    _assert_same_run(run, _run(reference, x))
