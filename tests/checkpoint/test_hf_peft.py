"""HF PEFT LoRA files both ways, checked against the real ``peft`` package."""

import copy
import json
import re
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import qpeft
from qpeft import update_model
from tests.models import tiny_gpt2, tiny_llama
from tests.tolerances import FP32_ATOL, FP32_RTOL

peft = pytest.importorskip("peft")

IDS = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(5))
# per architecture: every targeted layer, one layer with another rank, one with another scale
CASES = {
    "gpt2": (tiny_gpt2, "*.h.*", "transformer.h.1.attn.c_attn", "*mlp.c_fc*", ["c_attn", "c_fc"]),
    "llama": (
        tiny_llama,
        "*.layers.*",
        "model.layers.1.self_attn.q_proj",
        "*mlp*",
        ["q_proj", "v_proj", "down_proj"],
    ),
}


def _quiet(fn, *args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # HF PEFT warns about fan_in_fan_out on GPT-2
        return fn(*args, **kw)


def _randomize(model, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in qpeft.lora_layers(model).values():
            for p in layer.adapters.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("arch", sorted(CASES))
def test_export_loads_in_peft_with_the_same_outputs(tmp_path, arch):
    build, everything, odd_rank, odd_scale, _ = CASES[arch]
    model = build()
    update_model(
        model,
        {
            "adapter_cfg": {
                everything: {"rank": 4, "scale": 0.5},
                odd_rank: {"rank": 2},
                odd_scale: {"scale": 3.0},
            }
        },
    )
    update_model(model, {"adapter_name": "other", "adapter_cfg": {everything: {"rank": 2}}})
    _randomize(model)
    qpeft.disable_adapters(model, adapters_to_disable="other")
    qpeft.export_hf_peft(model, tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 4, 2)
    assert config["fan_in_fan_out"] == (arch == "gpt2")  # GPT-2's Conv1D stores weights [in, out]
    assert all("." not in t for t in config["target_modules"])  # every block adapted: short names
    assert config["rank_pattern"] == {
        odd_rank: 2
    }  # alpha = scale * rank: 0.5 * 2 there, 3 * 4 on the MLP
    assert config["alpha_pattern"].pop(odd_rank) == 1 and set(config["alpha_pattern"].values()) == {
        12
    }
    keys = load_file(tmp_path / "hf" / "adapter_model.safetensors")
    a_key = f"base_model.model.{odd_rank}.lora_A.weight"
    assert keys[a_key].shape[0] == 2 and torch.equal(
        keys[a_key], model.get_submodule(odd_rank).adapters["default"].lora_a
    )
    loaded = _quiet(peft.PeftModel.from_pretrained, build(), tmp_path / "hf").eval()
    torch.testing.assert_close(_logits(loaded), _logits(model), atol=FP32_ATOL, rtol=FP32_RTOL)


@pytest.mark.parametrize("arch", sorted(CASES))
@pytest.mark.parametrize("rslora", [False, True])
def test_import_of_a_peft_adapter_gives_the_same_outputs(tmp_path, arch, rslora):
    build, _, odd_rank, _, targets = CASES[arch]
    cfg = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=targets,
        rank_pattern={odd_rank: 2},
        alpha_pattern={targets[-1]: 3},
        use_rslora=rslora,
        init_lora_weights=False,
    )
    hf_model = _quiet(peft.get_peft_model, build(), cfg).eval()
    hf_model.save_pretrained(tmp_path / "hf")
    model = qpeft.import_hf_peft(build(), tmp_path / "hf", adapter_name="task")
    layer = model.get_submodule(odd_rank).adapters["task"]
    assert layer.rank == 2 and layer.scale == pytest.approx(8 / (2**0.5 if rslora else 2))
    torch.testing.assert_close(_logits(model), _logits(hf_model), atol=FP32_ATOL, rtol=FP32_RTOL)
    assert qpeft.state(model)[-1]["mode"] == "peft"


def test_round_trip_qpeft_hf_qpeft_keeps_factors_and_scales(tmp_path):
    model = tiny_llama()
    update_model(
        model, {"adapter_cfg": {"*layers*": {"rank": 3, "scale": 0.7}, "*q_proj*": {"rank": 5}}}
    )
    _randomize(model)
    qpeft.export_hf_peft(model, tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "adapter_config.json").read_text())
    assert config["target_modules"] == [
        "down_proj",
        "gate_proj",
        "k_proj",
        "o_proj",
        "q_proj",
        "up_proj",
        "v_proj",
    ]
    back = qpeft.import_hf_peft(tiny_llama(), tmp_path / "hf")
    for name, layer in qpeft.lora_layers(model).items():
        a, b = layer.adapters["default"], back.get_submodule(name).adapters["default"]
        assert torch.equal(a.lora_a, b.lora_a) and torch.equal(a.lora_b, b.lora_b)
        assert b.scale == pytest.approx(a.scale)
    torch.testing.assert_close(_logits(back), _logits(model), atol=FP32_ATOL, rtol=FP32_RTOL)


def test_partial_targets_use_full_names(tmp_path):
    model = tiny_llama()
    update_model(
        model,
        {
            "adapter_cfg": {
                "*layers.0.self_attn.q_proj": {"rank": 2},
                "*layers.*.mlp.up_proj": {"rank": 2},
            }
        },
    )
    _randomize(model)
    qpeft.export_hf_peft(model, tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "adapter_config.json").read_text())
    assert config["target_modules"] == [  # "q_proj" alone would also pick layer 1's
        "model.layers.0.mlp.up_proj",
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.mlp.up_proj",
    ]
    loaded = _quiet(peft.PeftModel.from_pretrained, tiny_llama(), tmp_path / "hf").eval()
    torch.testing.assert_close(_logits(loaded), _logits(model), atol=FP32_ATOL, rtol=FP32_RTOL)


def _peft_dir(tmp_path, **kw):
    hf_model = _quiet(
        peft.get_peft_model, tiny_llama(), peft.LoraConfig(r=2, target_modules=["q_proj"], **kw)
    )
    hf_model.save_pretrained(tmp_path / "hf")
    return tmp_path / "hf"


def _untouched(model):
    ref, log = copy.deepcopy(model.state_dict()), qpeft.state(model)
    return lambda: (
        not qpeft.is_peft_model(model)
        and qpeft.state(model) == log
        and all(torch.equal(v, ref[k]) for k, v in model.state_dict().items())
    )


def test_dora_is_a_clear_error(tmp_path):
    path = _peft_dir(tmp_path, use_dora=True)
    model = tiny_llama()
    unchanged = _untouched(model)
    with pytest.raises(ValueError, match=r"DoRA \(use_dora=True\) is not supported"):
        qpeft.import_hf_peft(model, path)
    assert unchanged()


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("lora_bias", True, "LoRA bias"),
        ("modules_to_save", ["lm_head"], "modules_to_save"),
        ("bias", "all", "bias='all'"),
        ("peft_type", "LOHA", "peft_type 'LOHA'"),
        ("alora_invocation_tokens", [1, 2], "activated LoRA"),
    ],
)
def test_other_variants_are_clear_errors(tmp_path, field, value, words):
    path = _peft_dir(tmp_path)
    config = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**config, field: value}))
    model = tiny_llama()
    unchanged = _untouched(model)
    with pytest.raises(ValueError, match=re.escape(words)):
        qpeft.import_hf_peft(model, path)
    assert unchanged()


def test_unknown_keys_missing_modules_and_bad_ranks_are_refused(tmp_path):
    path = _peft_dir(tmp_path)
    weights = load_file(path / "adapter_model.safetensors")
    model = tiny_llama()
    unchanged = _untouched(model)

    extra = {
        **weights,
        "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector": torch.ones(32),
    }
    save_file(extra, path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="lora_magnitude_vector.*not a plain LoRA factor"):
        qpeft.import_hf_peft(model, path)

    renamed = {k.replace("layers.0", "layers.9"): v for k, v in weights.items()}
    save_file(renamed, path / "adapter_model.safetensors")
    with pytest.raises(
        ValueError,
        match=r"module 'model\.layers\.9\.self_attn\.q_proj' is not a LoRA-capable layer",
    ):
        qpeft.import_hf_peft(model, path)

    save_file(weights, path / "adapter_model.safetensors")
    config = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**config, "r": 3}))
    with pytest.raises(ValueError, match="has rank 2 in its factors, the config says 3"):
        qpeft.import_hf_peft(model, path)

    (path / "adapter_config.json").write_text(json.dumps(config))
    torch.save(weights, path / "adapter_model.safetensors")  # a pickle in disguise
    with pytest.raises(ValueError, match="not a safetensors file"):
        qpeft.import_hf_peft(model, path)
    (path / "adapter_model.safetensors").rename(path / "adapter_model.bin")  # a pickle, as named
    with pytest.raises(ValueError, match="adapter_model.bin, a pickle"):
        qpeft.import_hf_peft(model, path)
    assert unchanged()


def test_export_needs_an_enabled_adapter(tmp_path):
    model = tiny_llama()
    update_model(model, {"adapter_cfg": {"*q_proj*": {"rank": 2}}})
    with pytest.raises(ValueError, match="no enabled adapter named 'nope'"):
        qpeft.export_hf_peft(model, tmp_path / "hf", adapter_name="nope")
    assert not (tmp_path / "hf").exists()


def test_skip_grouped_writes_every_other_layer_and_names_the_experts(tmp_path):
    from tests.models import tiny_qwen3_moe

    model = tiny_qwen3_moe()
    update_model(model, {"adapter_cfg": {"*layers*": {"rank": 4}}})
    experts = ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    assert qpeft.grouped_experts_layers(model) == experts
    with pytest.raises(ValueError, match="grouped-experts layer 'model.layers.0.mlp.experts'"):
        qpeft.export_hf_peft(model, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    assert qpeft.export_hf_peft(model, tmp_path / "hf", skip_grouped=True) == experts
    tensors = load_file(tmp_path / "hf" / "adapter_model.safetensors")
    written = {k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for k in tensors}
    assert written == set(qpeft.lora_layers(model)) - set(experts)
    assert len(written) == 8  # q/k/v/o of 2 layers
    config = json.loads((tmp_path / "hf" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]


def test_skip_grouped_with_adapters_on_experts_only_is_an_error(tmp_path):
    from tests.models import tiny_qwen3_moe

    model = tiny_qwen3_moe()
    update_model(model, {"adapter_cfg": {"*experts": {"rank": 4}}})
    with pytest.raises(ValueError, match="on no other layer"):
        qpeft.export_hf_peft(model, tmp_path / "hf", skip_grouped=True)
    assert not (tmp_path / "hf").exists()
