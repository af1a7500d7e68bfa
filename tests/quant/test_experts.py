"""quantize() on Hugging Face grouped MoE experts (tiny Qwen3-MoE, Mixtral, GPT-OSS from
configs)."""

import copy

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

import qpeft  # noqa: E402
from qpeft.core.wrapping import innermost  # noqa: E402
from qpeft.quant import model_quantizers  # noqa: E402
from qpeft.quant.experts import QuantExperts  # noqa: E402
from tests.models import MOE_MODELS, token_ids  # noqa: E402
from tests.quant.bitwise import assert_bits_equal  # noqa: E402

ARCHS = sorted(MOE_MODELS)
PRESETS = ["int8", "int4", "fp8", "nvfp4", "mxfp4"]
PROJECTIONS = ("gate_up_proj", "down_proj")


def _experts(model):
    return {n: m for n, m in model.named_modules() if n.endswith("mlp.experts")}


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _quantized(arch, preset="nvfp4", dtype=torch.float32):
    model, ids = MOE_MODELS[arch]().to(dtype), token_ids()
    qpeft.quantize(model, preset, forward_loop=lambda m: m(input_ids=ids))
    return model, ids


def _matrix(weight, e, transposed):
    """Expert ``e``'s ``[out, in]`` matrix of a 3-D weight."""
    return weight[e].T if transposed else weight[e]


def _quantize_2d(matrix, preset):
    """The 2-D path: ``quantize`` an ``nn.Linear`` holding ``matrix`` alone, weight quantizer
    only."""
    holder = nn.Sequential(
        nn.Linear(matrix.shape[1], matrix.shape[0], bias=False, dtype=matrix.dtype)
    )
    with torch.no_grad():
        holder[0].weight.copy_(matrix)
    qpeft.quantize(
        holder, {"quant_cfg": {"*weight_quantizer": qpeft.PRESETS[preset]["*weight_quantizer"]}}
    )
    return holder[0].quantized_weight(), holder[0].weight_quantizer.amax


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("arch", ARCHS)
def test_every_expert_quantizes_as_its_own_2d_matrix(arch, preset):
    model, _ = _quantized(arch, preset)
    for layer in _experts(model).values():
        assert isinstance(layer, QuantExperts)
        inner = innermost(layer)
        for proj in PROJECTIONS:
            weight, quantizer = (
                getattr(inner, proj).detach(),
                getattr(layer, f"{proj}_weight_quantizer"),
            )
            assert quantizer.is_enabled
            quantized = layer.quantized(f"{proj}_weight_quantizer")
            assert quantized.shape == weight.shape and quantized.is_contiguous()
            for e in range(weight.shape[0]):
                want, amax = _quantize_2d(_matrix(weight, e, inner.is_transposed), preset)
                assert_bits_equal(_matrix(quantized, e, inner.is_transposed), want)
                if amax is not None:  # one amax per expert, shaped as the 2-D one
                    assert torch.equal(quantizer.amax[e].reshape(amax.shape), amax)


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss"])
def test_bf16_experts_quantize_per_expert_bit_exactly(arch):
    model, _ = _quantized(arch, "nvfp4", torch.bfloat16)
    layer = next(iter(_experts(model).values()))
    inner = innermost(layer)
    quantized = layer.quantized("down_proj_weight_quantizer")
    assert quantized.dtype == torch.bfloat16
    for e in range(quantized.shape[0]):
        want, _ = _quantize_2d(_matrix(inner.down_proj.detach(), e, inner.is_transposed), "nvfp4")
        assert_bits_equal(_matrix(quantized, e, inner.is_transposed), want)


def test_amax_shapes_are_per_expert_and_per_row():
    model, _ = _quantized("qwen3_moe", "int8")
    layer = next(iter(_experts(model).values()))
    num_e, two_i, _hidden = innermost(layer).gate_up_proj.shape
    assert layer.gate_up_proj_weight_quantizer.amax.shape == (num_e, two_i, 1)
    model, _ = _quantized("gpt_oss", "int8")  # [E, in, out] stored: one amax per output row
    layer = next(iter(_experts(model).values()))
    num_e, _hidden, two_i = innermost(layer).gate_up_proj.shape
    assert layer.gate_up_proj_weight_quantizer.amax.shape == (num_e, two_i, 1)
    model, _ = _quantized("mixtral", "fp8")
    layer = next(iter(_experts(model).values()))
    assert layer.down_proj_weight_quantizer.amax.shape == (
        innermost(layer).down_proj.shape[0],
        1,
        1,
    )


@pytest.mark.parametrize("arch", ARCHS)
def test_names_routers_head_and_no_expert_input_quantizers(arch):
    model, _ = _quantized(arch, "nvfp4")
    enabled = [n for n, q in model_quantizers(model).items() if q.is_enabled]
    for layer in range(2):
        for proj in PROJECTIONS:
            assert f"model.layers.{layer}.mlp.experts.{proj}_weight_quantizer" in enabled
    assert not [n for n in enabled if "experts" in n and "input" in n]
    assert not [n for n in enabled if "router" in n or "mlp.gate." in n or "lm_head" in n]
    assert all(
        type(m).__name__.endswith("TopKRouter")
        for n, m in model.named_modules()
        if n.endswith(("mlp.gate", "mlp.router"))
    )  # routers stay plain modules


@pytest.mark.parametrize("impl", ["grouped_mm", "batched_mm", "eager"])
@pytest.mark.parametrize("arch", ARCHS)
def test_forward_is_the_module_forward_on_quantized_weights(arch, impl):
    model, ids = _quantized(arch, "int4")
    model.set_experts_implementation(impl)
    reference = copy.deepcopy(model)
    for name, layer in _experts(reference).items():  # plain experts holding Q(W) as weights
        inner = innermost(layer)
        with torch.no_grad():
            for proj, quantized in layer.quantized_weights().items():
                getattr(inner, proj).copy_(quantized)
        reference.set_submodule(name, inner)
    assert torch.equal(_logits(model, ids), _logits(reference, ids))


def test_disabled_quantizers_give_the_unquantized_model():
    model, ids = MOE_MODELS["mixtral"](), token_ids()
    ref = _logits(model, ids)
    qpeft.quantize(model, "int8_weight_only")
    assert not torch.equal(_logits(model, ids), ref)
    qpeft.disable_quantizer(model, "*self_attn*")
    assert not torch.equal(_logits(model, ids), ref)
    qpeft.disable_quantizer(model, "*experts.*_weight_quantizer")
    assert torch.equal(_logits(model, ids), ref)


def test_frozen_weights_use_the_cache_and_edits_invalidate_it():
    model, _ = _quantized("qwen3_moe", "nvfp4")
    model.requires_grad_(False)
    layer = next(iter(_experts(model).values()))
    first = layer.quantized("down_proj_weight_quantizer")
    assert layer.quantized("down_proj_weight_quantizer") is first
    with torch.no_grad():
        innermost(layer).down_proj.mul_(0.5)
    after = layer.quantized("down_proj_weight_quantizer")
    assert after is not first
    assert_bits_equal(after, layer.down_proj_weight_quantizer(innermost(layer).down_proj))


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss"])
def test_trainable_expert_weights_get_straight_through_gradients(arch):
    model, ids = _quantized(arch, "int8_weight_only")
    layer = next(iter(_experts(model).values()))
    inner = innermost(layer)
    hidden = torch.randn(10, model.config.hidden_size)
    idx = torch.stack([torch.randperm(inner.down_proj.shape[0])[:2] for _ in range(10)])
    weights = torch.rand(10, 2)
    layer(hidden, idx, weights).square().sum().backward()
    # STE: dL/dW is dL/dQ(W), the gradient of the module run on the quantized weights
    leaves = {p: q.detach().requires_grad_() for p, q in layer.quantized_weights().items()}
    out = torch.func.functional_call(inner, leaves, (hidden, idx, weights))
    grads = torch.autograd.grad(out.square().sum(), list(leaves.values()))
    for proj, grad in zip(leaves, grads, strict=True):
        assert getattr(inner, proj).grad is not None
        torch.testing.assert_close(getattr(inner, proj).grad, grad)


@pytest.mark.parametrize(
    ("arch", "preset"), [("qwen3_moe", "nvfp4"), ("gpt_oss", "int8"), ("mixtral", "fp8")]
)
def test_save_restore_gives_identical_logits(tmp_path, arch, preset):
    model, ids = _quantized(arch, preset)
    qpeft.disable_quantizer(model, "*layers.1.mlp.experts.down_proj_weight_quantizer")
    qpeft.save(model, tmp_path / "ck")
    restored = qpeft.restore(MOE_MODELS[arch](), tmp_path / "ck")
    assert isinstance(restored.model.layers[0].mlp.experts, QuantExperts)
    assert not restored.model.layers[1].mlp.experts.down_proj_weight_quantizer.is_enabled
    for key, value in model.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value), key
    assert torch.equal(_logits(restored, ids), _logits(model, ids))


def test_quantizing_again_replaces_the_expert_quantizers():
    model, ids = _quantized("qwen3_moe", "nvfp4")
    qpeft.quantize(model, "int8_weight_only")
    layer = model.model.layers[0].mlp.experts
    assert isinstance(layer.base, nn.Module) and not isinstance(layer.base, QuantExperts)
    assert (
        layer.gate_up_proj_weight_quantizer.fmt == "int"
        and layer.gate_up_proj_weight_quantizer.axis == 0
    )


def test_an_axis_an_expert_matrix_lacks_is_refused_and_the_model_kept():
    model = MOE_MODELS["qwen3_moe"]()
    before = copy.deepcopy(model.state_dict())
    cfg = {"quant_cfg": {"*experts.*weight_quantizer": {"num_bits": 8, "axis": 2}}}
    with pytest.raises(
        ValueError, match=r"model\.layers\.0\.mlp\.experts\.gate_up_proj_weight_quantizer.*axis"
    ):
        qpeft.quantize(model, cfg)
    assert not qpeft.state(model) and not any(isinstance(m, QuantExperts) for m in model.modules())
    assert model.state_dict().keys() == before.keys()
