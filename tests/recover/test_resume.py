"""``qpeft recover --resume``: a run killed in either phase and resumed ends with the adapters and
report of an uninterrupted run; other options, a missing or damaged state are one-line errors."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import qpeft
import qpeft.recover.pipeline as pipeline
from qpeft.checkpoint.tensor_files import read_tensors
from qpeft.cli import main
from tests.recover.tiny_lm import build_tiny_causal_lm, write_corpus

# 20 batches of 2 texts: 40 block-wise steps per block, 40 end-to-end steps (checks every 10).
OPTIONS = [
    "--rank",
    "4",
    "--train-texts",
    "40",
    "--valid-texts",
    "4",
    "--eval-texts",
    "8",
    "--batch-size",
    "2",
    "--block-epochs",
    "2",
    "--epochs",
    "2",
    "--threads",
    "1",
    "--no-progress",
]
TIMINGS = ("seconds", "sizes", "wall_seconds", "cpu_seconds")  # what differs between two runs


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    return build_tiny_causal_lm(root / "lm"), write_corpus(root / "corpus.txt", copies=12)


def _main(argv: list[str]) -> int:
    """``qpeft ARGV`` in this process, keeping torch's thread count (``--threads 1`` sets it)."""
    threads = torch.get_num_threads()
    try:
        return main(argv)
    finally:
        torch.set_num_threads(threads)


def _argv(tiny, out: Path, *more: str) -> list[str]:
    model, corpus = tiny
    return ["recover", "--model", str(model), "--data", str(corpus), "--output", str(out), *more]


def _state(out: Path) -> Path:
    return out.parent / f".{out.name}.qpeft-resume"


def _interrupt(*_args, **_kwargs):
    raise KeyboardInterrupt


@pytest.fixture(scope="module")
def boundary(tiny, tmp_path_factory):
    """A run interrupted (Ctrl-C) as its end-to-end phase starts: its output path (state saved)."""
    out = tmp_path_factory.mktemp("boundary") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipeline, "distill", _interrupt)
        assert _main(_argv(tiny, out, *OPTIONS)) == 130
    assert not out.exists()
    assert json.loads((_state(out) / "state.json").read_text())["phase"] == "end-to-end"
    return out


def _plant(state_of: Path, out: Path) -> None:
    shutil.copytree(_state(state_of), _state(out))


@pytest.fixture(scope="module")
def reference(tiny, boundary, tmp_path_factory):
    """An uninterrupted run; it starts over another run's state (replaced, then removed)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    _plant(boundary, out)
    assert _main(_argv(tiny, out, *OPTIONS)) == 0
    assert not _state(out).exists()
    return out


def _result(out: Path) -> tuple[dict[str, torch.Tensor], dict]:
    tensors = read_tensors(out / "checkpoint" / "model.safetensors")
    tensors.update(read_tensors(out / "hf_adapter" / "adapter_model.safetensors"))
    report = json.loads((out / "report.json").read_text())
    return tensors, {k: v for k, v in report.items() if k not in TIMINGS}


def _assert_same_run(out: Path, reference: Path) -> None:
    (tensors, report), (want, want_report) = _result(out), _result(reference)
    assert sorted(tensors) == sorted(want)
    assert [k for k in want if not torch.equal(tensors[k], want[k])] == []  # bit-exact
    assert report == want_report
    assert not _state(out).exists()


def _kill_when(argv: list[str], out: Path, sig: int, ready) -> dict:
    """Run ``python -m qpeft argv``, send ``sig`` once its saved state satisfies ``ready``."""
    src = str(Path(qpeft.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    child = subprocess.Popen(
        [sys.executable, "-m", "qpeft", *argv],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    try:
        while child.poll() is None and time.monotonic() < deadline:
            try:
                doc = json.loads((_state(out) / "state.json").read_text())
            except (OSError, ValueError):  # not saved yet, or between the renames of a save
                doc = None
            if doc and ready(doc["phase"], doc["position"] or {}):
                break
            time.sleep(0.01)
        child.send_signal(sig)
    finally:
        child.wait(timeout=120)
    assert child.returncode == -sig, "the run ended before it was killed"
    return json.loads((_state(out) / "state.json").read_text())


def test_a_run_killed_in_each_phase_resumes_to_the_uninterrupted_result(tiny, reference, tmp_path):
    out = tmp_path / "run"
    argv = _argv(tiny, out, *OPTIONS, "--save-every", "1")
    doc = _kill_when(
        argv, out, signal.SIGKILL, lambda phase, at: phase == "blockwise" and at.get("block") == 1
    )
    assert doc["phase"] == "blockwise" and doc["position"]["block"] == 1  # inside the 2nd block
    assert not out.exists()

    doc = _kill_when(
        [*argv, "--resume"],
        out,
        signal.SIGTERM,
        lambda phase, at: phase == "end-to-end" and at.get("step", 0) > 10,
    )
    assert doc["phase"] == "end-to-end" and 10 < doc["position"]["step"] < 40
    assert len(doc["run"]["block_losses"]) == 80 and doc["run"]["stages"]["blockwise"]
    assert not out.exists()

    assert _main([*argv, "--resume"]) == 0
    _assert_same_run(out, reference)


def test_a_run_interrupted_by_ctrl_c_keeps_its_state_and_resumes(
    capsys, tiny, boundary, reference, tmp_path
):
    out = tmp_path / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipeline, "distill", _interrupt)
        assert _main(_argv(tiny, out, *OPTIONS)) == 130
    err = capsys.readouterr().err
    assert f"saved in {_state(out)}; --resume continues it" in err and "no output written" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == [_state(out).name]

    assert _main(_argv(tiny, out, *OPTIONS, "--resume")) == 0
    assert "resuming from the end-to-end phase at its start" in capsys.readouterr().out
    _assert_same_run(out, reference)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _one_line_error(capsys, argv: list[str]) -> str:
    assert _main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qpeft: error: "), captured.err
    return lines[0]


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (["--rank", "8"], "--rank"),
        (["--seed", "1"], "--seed"),
        (["--epochs", "3"], "--epochs"),
        (["--lr", "0.001"], "--lr"),
        (["--format", "int8"], "--format"),
        (["--compress"], "--compress"),
    ],
)
def test_resume_with_other_options_is_one_line_naming_the_option(
    capsys, tiny, boundary, change, named
):
    before = _snapshot(_state(boundary))
    argv = _argv(tiny, boundary, *OPTIONS, *change, "--resume")
    line = _one_line_error(capsys, argv)
    assert f"--resume: {named} differs from the saved run's" in line
    assert _snapshot(_state(boundary)) == before and not boundary.exists()


def test_resume_after_the_data_changed_is_one_line_naming_it(capsys, tiny, boundary):
    corpus = tiny[1]
    text = corpus.read_bytes()
    corpus.write_bytes(text + b"one more line of text\n")
    try:
        line = _one_line_error(capsys, _argv(tiny, boundary, *OPTIONS, "--resume"))
    finally:
        corpus.write_bytes(text)
    assert f"--data {corpus.resolve()} changed since the state" in line


def test_resume_without_a_saved_state_is_one_line_naming_the_folder(capsys, tiny, tmp_path):
    line = _one_line_error(capsys, _argv(tiny, tmp_path / "run", *OPTIONS, "--resume"))
    assert f"no saved state in {_state(tmp_path / 'run')}" in line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("damage", "resume", "words"),
    [
        ({"state.json": b"{not json"}, True, "state.json is not a valid JSON file"),
        ({"state.json": b'{"format": "other"}'}, True, "holds no qpeft recover state"),
        ({"notes.txt": b"mine"}, False, "notes.txt, which no qpeft recover state holds"),
    ],
)
def test_a_damaged_or_foreign_state_folder_is_one_line(
    capsys, tiny, boundary, tmp_path, damage, resume, words
):
    out = tmp_path / "run"
    _plant(boundary, out)
    for name, content in damage.items():
        (_state(out) / name).write_bytes(content)
    before = _snapshot(_state(out))
    line = _one_line_error(capsys, _argv(tiny, out, *OPTIONS, *(["--resume"] if resume else [])))
    assert words in line
    assert _snapshot(_state(out)) == before and not out.exists()


def test_help_documents_resume_and_save_every(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["recover", "--help"])
    assert exit_.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "--resume" in out and "--save-every STEPS" in out and "(default 100;" in out
    assert ".<output name>.qpeft-resume/ beside --output" in out
