"""LoRA (kaiming_zeros and svdquant) on grouped experts quantized by ``qpeft.quantize``."""

import copy

import pytest
import torch

pytest.importorskip("transformers")

import qpeft  # noqa: E402
from qpeft.core.wrapping import innermost  # noqa: E402
from qpeft.quant.experts import QuantExperts  # noqa: E402
from tests.models import MOE_MODELS, fit_random_target, token_ids  # noqa: E402
from tests.tolerances import SVD_OPTIMALITY_RATIO  # noqa: E402

ARCHS = sorted(MOE_MODELS)
RANDOM_B = "torch.nn.init.normal_"


def _experts(model):
    return {n: m for n, m in model.named_modules() if n.endswith("mlp.experts")}


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _quantized(arch, preset="nvfp4_weight_only"):
    return qpeft.quantize(MOE_MODELS[arch](), preset)


@pytest.mark.parametrize("impl", ["grouped_mm", "batched_mm"])
@pytest.mark.parametrize("arch", ARCHS)
def test_zero_b_on_a_quantized_base_is_bit_identical(arch, impl):
    model, ids = _quantized(arch), token_ids()
    model.set_experts_implementation(impl)
    ref = _logits(model, ids)
    qpeft.update_model(model, {"adapter_cfg": {"*experts": {"rank": 4}}})
    layer = model.model.layers[0].mlp.experts
    assert isinstance(layer.base, QuantExperts) and layer.adapters["default"].rank == 4
    assert torch.equal(_logits(model, ids), ref)


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss"])
def test_both_orders_build_the_same_layers(arch):
    ids = token_ids()
    first = _quantized(arch)
    qpeft.update_model(first, {"adapter_cfg": {"*experts": {"rank": 4}}})
    second = MOE_MODELS[arch]()
    qpeft.update_model(second, {"adapter_cfg": {"*experts": {"rank": 4}}})
    qpeft.quantize(second, "nvfp4_weight_only")
    assert repr(first) == repr(second)
    assert first.state_dict().keys() == second.state_dict().keys()
    assert torch.equal(_logits(first, ids), _logits(second, ids))  # B = 0 in both


@pytest.mark.parametrize(
    ("arch", "preset"), [("mixtral", "int4"), ("gpt_oss", "nvfp4_weight_only")]
)
def test_svdquant_lowers_every_experts_residual(arch, preset):
    weights = qpeft.PRESETS[preset]["*weight_quantizer"]  # the experts alone: their error shows
    model, ids = (
        qpeft.quantize(MOE_MODELS[arch](), {"quant_cfg": {"*experts.*": weights}}),
        token_ids(),
    )
    full = _logits(MOE_MODELS[arch](), ids)
    quant_only = _logits(model, ids)
    rank = 6
    qpeft.update_model(
        model,
        {"adapter_cfg": {"*experts": {"rank": rank, "scale": 2.0, "lora_init_method": "svdquant"}}},
    )
    assert (_logits(model, ids) - full).abs().mean() < (quant_only - full).abs().mean()
    for layer in _experts(model).values():
        inner = innermost(layer)
        for proj, delta in layer.adapters["default"].delta_weight().items():
            weight = getattr(inner, proj).detach()
            residual = weight - layer.base.quantized(f"{proj}_weight_quantizer")
            if inner.is_transposed:
                residual, delta = residual.transpose(-2, -1), delta.transpose(-2, -1)
            before = torch.linalg.matrix_norm(residual)  # zero adapters
            after = torch.linalg.matrix_norm(residual - delta)
            optimum = torch.linalg.svdvals(residual)[:, rank:].square().sum(-1).sqrt()
            assert (after < before).all(), (proj, after, before)
            assert (after <= optimum * SVD_OPTIMALITY_RATIO + 1e-6).all()


def test_svdquant_on_disabled_expert_quantizers_warns_and_zeroes():
    model, ids = _quantized("qwen3_moe"), token_ids()
    qpeft.disable_quantizer(model, "*experts.*")
    ref = _logits(model, ids)
    with pytest.warns(UserWarning, match="no enabled weight quantizer"):
        qpeft.update_model(
            model, {"adapter_cfg": {"*experts": {"rank": 2, "lora_init_method": "svdquant"}}}
        )
    assert torch.equal(_logits(model, ids), ref)


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss"])
def test_training_adapters_on_a_quantized_base_lowers_the_loss(arch):
    model, ids = _quantized(arch), token_ids()
    qpeft.update_model(
        model, {"adapter_cfg": {"*experts": {"rank": 4, "lora_init_method": "svdquant"}}}
    )
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    losses = fit_random_target(model, ids, steps=6)
    assert losses[-1] < losses[0]
    for name, param in model.named_parameters():
        if name in base:
            assert torch.equal(param, base[name]), name  # the base and its cached Q(W) stay
    assert (
        model.model.layers[0]
        .mlp.experts.base._weight_caches["down_proj_weight_quantizer"]
        .is_filled
    )


def test_export_folds_per_expert_into_the_quantized_base():
    model, ids = _quantized("gpt_oss", "int8_weight_only"), token_ids()
    qpeft.update_model(model, {"adapter_cfg": {"*experts": {"rank": 4, "lora_b_init": RANDOM_B}}})
    reference = copy.deepcopy(model)  # unwrap the LoRA layers by hand, weights += delta
    for name, layer in _experts(reference).items():
        inner = innermost(layer)
        with torch.no_grad():
            for proj, delta in layer.adapters["default"].delta_weight().items():
                getattr(inner, proj).add_(delta)
        reference.set_submodule(name, layer.base)
    with pytest.warns(UserWarning, match=r"master weights of 2 quantized layer.*mlp\.experts"):
        qpeft.export(model)
    assert not qpeft.is_peft_model(model)
    assert isinstance(model.model.layers[0].mlp.experts, QuantExperts)  # the quantizers stay
    assert torch.equal(_logits(model, ids), _logits(reference, ids))


def test_save_restore_of_a_quantized_lora_moe_model(tmp_path):
    model, ids = (
        qpeft.quantize(
            MOE_MODELS["mixtral"](), "nvfp4", forward_loop=lambda m: m(input_ids=token_ids())
        ),
        token_ids(),
    )
    qpeft.update_model(
        model,
        {
            "adapter_cfg": {
                "*": {"rank": 4, "lora_init_method": "svdquant"},
                "*lm_head*": {"enable": False},
            }
        },
    )
    fit_random_target(model, ids, steps=2)
    qpeft.save(model, tmp_path / "ck")
    restored = qpeft.restore(MOE_MODELS["mixtral"](), tmp_path / "ck")
    assert isinstance(restored.model.layers[1].mlp.experts.base, QuantExperts)
    assert torch.equal(_logits(restored, ids), _logits(model, ids))


def test_disabled_adapters_run_the_quantized_experts_own_forward():
    model, ids = _quantized("qwen3_moe"), token_ids()
    ref = _logits(model, ids)
    qpeft.update_model(model, {"adapter_cfg": {"*experts": {"rank": 4, "lora_b_init": RANDOM_B}}})
    calls = []
    model.model.layers[0].mlp.experts.base.register_forward_hook(lambda *_: calls.append(1))
    assert not torch.equal(_logits(model, ids), ref) and not calls  # adapters on: the LoRA path
    with qpeft.disabled_adapters(model):
        assert torch.equal(_logits(model, ids), ref)
    assert calls == [1]  # adapters off: QuantExperts' own forward, whatever the implementation
