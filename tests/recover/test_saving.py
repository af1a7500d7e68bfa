"""Saving the recovered student: checkpoint, tokenizer and what HF PEFT files can hold."""

from __future__ import annotations

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

import qpeft
from qpeft.recover.report import summary_table
from qpeft.recover.saving import hf_left_out, save_student
from tests.recover.tiny_lm import build_tiny_causal_lm

EXPERTS = ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    return build_tiny_causal_lm(tmp_path_factory.mktemp("moe") / "lm", arch="qwen3_moe")


def _student(folder, pattern):
    model = AutoModelForCausalLM.from_pretrained(folder)
    qpeft.quantize(model, "int8_weight_only")
    qpeft.update_model(model, {"adapter_cfg": {pattern: {"rank": 2}}})
    return model


def _summary(left):
    run = {
        "headline": ["kl"],
        "stages": {"original": {"kl": 0.0}},
        "seconds": {"original": 0.1},
        "options": {"format": "int8_weight_only", "rank": 2, "init": "svdquant"},
        "counts": {"train": 1, "valid": 1, "eval": 2},
        "sizes": {"adapter_mb": 0.1, "model_mb": 1.0},
        "hf_adapter_left_out": left,
    }
    return summary_table(run)


def test_adapters_on_experts_only_write_no_hf_adapter_and_say_so(moe_dir, tmp_path):
    student = _student(moe_dir, "*experts")
    files = save_student(student, AutoTokenizer.from_pretrained(moe_dir), tmp_path)
    assert files == {"checkpoint": "checkpoint", "tokenizer": "checkpoint/tokenizer"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]
    left = hf_left_out(student)
    assert left == {
        "kind": "grouped experts",
        "layers": EXPERTS,
        "written": False,
        "held_in": "checkpoint",
    }
    line = _summary(left).splitlines()[-1]
    assert "2 grouped experts layers" in line and "no hf_adapter/ written" in line
    assert "checkpoint/ holds every adapter" in line
    restored = qpeft.restore(AutoModelForCausalLM.from_pretrained(moe_dir), tmp_path / "checkpoint")
    assert sorted(qpeft.lora_layers(restored)) == EXPERTS


def test_a_model_without_experts_adapters_has_nothing_left_out(moe_dir, tmp_path):
    student = _student(moe_dir, "*self_attn*")
    files = save_student(student, AutoTokenizer.from_pretrained(moe_dir), tmp_path)
    assert files["hf_adapter"] == "hf_adapter" and hf_left_out(student) == {}
    assert "HF PEFT" not in _summary({})
