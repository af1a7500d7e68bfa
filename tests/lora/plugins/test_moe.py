"""LoRA on transformers' grouped experts: Qwen3-MoE, Mixtral, GPT-OSS built from tiny configs.

The invariants every layer kind keeps (B = 0, merge/unmerge, disable, save/restore, adapters-only
state dict, export) are checked once for each experts layout in
``tests/lora/test_layer_invariants.py``; here: whole models, layouts and experts specifics."""

import copy

import pytest
import torch

pytest.importorskip("transformers")

import qpeft  # noqa: E402
from qpeft.core.modes import replay  # noqa: E402
from qpeft.core.wrapping import innermost  # noqa: E402
from qpeft.quant.quantizer import TensorQuantizer  # noqa: E402
from tests.models import MOE_MODELS  # noqa: E402
from tests.tolerances import (  # noqa: E402
    BF16_ATOL,
    BF16_RTOL,
    FP32_ATOL,
    FP32_RTOL,
    SVD_OPTIMALITY_RATIO,
)

ARCHS = sorted(MOE_MODELS)
RANDOM_B = "torch.nn.init.normal_"


def _ids(seed=1):
    torch.manual_seed(seed)
    return torch.randint(0, 64, (2, 12))


def _experts(model):
    return {n: m for n, m in model.named_modules() if n.endswith("mlp.experts")}


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("impl", ["grouped_mm", "batched_mm"])
@pytest.mark.parametrize("arch", ARCHS)
def test_zero_b_is_bit_identical(arch, impl):
    model = MOE_MODELS[arch]()
    model.set_experts_implementation(impl)
    ids = _ids()
    ref = _logits(model, ids)
    qpeft.update_model(model, {"adapter_cfg": {"*": {"rank": 3}}})
    assert set(_experts(model)) <= set(qpeft.lora_layers(model))
    assert torch.equal(_logits(model, ids), ref)


@pytest.mark.parametrize("arch", ARCHS)
def test_eager_implementation_matches_to_fp32_rounding(arch):
    model = MOE_MODELS[arch]()
    model.set_experts_implementation("eager")
    ids = _ids()
    ref = _logits(model, ids)
    qpeft.update_model(model, {"adapter_cfg": {"*experts": {"rank": 4}}})
    torch.testing.assert_close(_logits(model, ids), ref, atol=FP32_ATOL, rtol=FP32_RTOL)


@pytest.mark.parametrize("arch", ARCHS)
def test_one_adapter_per_expert_and_projection(arch):
    model = MOE_MODELS[arch]()
    base = innermost(next(iter(_experts(model).values())))
    num_e = base.down_proj.shape[0]
    qpeft.update_model(model, {"adapter_cfg": {"*experts": {"rank": 5}}})
    layer = next(iter(_experts(model).values()))
    adapter = layer.adapters["default"]
    assert set(adapter.factors) == {"gate_up_proj", "down_proj"}
    for name, factors in adapter.factors.items():
        weight = getattr(base, name)
        out_f, in_f = weight.shape[1:] if not base.is_transposed else weight.shape[:0:-1]
        assert factors.lora_a.shape == (num_e, 5, in_f)
        assert factors.lora_b.shape == (num_e, out_f, 5)
        assert adapter.delta_weight()[name].shape == weight.shape
    keys = [k for k in model.state_dict() if ".adapters." in k]
    assert "model.layers.0.mlp.experts.adapters.default.gate_up_proj.lora_a" in keys


def test_patterns_address_experts_modules():
    model = MOE_MODELS["qwen3_moe"]()
    qpeft.update_model(model, {"adapter_cfg": {"*layers.1.mlp.experts": {"rank": 2}}})
    assert list(qpeft.lora_layers(model)) == ["model.layers.1.mlp.experts"]
    model = MOE_MODELS["qwen3_moe"]()
    qpeft.update_model(model, {"adapter_cfg": {"*": {"rank": 2}, "*experts": {"enable": False}}})
    assert not set(_experts(model)) & set(qpeft.lora_layers(model))
    with pytest.raises(ValueError, match="match none"):
        qpeft.update_model(MOE_MODELS["qwen3_moe"](), {"adapter_cfg": {"*experts.3": {"rank": 2}}})


def _merged_reference(model, ids):
    """Logits of the unwrapped model whose expert weights got every adapter's delta added."""
    ref = copy.deepcopy(model)
    for name, layer in _experts(ref).items():
        inner = innermost(layer)
        with torch.no_grad():
            for adapter in layer.adapters.values():
                for proj, delta in adapter.delta_weight().items():
                    getattr(inner, proj).add_(delta.to(getattr(inner, proj).dtype))
        ref.set_submodule(name, inner)
    return _logits(ref, ids)


@pytest.mark.parametrize(
    ("arch", "impl"), [(a, "grouped_mm") for a in ARCHS] + [("gpt_oss", "batched_mm")]
)
def test_forward_equals_per_expert_merged_weights(arch, impl):
    model = MOE_MODELS[arch]()
    model.set_experts_implementation(impl)
    ids = _ids()
    base = _logits(model, ids)
    cfg = {"*experts": {"rank": 3, "scale": 0.5, "lora_b_init": RANDOM_B}}
    qpeft.update_model(model, {"adapter_cfg": cfg})
    qpeft.update_model(
        model,
        {
            "adapter_name": "second",
            "adapter_cfg": {"*experts": {"rank": 8, "lora_b_init": RANDOM_B}},
        },
    )
    out = _logits(model, ids)
    assert not torch.allclose(out, base, atol=1e-3)
    torch.testing.assert_close(out, _merged_reference(model, ids), atol=FP32_ATOL, rtol=FP32_RTOL)


@pytest.mark.parametrize("arch", ARCHS)
def test_adapter_gradients_match_merged_weight_autograd(arch):
    model = MOE_MODELS[arch]()
    qpeft.update_model(
        model, {"adapter_cfg": {"*experts": {"rank": 4, "scale": 2.0, "lora_b_init": RANDOM_B}}}
    )
    layer = next(iter(_experts(model).values()))
    inner, adapter = innermost(layer), layer.adapters["default"]
    torch.manual_seed(3)
    with torch.no_grad():  # deltas the size of the weights keep fp32 rounding at its usual level
        for f in adapter.factors.values():
            f.lora_b.normal_(0, 0.05)
    hidden = torch.randn(10, inner.down_proj.shape[2 if inner.is_transposed else 1])
    idx = torch.stack([torch.randperm(inner.down_proj.shape[0])[:2] for _ in range(10)])
    weights = torch.rand(10, 2)
    layer(hidden, idx, weights).square().sum().backward()
    params = {n: getattr(inner, n) + d for n, d in _differentiable_deltas(adapter).items()}
    ref = torch.func.functional_call(inner, params, (hidden, idx, weights))
    grads = torch.autograd.grad(
        ref.square().sum(), [p for f in adapter.factors.values() for p in f.parameters()]
    )
    for got, want in zip(
        [p.grad for f in adapter.factors.values() for p in f.parameters()], grads, strict=True
    ):
        torch.testing.assert_close(got, want, atol=FP32_ATOL, rtol=FP32_RTOL)


def _differentiable_deltas(adapter):
    out = {}
    for name, f in adapter.factors.items():
        delta = torch.bmm(f.lora_b, f.lora_a) * adapter.scale
        out[name] = delta.transpose(-2, -1) if f.transposed else delta
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_training_the_expert_adapters_lowers_the_loss(arch):
    model = MOE_MODELS[arch]()
    qpeft.update_model(model, {"adapter_cfg": {"*experts": {"rank": 4}}})
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".experts.adapters." in n for n in trainable)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = _ids()
    losses = []
    for _ in range(6):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_delete_and_base_checkpoint():
    model = MOE_MODELS["gpt_oss"]()
    base_sd = copy.deepcopy(model.state_dict())
    ids = _ids()
    ref = _logits(model, ids)
    qpeft.update_model(model, {"adapter_cfg": {"*experts": {"rank": 4, "lora_b_init": RANDOM_B}}})
    assert not torch.equal(_logits(model, ids), ref)
    missing, unexpected = model.load_state_dict(base_sd, strict=False)
    assert not unexpected and missing and all(".adapters." in k for k in missing)
    qpeft.delete_adapter(model, "default")
    assert torch.equal(_logits(model, ids), ref)


def test_mode_log_replays_onto_a_fresh_model():
    model = MOE_MODELS["mixtral"]()
    qpeft.update_model(
        model, {"adapter_cfg": {"*": {"rank": 2}, "*layers.0.mlp.experts": {"rank": 6}}}
    )
    fresh = replay(MOE_MODELS["mixtral"](), qpeft.state(model))
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {
        k: v.shape for k, v in model.state_dict().items()
    }


def test_updating_an_experts_adapter_keeps_weights_and_rejects_rank_change():
    model = MOE_MODELS["qwen3_moe"]()
    qpeft.update_model(model, {"adapter_cfg": {"*experts": {"rank": 4, "lora_b_init": RANDOM_B}}})
    layer = next(iter(_experts(model).values()))
    before = copy.deepcopy(layer.adapters["default"].state_dict())
    qpeft.update_model(model, {"adapter_cfg": {"*experts": {"scale": 3.0}}})
    assert layer.adapters["default"].scale == 3.0
    for k, v in layer.adapters["default"].state_dict().items():
        assert torch.equal(v, before[k])
    with pytest.raises(ValueError, match="cannot change rank"):
        qpeft.update_model(model, {"adapter_cfg": {"*experts": {"rank": 8}}})
    with pytest.raises(ValueError, match="lora_dtype"):
        qpeft.update_model(model, {"adapter_cfg": {"*experts": {"lora_dtype": "bf16"}}})


def test_kaiming_init_is_per_expert():
    model = MOE_MODELS["qwen3_moe"]()
    qpeft.update_model(model, {"adapter_cfg": {"*experts": {"rank": 4}}})
    factors = next(iter(_experts(model).values())).adapters["default"].factors["gate_up_proj"]
    bound = 1 / factors.lora_a.shape[-1] ** 0.5  # kaiming_uniform(a=sqrt(5)) on one [r, in] slice
    assert factors.lora_a.abs().max() <= bound
    assert factors.lora_a.abs().max() > bound / 2
    assert not torch.equal(factors.lora_a[0], factors.lora_a[1])
    assert torch.count_nonzero(factors.lora_b) == 0


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss"])
def test_bf16_model_and_bf16_adapters(arch):
    model = MOE_MODELS[arch]().to(torch.bfloat16)
    ids = _ids()
    ref = _logits(model, ids)
    qpeft.update_model(model, {"adapter_cfg": {"*experts": {"rank": 3}}})
    assert torch.equal(_logits(model, ids), ref)
    fp32 = MOE_MODELS[arch]()
    qpeft.update_model(
        fp32,
        {"adapter_cfg": {"*experts": {"rank": 4, "lora_dtype": "bf16", "lora_b_init": RANDOM_B}}},
    )
    out = _logits(fp32, ids)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, _merged_reference(fp32, ids), atol=BF16_ATOL, rtol=BF16_RTOL)


def _quantize_experts(model):
    """int4 weight quantizers over each whole [E, ...] weight, one amax per expert (axis 0)."""
    for layer in _experts(model).values():
        inner = innermost(layer)
        for name in ("gate_up_proj", "down_proj"):
            quantizer = TensorQuantizer("int", 4, axis=0)
            with quantizer.calibrating():
                quantizer(getattr(inner, name).detach())
            assert quantizer.amax.shape == (inner.down_proj.shape[0], 1, 1)
            inner.add_module(f"{name}_weight_quantizer", quantizer)


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])
def test_svdquant_seeds_every_expert_from_its_own_residual(arch):
    model = MOE_MODELS[arch]()
    ids = _ids()
    full = _logits(model, ids)
    _quantize_experts(model)
    qpeft.update_model(
        model,
        {"adapter_cfg": {"*experts": {"rank": 12, "scale": 2.0, "lora_init_method": "svdquant"}}},
    )
    with qpeft.disabled_adapters(model):
        quant_only = _logits(model, ids)
    seeded = _logits(model, ids)
    assert (seeded - full).abs().mean() < 0.8 * (quant_only - full).abs().mean()
    layer = next(iter(_experts(model).values()))
    inner = innermost(layer)
    for name, delta in layer.adapters["default"].delta_weight().items():
        weight = getattr(inner, name).detach()
        residual = weight - getattr(inner, f"{name}_weight_quantizer")(weight)
        if inner.is_transposed:
            residual, delta = residual.transpose(-2, -1), delta.transpose(-2, -1)
        s = torch.linalg.svdvals(residual)
        optimum = s[:, 12:].square().sum(-1).sqrt()
        err = torch.linalg.matrix_norm(residual - delta)
        assert (err <= optimum * SVD_OPTIMALITY_RATIO + 1e-6).all()


def test_svdquant_without_quantizer_warns_and_keeps_output():
    model = MOE_MODELS["qwen3_moe"]()
    ids = _ids()
    ref = _logits(model, ids)
    with pytest.warns(UserWarning, match="no enabled weight quantizer"):
        qpeft.update_model(
            model, {"adapter_cfg": {"*experts": {"rank": 2, "lora_init_method": "svdquant"}}}
        )
    assert torch.equal(_logits(model, ids), ref)


def test_adapter_files_and_the_hf_peft_refusal(tmp_path):
    model = MOE_MODELS["qwen3_moe"]()
    qpeft.update_model(model, {"adapter_cfg": {"*": {"rank": 4, "lora_b_init": RANDOM_B}}})
    ids = _ids()
    ref = _logits(model, ids)
    qpeft.save_adapters(model, tmp_path / "adapters")
    fresh = MOE_MODELS["qwen3_moe"]()
    qpeft.load_adapters(fresh, tmp_path / "adapters")
    assert torch.equal(_logits(fresh, ids), ref)
    with pytest.raises(ValueError, match="grouped-experts"):
        qpeft.export_hf_peft(model, tmp_path / "hf")


def test_per_sample_adapter_routing_is_refused_clearly():
    model = MOE_MODELS["qwen3_moe"]()
    qpeft.update_model(model, {"adapter_cfg": {"*": {"rank": 2}}})
    with (
        pytest.raises(ValueError, match="does not support per-sample adapters"),
        qpeft.adapter_routing(model, ["default", None]),
    ):
        pass


def test_a_later_adapter_keeps_earlier_experts_adapters_trainable():
    # freeze_base_model freezes every non-adapter parameter: experts adapters are adapters too
    model = MOE_MODELS["qwen3_moe"]()
    qpeft.update_model(model, {"adapter_name": "a", "adapter_cfg": {"*experts": {"rank": 2}}})
    qpeft.update_model(model, {"adapter_name": "b", "adapter_cfg": {"*experts": {"rank": 2}}})
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    for adapter in ("a", "b"):
        keys = [n for n in dict(model.named_parameters()) if f".adapters.{adapter}." in n]
        assert keys and set(keys) <= trainable, adapter
