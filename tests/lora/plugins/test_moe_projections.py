"""Projection patterns on grouped experts: ``<experts>.<projection>`` selects the adapted
projections."""

import copy

import pytest
import torch

pytest.importorskip("transformers")

import qpeft  # noqa: E402
from qpeft.core.modes import replay  # noqa: E402
from qpeft.core.wrapping import innermost  # noqa: E402
from tests.lora.plugins.test_moe import _experts, _ids, _logits, _merged_reference  # noqa: E402
from tests.models import MOE_MODELS  # noqa: E402
from tests.tolerances import FP32_ATOL, FP32_RTOL  # noqa: E402

RANDOM_B = "torch.nn.init.normal_"
DOWN_ONLY = {"*mlp.experts.down_proj": {"rank": 3}}


def _projections(model, adapter="default"):
    return {
        n: list(layer.adapters[adapter].factors)
        for n, layer in _experts(model).items()
        if adapter in getattr(layer, "adapters", {})
    }


def _adapter_keys(model):
    return sorted(k for k in model.state_dict() if ".adapters." in k)


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss"])
def test_only_down_proj_has_factors_and_zero_b_is_bit_identical(arch):
    model = MOE_MODELS[arch]()
    ids = _ids()
    ref = _logits(model, ids)
    qpeft.update_model(model, {"adapter_cfg": DOWN_ONLY})
    assert _projections(model) == {n: ["down_proj"] for n in _experts(model)}
    keys = _adapter_keys(model)
    assert keys and all(k.endswith(("down_proj.lora_a", "down_proj.lora_b")) for k in keys)
    adapter = model.model.layers[0].mlp.experts.adapters["default"]
    assert adapter.rank == 3 and set(adapter.delta_weight()) == {"down_proj"}
    assert "projections=['down_proj']" in repr(adapter)
    assert torch.equal(_logits(model, ids), ref)


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss"])
def test_training_changes_only_the_down_proj_factors(arch):
    model = MOE_MODELS[arch]()
    qpeft.update_model(
        model, {"adapter_cfg": {"*experts.down_proj": {"rank": 3, "lora_b_init": RANDOM_B}}}
    )
    before = copy.deepcopy(model.state_dict())
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(trainable, lr=1e-2)
    ids = _ids()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(".experts.adapters.default.down_proj.lora_" in k for k in changed)
    # the forward adds exactly the down_proj terms: the merged reference agrees
    torch.testing.assert_close(
        _logits(model, ids), _merged_reference(model, ids), atol=FP32_ATOL, rtol=FP32_RTOL
    )


BOTH = ["gate_up_proj", "down_proj"]


@pytest.mark.parametrize(
    ("cfg", "layer0", "layer1"),
    [
        (
            {"*experts": {"rank": 4}, "*experts.gate_up_proj": {"enable": False}},
            ["down_proj"],
            ["down_proj"],
        ),
        (
            {"*experts.gate_up_proj": {"enable": False}, "*experts": {"rank": 4, "enable": True}},
            BOTH,
            BOTH,
        ),
        (
            {"*experts": {"rank": 4, "enable": False}, "*experts.down_proj": {"enable": True}},
            ["down_proj"],
            ["down_proj"],
        ),
        (
            {"*experts.down_proj": {"rank": 4}, "*layers.1.mlp.experts": {"enable": False}},
            ["down_proj"],
            None,
        ),
        # key by key: the later entry sets rank only, so layer 1 stays disabled
        (
            {"*layers.1.mlp.experts": {"enable": False}, "*experts.down_proj": {"rank": 4}},
            ["down_proj"],
            None,
        ),
        (
            {"*layers.1.mlp.experts": {"enable": False}, "*experts.down_proj": {"enable": True}},
            ["down_proj"],
            ["down_proj"],
        ),
        ({"model.layers.0.mlp.experts.gate_up_proj": {"rank": 4}}, ["gate_up_proj"], None),
        (
            {lambda name: name.endswith("experts.gate_up_proj"): {"rank": 4}},
            ["gate_up_proj"],
            ["gate_up_proj"],
        ),
    ],
)
def test_later_entries_override_earlier_ones_whichever_form(cfg, layer0, layer1):
    model = MOE_MODELS["qwen3_moe"]()
    qpeft.update_model(model, {"adapter_cfg": cfg})
    got = _projections(model)
    assert got.get("model.layers.0.mlp.experts") == layer0
    assert got.get("model.layers.1.mlp.experts") == layer1


def test_missing_projection_names_match_nothing():
    model = MOE_MODELS["qwen3_moe"]()
    with pytest.raises(ValueError, match="match none"):
        qpeft.update_model(model, {"adapter_cfg": {"*experts.up_proj": {"rank": 2}}})
    assert not qpeft.is_peft_model(model)
    qpeft.update_model(
        model, {"adapter_cfg": {"*experts.up_proj": {"rank": 2}, "*q_proj": {"rank": 2}}}
    )
    assert not set(_experts(model)) & set(qpeft.lora_layers(model))


def test_differing_attributes_across_projections_are_refused_and_leave_the_model():
    model = MOE_MODELS["qwen3_moe"]()
    qpeft.update_model(model, {"adapter_cfg": {"*q_proj": {"rank": 2}}})
    state, sd = qpeft.state(model), copy.deepcopy(model.state_dict())
    cfg = {
        "adapter_name": "exp",
        "adapter_cfg": {"*experts": {"rank": 4}, "*experts.down_proj": {"rank": 8}},
    }
    with pytest.raises(
        ValueError,
        match=r"'exp'.*'model\.layers\.0\.mlp\.experts'.*'gate_up_proj'.*'down_proj'.*rank",
    ):
        qpeft.update_model(model, cfg)
    assert qpeft.state(model) == state and model.state_dict().keys() == sd.keys()
    assert not set(_experts(model)) & set(qpeft.lora_layers(model))
    with pytest.raises(ValueError, match="different scale"):
        qpeft.update_model(
            model,
            {"adapter_cfg": {"*experts": {"rank": 4}, "*experts.gate_up_proj": {"scale": 2.0}}},
        )


def test_updates_change_scale_and_enable_but_not_the_projections():
    model = MOE_MODELS["gpt_oss"]()
    ids = _ids()
    ref = _logits(model, ids)
    qpeft.update_model(
        model, {"adapter_cfg": {"*experts.down_proj": {"rank": 3, "lora_b_init": RANDOM_B}}}
    )
    with pytest.raises(
        ValueError,
        match=r"'default'.*'model\.layers\.0\.mlp\.experts'.*cannot add projection 'gate_up_proj'",
    ):
        qpeft.update_model(model, {"adapter_cfg": {"*experts": {"enable": True}}})
    qpeft.update_model(
        model, {"adapter_cfg": {"*experts": {"scale": 3.0}}}
    )  # scale only: projections kept
    assert {a.adapters["default"].scale for a in _experts(model).values()} == {3.0}
    assert _projections(model) == {n: ["down_proj"] for n in _experts(model)}
    qpeft.update_model(model, {"adapter_cfg": {"*experts.down_proj": {"scale": 2.0}}})
    assert {a.adapters["default"].scale for a in _experts(model).values()} == {2.0}
    qpeft.update_model(model, {"adapter_cfg": {"*experts.down_proj": {"enable": False}}})
    assert torch.equal(_logits(model, ids), ref)
    qpeft.update_model(
        model,
        {"adapter_cfg": {"*experts": {"enable": True}, "*experts.gate_up_proj": {"enable": False}}},
    )
    assert not torch.equal(_logits(model, ids), ref)
    fresh = replay(MOE_MODELS["gpt_oss"](), qpeft.state(model))
    assert _projections(fresh) == _projections(model)
    assert {a.adapters["default"].scale for a in _experts(fresh).values()} == {2.0}
    both = MOE_MODELS["gpt_oss"]()
    qpeft.update_model(both, {"adapter_cfg": {"*experts": {"rank": 2}}})
    with pytest.raises(ValueError, match="cannot drop projection 'gate_up_proj'"):
        qpeft.update_model(
            both,
            {"adapter_cfg": {"*experts.gate_up_proj": {"enable": False}, "*experts.down_proj": {}}},
        )


def test_save_restore_and_adapter_files_keep_the_subset(tmp_path):
    model = MOE_MODELS["qwen3_moe"]()
    qpeft.update_model(
        model,
        {
            "adapter_cfg": {
                "*proj": {"rank": 4, "lora_b_init": RANDOM_B},
                "*experts.down_proj": {"enable": False},
            }
        },
    )
    assert _projections(model) == {n: ["gate_up_proj"] for n in _experts(model)}
    ids = _ids()
    ref = _logits(model, ids)
    qpeft.save(model, tmp_path / "ckpt")
    restored = qpeft.restore(MOE_MODELS["qwen3_moe"](), tmp_path / "ckpt")
    assert _adapter_keys(restored) == _adapter_keys(model)
    assert torch.equal(_logits(restored, ids), ref)
    qpeft.save_adapters(model, tmp_path / "adapters")
    fresh = MOE_MODELS["qwen3_moe"]()
    qpeft.load_adapters(fresh, tmp_path / "adapters")
    assert _projections(fresh) == _projections(model)
    assert torch.equal(_logits(fresh, ids), ref)


def test_merge_and_export_fold_only_the_adapted_projection():
    model = MOE_MODELS["gpt_oss"]()
    qpeft.update_model(
        model, {"adapter_cfg": {"*experts.down_proj": {"rank": 4, "lora_b_init": RANDOM_B}}}
    )
    ids = _ids()
    ref = _logits(model, ids)
    weights = {
        n: {p: getattr(innermost(m), p).detach().clone() for p in ("gate_up_proj", "down_proj")}
        for n, m in _experts(model).items()
    }
    qpeft.merge_adapters(model)
    torch.testing.assert_close(_logits(model, ids), ref, atol=FP32_ATOL, rtol=FP32_RTOL)
    qpeft.unmerge_adapters(model)
    qpeft.export(model)
    for name, module in _experts(model).items():
        assert torch.equal(module.gate_up_proj, weights[name]["gate_up_proj"])
        assert not torch.equal(module.down_proj, weights[name]["down_proj"])
    torch.testing.assert_close(_logits(model, ids), ref, atol=FP32_ATOL, rtol=FP32_RTOL)


def test_quantized_experts_with_a_projection_subset():
    model = qpeft.quantize(MOE_MODELS["mixtral"](), "int4")
    ids = _ids()
    ref = _logits(model, ids)
    qpeft.update_model(model, {"adapter_cfg": {"*experts.gate_up_proj": {"rank": 4}}})
    assert torch.equal(_logits(model, ids), ref)
    svd = qpeft.quantize(MOE_MODELS["mixtral"](), "int4")
    qpeft.update_model(
        svd, {"adapter_cfg": {"*experts.gate_up_proj": {"rank": 4, "lora_init_method": "svdquant"}}}
    )
    adapter = svd.model.layers[0].mlp.experts.adapters["default"]
    assert (
        list(adapter.factors) == ["gate_up_proj"]
        and adapter.factors["gate_up_proj"].lora_b.abs().sum() > 0
    )
    assert not torch.equal(_logits(svd, ids), ref)
