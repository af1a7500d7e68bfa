"""``qpeft recover --model DIR`` end to end on tiny causal LMs: Llama, Qwen3-MoE, GPT-2.

Each run goes through ``qpeft.cli.main`` on a directory built offline
(:mod:`tests.recover.tiny_lm`); ``run_recipe`` is wrapped (not replaced) so the run's own student
can be compared with the checkpoint restored on a freshly loaded base.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import qpeft
import qpeft.recover.pipeline as pipeline
from qpeft.cli import main
from qpeft.quant.layer import QuantModule
from qpeft.recover.blockwise import find_blocks
from qpeft.recover.report import STAGES
from tests.recover.tiny_lm import ARCHS, build_tiny_causal_lm, write_corpus

ARGS = [
    *("--rank", "4", "--train-texts", "16", "--valid-texts", "4", "--eval-texts", "8"),
    *("--batch-size", "8", "--block-epochs", "1", "--epochs", "1", "--no-progress"),
]
# decoder-layer submodules that each recipe quantizes and adapts (2 decoder layers)
ADAPTED = {
    "llama": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
    + ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"],
    "qwen3_moe": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
    + ["mlp.experts"],
    "gpt2": ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"],
}
BLOCKS = {"llama": "model.layers", "qwen3_moe": "model.layers", "gpt2": "transformer.h"}
IDS = torch.tensor([[2, 5, 6, 7, 8, 9, 10], [2, 11, 12, 13, 14, 15, 16]])


@pytest.fixture(scope="module", params=ARCHS)
def recovered(request, tmp_path_factory):
    """``(arch, model dir, output dir, the run's RecoverRun)`` of one tiny run per architecture."""
    arch = request.param
    root = tmp_path_factory.mktemp(arch)
    # initializer_range 0.1: peaked logits, so nvfp4 moves the KL measurably (~1e-2)
    model = build_tiny_causal_lm(root / "lm", arch=arch, init_range=0.1)
    corpus, out = write_corpus(root / "corpus.txt"), root / "run"
    runs = []
    real = pipeline.run_recipe

    def keep(*args, **kwargs):
        runs.append(real(*args, **kwargs))
        return runs[-1]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipeline, "run_recipe", keep)
        argv = ["recover", "--model", str(model), "--data", str(corpus), "--output", str(out)]
        assert main([*argv, *ARGS]) == 0
    return arch, model, out, runs[0]


def _report(out):
    return json.loads((out / "report.json").read_text())


def test_every_stage_reports_finite_perplexity_and_kl(recovered):
    _arch, _model, out, _run = recovered
    report = _report(out)
    assert report["kind"] == "causal" and report["headline"] == ["perplexity", "kl"]
    assert list(report["stages"]) == list(STAGES)
    for stage, metrics in report["stages"].items():
        assert set(metrics) == {"perplexity", "kl"}, stage
        assert all(math.isfinite(v) for v in metrics.values()), stage
        assert metrics["perplexity"] > 1 and metrics["kl"] >= 0, stage
    stages = report["stages"]
    assert stages["original"]["kl"] < 1e-6  # the student is the teacher before quantization
    assert stages["quantized"]["kl"] > 1e-3
    assert stages["recovered"]["kl"] < stages["quantized"]["kl"]
    summary = (out / "summary.txt").read_text()
    assert "perplexity" in summary and "after recovery" in summary


def test_the_recipe_quantizes_and_adapts_the_decoder_layers(recovered):
    arch, _model, out, run = recovered
    expected = [f"{BLOCKS[arch]}.{i}.{name}" for i in range(2) for name in ADAPTED[arch]]
    report = _report(out)
    assert sorted(report["layer_error"]["quantized"]) == sorted(expected)
    assert sorted(qpeft.lora_layers(run.student)) == sorted(expected)
    for name in expected:
        quantized = run.student.get_submodule(name).base
        assert isinstance(quantized, QuantModule), name
        quantizers = [q for n, q in quantized.named_children() if n.endswith("weight_quantizer")]
        assert quantizers and all(q.is_enabled for q in quantizers), name
    assert find_blocks(run.student)[0] == BLOCKS[arch]
    assert len(report["block_error"]["after"]) == 2


@pytest.mark.parametrize("recovered", ["qwen3_moe"], indirect=True)
def test_qwen3_moe_experts_are_quantized_per_expert_and_carry_adapters(recovered):
    _arch, _model, out, run = recovered
    for i in range(2):
        experts = run.student.get_submodule(f"model.layers.{i}.mlp.experts")
        assert isinstance(experts, qpeft.LoRAExperts)
        adapter = experts.adapters["default"]
        assert set(adapter.factors) == {"gate_up_proj", "down_proj"}
        assert adapter.gate_up_proj.lora_a.shape == (4, 4, 64)  # [E, r, hidden]
        assert experts.gate_up_proj_weight_quantizer.amax.shape[0] == 4  # one scale per expert
        assert (
            float(adapter.down_proj.lora_b.detach().abs().sum()) > 0
        )  # svdquant seeded, then trained
    layer_error = _report(out)["layer_error"]
    for name, before in layer_error["quantized"].items():
        assert 0 < layer_error["init"][name] < before, name  # the experts' error too


def test_the_checkpoint_restores_the_runs_student(recovered):
    _arch, model, out, run = recovered
    restored = qpeft.restore(AutoModelForCausalLM.from_pretrained(model), out / "checkpoint")
    base = AutoModelForCausalLM.from_pretrained(model)
    with torch.no_grad():
        want = run.student(input_ids=IDS).logits
        assert torch.equal(restored(input_ids=IDS).logits, want)
        assert not torch.allclose(base(input_ids=IDS).logits, want)


def test_hf_peft_files_hold_what_they_can_and_the_summary_says_what_not(recovered):
    arch, _model, out, run = recovered
    report, summary = _report(out), (out / "summary.txt").read_text()
    hf_keys = load_file(out / "hf_adapter" / "adapter_model.safetensors")
    exported = {k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for k in hf_keys}
    saved_keys = load_file(out / "checkpoint" / "model.safetensors")
    saved = {k.split(".adapters.")[0] for k in saved_keys if ".adapters.default." in k}
    assert saved == set(qpeft.lora_layers(run.student))  # the checkpoint holds every adapter
    config = json.loads((out / "hf_adapter" / "adapter_config.json").read_text())
    if arch != "qwen3_moe":
        assert exported == saved and report["hf_adapter_left_out"] == {}
        assert "HF PEFT" not in summary
        assert config["fan_in_fan_out"] is (arch == "gpt2")  # Conv1D stores [in, out]
        return
    experts = ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    assert exported == saved - set(experts)
    left = report["hf_adapter_left_out"]
    assert left == {
        "kind": "grouped experts",
        "layers": experts,
        "written": True,
        "held_in": "checkpoint",
    }
    assert "not in the HF PEFT files" in summary and "2 grouped experts layers" in summary
    assert experts[0] in summary and "checkpoint/ holds every adapter" in summary
    assert "experts" not in json.dumps(config)
