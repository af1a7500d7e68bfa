"""``torchrun --nproc-per-node 2 -m qpeft recover``: two gloo ranks give the one-process run
(Llama, Qwen3-MoE, GPT-2)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.recover.tiny_lm import build_tiny_causal_lm, write_corpus
from tests.tolerances import DIST_RECOVER_ADAPTER_RTOL, DIST_RECOVER_METRIC_TOL

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 240
# int8 calibrates input amaxes (they must equal the one-process ones); batches of 5 texts leave a
# last batch of one text, so one rank's share is only a padding row.
ARGS = [
    "--format",
    "int8",
    "--rank",
    "4",
    "--train-texts",
    "16",
    "--valid-texts",
    "8",
    "--eval-texts",
    "8",
    "--batch-size",
    "5",
    "--max-length",
    "16",
    "--block-epochs",
    "1",
    "--epochs",
    "1",
    "--no-progress",
]


def _one_process(root: Path, arch: str, **build) -> Path:
    """``root`` with a tiny ``arch`` model (``lm``), a corpus and the one-process run (``one``).

    The run is a process of its own with the ranks' environment (one intra-op thread): GPT-2's
    recovered metrics move by ~3e-3 between one and two threads, more than the ranks' tolerance.
    """
    build_tiny_causal_lm(root / "lm", arch=arch, **build)
    write_corpus(root / "corpus.txt")
    argv = ["recover", "--model", "lm", "--data", "corpus.txt", *ARGS, "--output", "one"]
    done = subprocess.run(
        [sys.executable, "-m", "qpeft", *argv],
        cwd=root,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return root


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A folder with a tiny Llama (``lm``), a corpus and the one-process run's output (``one``)."""
    return _one_process(tmp_path_factory.mktemp("dist"), "llama")


@pytest.fixture(scope="module")
def references(tmp_path_factory, work):
    """``arch -> folder`` of :func:`_one_process`, each architecture built (and run) once."""
    # initializer_range 0.1 (peaked logits): quantization moves the metrics measurably
    made = {"llama": work}

    def get(arch: str) -> Path:
        if arch not in made:
            made[arch] = _one_process(tmp_path_factory.mktemp(arch), arch, init_range=0.1)
        return made[arch]

    return get


def _command(work: Path, *args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "qpeft",
        "recover",
        "--model",
        str(work / "lm"),
        "--data",
        str(work / "corpus.txt"),
        *args,
    ]


def _env() -> dict[str, str]:
    path = os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _torchrun(work: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    cwd.mkdir()
    return subprocess.run(
        _command(work, *args),
        cwd=cwd,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= DIST_RECOVER_METRIC_TOL * max(1.0, abs(a))


def _files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*")}


def _same_report(one: Path, two: Path, mode: str) -> None:
    a, b = (json.loads((d / "report.json").read_text()) for d in (one, two))
    assert b["options"]["parallel"] == mode and b["world_size"] == 2
    assert a["counts"] == b["counts"]
    for stage, metrics in a["stages"].items():
        for name, value in metrics.items():
            assert _close(value, b["stages"][stage][name]), (stage, name)
    for when in ("before", "after"):
        assert all(map(_close, a["block_error"][when], b["block_error"][when]))
    assert len(a["block_losses"]) == len(b["block_losses"])
    assert [s for s, _ in a["valid_losses"]] == [s for s, _ in b["valid_losses"]]
    assert a["hf_adapter_left_out"] == b["hf_adapter_left_out"]


def _same_checkpoint(one: Path, two: Path) -> None:
    ta, tb = (load_file(d / "checkpoint" / "model.safetensors") for d in (one, two))
    assert ta.keys() == tb.keys()
    adapters = [k for k in ta if ".lora_" in k]
    assert adapters
    for key in adapters:
        err = (ta[key] - tb[key]).norm() / ta[key].norm()
        assert err <= DIST_RECOVER_ADAPTER_RTOL, key
    for key in set(ta) - set(adapters):  # base weights and calibrated amaxes: equal
        assert torch.equal(ta[key], tb[key]), key
    manifests = [json.loads((d / "checkpoint" / "qpeft.json").read_text()) for d in (one, two)]
    assert manifests[0] == manifests[1]


def _same_hf_adapter(one: Path, two: Path) -> None:
    configs = [
        json.loads((d / "hf_adapter" / "adapter_config.json").read_text()) for d in (one, two)
    ]
    assert configs[0] == configs[1]
    hf = [load_file(d / "hf_adapter" / "adapter_model.safetensors") for d in (one, two)]
    assert hf[0].keys() == hf[1].keys() and hf[0]
    assert all(torch.allclose(hf[0][k], hf[1][k], rtol=1e-2, atol=1e-6) for k in hf[0])


def _deploy_lines(run: Path) -> list[str]:
    return [t for t in (run / "summary.txt").read_text().splitlines() if t.startswith("deploy/")]


def _same_deploy(one: Path, two: Path) -> None:
    """``deploy/`` of the ranks against one process's: the frozen base with its bit-equal amaxes
    packs to the same bytes (``model.safetensors`` is byte-identical), the adapters agree within
    the ranks' tolerance, and transformers reads both to the same weights."""
    a, b = (json.loads((d / "report.json").read_text())["deploy"] for d in (one, two))
    assert b["written"] and {k: v for k, v in a.items() if k != "warnings"} == {
        k: v for k, v in b.items() if k != "warnings"
    }
    for name in ("model.safetensors", "tokenizer.json"):
        assert (one / "deploy" / name).read_bytes() == (two / "deploy" / name).read_bytes(), name
    configs = [json.loads((d / "deploy" / "config.json").read_text()) for d in (one, two)]
    for config in configs:  # the --model path as given: relative in one process, not on ranks
        config.pop("_name_or_path")
    assert configs[0] == configs[1]
    adapters = [d / "deploy" / "adapters" / "default" for d in (one, two)]
    configs = [json.loads((d / "adapter_config.json").read_text()) for d in adapters]
    assert configs[0] == configs[1]
    ta, tb = (load_file(d / "adapter_model.safetensors") for d in adapters)
    assert ta.keys() == tb.keys() and ta
    for key in ta:
        assert (ta[key] - tb[key]).norm() <= DIST_RECOVER_ADAPTER_RTOL * ta[key].norm(), key
    served = [_served_weights(d / "deploy") for d in (one, two)]
    assert served[0].keys() == served[1].keys()
    assert all(torch.equal(served[0][k], served[1][k]) for k in served[0])


def _served_weights(deploy: Path) -> dict[str, torch.Tensor]:
    """The weights transformers reads from ``deploy`` (compressed-tensors, dequantized)."""
    import warnings

    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(
            deploy, quantization_config=CompressedTensorsConfig(dequantize=True)
        )
    return model.state_dict()


# Llama and Qwen3-MoE (grouped 3-D experts and their adapters) under both modes; GPT-2 (Conv1D,
# the head tied to the input embedding, blocks under ``transformer.h``) under fsdp2
CASES = [("llama", "fsdp2"), ("llama", "ddp"), ("qwen3_moe", "fsdp2"), ("qwen3_moe", "ddp")]
CASES += [("gpt2", "fsdp2")]


@pytest.mark.parametrize(("arch", "mode"), CASES)
def test_two_ranks_give_the_one_process_run(references, tmp_path, arch, mode):
    work = references(arch)
    flags = [] if mode == "fsdp2" else ["--parallel", mode]  # fsdp2 is torchrun's default
    out = ["--output", str(tmp_path / "out" / "run")]
    done = _torchrun(work, tmp_path / "cwd", *ARGS, *flags, *out)
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = work / "one", tmp_path / "out" / "run"
    assert os.listdir(tmp_path / "cwd") == []  # no rank wrote anything elsewhere
    assert sorted(os.listdir(tmp_path / "out")) == ["run"]
    expected = _files(one)
    assert ("deploy" in expected) is (arch == "llama")  # no compressed-tensors experts, Conv1D
    summary = (two / "summary.txt").read_text()
    assert _files(two) == expected
    lines = [_deploy_lines(d) for d in (one, two)]  # the same deploy/ lines as one process
    assert lines[1] and lines[1] == lines[0]
    if arch == "llama":  # fsdp2: rank 0 exports the restored checkpoint; ddp: its whole student
        _same_deploy(one, two)
    else:  # refused for the same layer as in one process (grouped experts, Conv1D)
        assert lines[1][0].startswith("deploy/ not written: ")
    if arch == "qwen3_moe":  # the grouped experts' adapters: in the checkpoint, not hf_adapter/
        line = next(t for t in summary.splitlines() if "not in the HF PEFT files" in t)
        assert line in (one / "summary.txt").read_text().splitlines()
        assert "model.layers.0.mlp.experts, model.layers.1.mlp.experts" in line
    _same_report(one, two, mode)
    _same_checkpoint(one, two)
    _same_hf_adapter(one, two)


def test_fsdp2_without_torchrun_is_a_one_rank_group(work, tmp_path):
    out = tmp_path / "run"
    command = _command(work, *ARGS, "--parallel", "fsdp2", "--output", str(out))
    done = subprocess.run(  # python -m qpeft recover, no torchrun
        [sys.executable, *command[command.index("-m", 3) :]],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = (json.loads((d / "report.json").read_text()) for d in (work / "one", out))
    assert b["world_size"] == 1 and b["options"]["parallel"] == "fsdp2"
    for stage, metrics in a["stages"].items():
        assert all(_close(v, b["stages"][stage][k]) for k, v in metrics.items()), stage


def test_bad_input_ends_every_rank_with_the_one_line_error(work, tmp_path):
    started = time.monotonic()
    out = ["--output", str(tmp_path / "out")]
    done = _torchrun(work, tmp_path / "cwd", *ARGS, "--rank", "1000", *out)
    assert done.returncode != 0
    assert time.monotonic() - started < TIMEOUT_S
    errors = [line for line in done.stderr.splitlines() if line.startswith("qpeft: error:")]
    assert len(errors) == 2 and all("--rank 1000" in line for line in errors), done.stderr[-3000:]
    assert done.stderr.count("exitcode  : 2") == 2  # torchrun's summary: both ranks exited 2
    assert not (tmp_path / "out").exists()
    assert os.listdir(tmp_path) == ["cwd"] and os.listdir(tmp_path / "cwd") == []


def _rank_pid(parent: int, rank: int) -> int | None:
    """The pid of the worker of ``rank`` among the children of torchrun (Linux ``/proc``)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent and f"RANK={rank}".encode() in env:
            return int(entry.name)
    return None


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux /proc")
def test_a_rank_dying_late_ends_the_run_without_output(work, tmp_path):
    (tmp_path / "cwd").mkdir()
    out = tmp_path / "out" / "run"
    longer = [*ARGS, "--block-epochs", "4", "--epochs", "4"]
    proc = subprocess.Popen(
        _command(work, *longer, "--output", str(out)),
        cwd=tmp_path / "cwd",
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        for line in proc.stdout:  # rank 0 says this once the adapters are attached
            if line.startswith("quantized "):
                break
        pid = _rank_pid(proc.pid, 1)
        assert pid is not None
        started = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        rest = proc.communicate(timeout=TIMEOUT_S)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert time.monotonic() - started < 120, rest[-2000:]
    assert not out.exists()
    assert [p.name for p in (tmp_path / "out").iterdir() if ".tmp-" in p.name] == []
