"""``qpeft`` on hostile and careless input: one line, exit 2, nothing lost, nothing left behind."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest
import torch
from safetensors.torch import save_file

import qpeft
from qpeft.cli import main
from tests.checkpoint.test_safety import snapshot
from tests.models import TinyBlock
from tests.recover.tiny_lm import build_tiny_causal_lm, write_corpus
from tests.test_cli import FEW_STEPS, _qpeft


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return build_tiny_causal_lm(root / "lm"), write_corpus(root / "corpus.txt")


def _fails(capsys, argv, *words):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("qpeft")
    for word in words:
        assert word in err, err
    return err


def _recover(model, corpus, out, *extra):
    return ["recover", "--model", str(model), "--data", str(corpus), "--output", str(out),
            *FEW_STEPS, *extra]  # fmt: skip


def test_recover_never_replaces_a_user_folder(capsys, tiny, tmp_path):
    model, corpus = tiny
    out = tmp_path / "project"
    (out / "src").mkdir(parents=True)
    (out / "main.py").write_text("print('hi')")
    (out / "thesis.tex").write_text("\\section{x}")
    before = snapshot(tmp_path)
    _fails(capsys, _recover(model, corpus, out), "main.py, src, thesis.tex", "refusing")
    assert snapshot(tmp_path) == before


def test_recover_never_writes_over_or_into_the_model(capsys, tiny, tmp_path):
    model, corpus = tiny
    before = snapshot(model.parent)
    for out in (model, model / "run", model.parent):
        _fails(capsys, _recover(model, corpus, out), "model folder")
    assert snapshot(model.parent) == before


def test_recover_to_the_current_directory_is_refused(capsys, tiny, tmp_path, monkeypatch):
    model, corpus = tiny
    (tmp_path / "keep.txt").write_text("keep")
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    _fails(capsys, _recover(model, corpus, "."), "cannot save to")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("flag", ["--lr", "--block-lr"])
@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "1e999"])
def test_non_finite_learning_rates_are_refused(capsys, tmp_path, flag, value):
    _fails(
        capsys, ["recover", f"{flag}={value}", "--output", str(tmp_path / "out")], flag, "finite"
    )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("flag", ["--lr", "--block-lr"])
def test_a_diverging_run_stops_with_an_error_and_writes_nothing(capsys, tiny, tmp_path, flag):
    model, corpus = tiny
    _fails(capsys, _recover(model, corpus, tmp_path / "out", flag, "1e30"), "diverged")
    assert list(tmp_path.iterdir()) == []


def test_a_model_folder_without_tokenizer_is_refused_before_any_work(capsys, tiny, tmp_path):
    model, corpus = tiny
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in os.listdir(model):
        if "token" not in name and name != "special_tokens_map.json":
            shutil.copy(model / name, bare / name)
    before = snapshot(tmp_path)
    _fails(capsys, _recover(bare, corpus, tmp_path / "out"), "no tokenizer")
    assert snapshot(tmp_path) == before


def test_an_unwritable_output_place_is_one_line(capsys, tiny, tmp_path, monkeypatch):
    model, corpus = tiny

    def read_only(*_args, **kwargs):
        raise PermissionError(13, "Permission denied", kwargs.get("dir"))

    monkeypatch.setattr(tempfile, "mkdtemp", read_only)  # what a read-only folder gives
    _fails(capsys, _recover(model, corpus, tmp_path / "out"), "cannot write into")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_earlier_run_is_one_line(capsys, tiny, tmp_path):
    from qpeft.recover.outputs import output_directory

    model, corpus = tiny
    with output_directory(tmp_path / "out", model) as tmp:
        (tmp / "report.json").write_text("{}")
    os.chmod(tmp_path / "out", 0o555)
    try:
        _fails(capsys, _recover(model, corpus, tmp_path / "out"), "read-only")
    finally:
        os.chmod(tmp_path / "out", 0o755)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_the_next_run_removes_what_a_killed_run_left(capsys, tiny, tmp_path, sig):
    from tests.test_cli import _qpeft as _unused  # noqa: F401 (same environment as _qpeft)

    model, corpus = tiny
    src = str(__import__("pathlib").Path(qpeft.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    out = tmp_path / "out"
    child = subprocess.Popen(
        [sys.executable, "-m", "qpeft", *_recover(model, corpus, out)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".out.tmp-*")) and time.monotonic() < deadline:
        time.sleep(0.05)
    child.send_signal(sig)
    child.wait(timeout=60)
    assert list(tmp_path.glob(".out.tmp-*")), "the killed run left no temporary folder"
    mine = tmp_path / f".out.tmp-{child.pid}-user"  # a dead pid, but not qpeft's
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    _fails(capsys, _recover(model, empty, out), "holds no text")  # fails after the clean-up
    assert sorted(p.name for p in tmp_path.iterdir()) == [mine.name, "empty.txt"]


def _checkpoint(tmp_path):
    torch.manual_seed(0)
    model = TinyBlock()
    qpeft.update_model(model, {"adapter_cfg": {"*": {"rank": 2}}})
    qpeft.save(model, tmp_path / "ck")
    return tmp_path / "ck"


DEEP = "[" * 100000 + "]" * 100000


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"\x00\xff\xfe binary",
        b"{corrupt",
        b"[]",
        b'{"format": "qpeft-checkpoint", "format_version": 1, "modes": {"peft": 1}}',
        b'{"format": "qpeft-checkpoint", "format_version": 1, "modes": [{"mode": "peft", '
        b'"config": []}]}',
        b'{"format": "qpeft-adapters", "format_version": 1, "adapters": []}',
        DEEP.encode(),
    ],
)
def test_inspect_validates_the_manifest_as_restore_does(capsys, tmp_path, content):
    ck = _checkpoint(tmp_path)
    (ck / "qpeft.json").write_bytes(content)
    before = snapshot(tmp_path)
    _fails(capsys, ["inspect", str(ck)], "qpeft.json")
    assert snapshot(tmp_path) == before


def _hf(tmp_path, config, factor_a=None):
    save_file(
        {
            "base_model.model.q.lora_A.weight": torch.zeros(4, 8) if factor_a is None else factor_a,
            "base_model.model.q.lora_B.weight": torch.zeros(8, 4),
        },
        str(tmp_path / "adapter_model.safetensors"),
    )
    text = config if isinstance(config, str) else json.dumps(config)
    (tmp_path / "adapter_config.json").write_text(text)


@pytest.mark.parametrize(
    ("config", "factor_a", "word"),
    [
        ([1, 2], None, "adapter_config.json"),
        ({"r": "4", "lora_alpha": 8}, None, "r must be"),
        ('{"r": 4, "lora_alpha": 1' + "0" * 400 + "}", None, "lora_alpha"),
        ('{"r": 4, "lora_alpha": 1e999}', None, "lora_alpha"),
        ({"r": 4, "lora_alpha": [8]}, None, "lora_alpha"),
        (DEEP, None, "adapter_config.json"),
        ({"r": 4, "lora_alpha": 8}, torch.tensor(1.0), "shape []"),
    ],
)
def test_inspect_of_malformed_hf_files_is_one_line(capsys, tmp_path, config, factor_a, word):
    _hf(tmp_path, config, factor_a)
    before = snapshot(tmp_path)
    _fails(capsys, ["inspect", str(tmp_path)], word)
    assert snapshot(tmp_path) == before


def test_inspect_console_never_prints_a_traceback(tmp_path):
    _hf(tmp_path, {"r": "4", "lora_alpha": 8})
    done = _qpeft("inspect", str(tmp_path))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.count("\n") == 1
