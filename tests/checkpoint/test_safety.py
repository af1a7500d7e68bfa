"""Hostile and careless paths: writers replace only what they wrote, a read deletes nothing."""

import os
import subprocess
import sys

import pytest
import torch

import qpeft
from qpeft.checkpoint.files import read_json
from tests.checkpoint.helpers import untouched
from tests.checkpoint.test_files import _numbered, _which
from tests.models import TinyBlock


def snapshot(root):
    """Every entry under ``root`` (hidden ones too): file bytes, link targets, directories."""
    found = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, root)
            if os.path.islink(path):
                found[rel] = "-> " + os.readlink(path)
            elif os.path.isdir(path):
                found[rel] = "<dir>"
            else:
                with open(path, "rb") as f:
                    found[rel] = f.read()
    return found


def _converted(seed=0):
    torch.manual_seed(seed)
    model = TinyBlock()
    qpeft.update_model(model, {"adapter_cfg": {"*": {"rank": 2}}})
    return model


def test_save_over_a_checkpoint_holding_user_files_is_refused(tmp_path):
    ck = tmp_path / "ck"
    qpeft.save(_converted(), ck)
    (ck / "NOTES.md").write_text("my notes")
    (ck / "tokenizer").mkdir()
    (ck / "tokenizer" / "vocab.txt").write_text("a b c")
    before = snapshot(tmp_path)
    with pytest.raises(FileExistsError, match="NOTES.md, tokenizer"):
        qpeft.save(_converted(1), ck)
    assert snapshot(tmp_path) == before


def test_adapters_and_full_checkpoints_never_replace_each_other(tmp_path):
    model = _converted()
    qpeft.save(model, tmp_path / "full")
    qpeft.save_adapters(model, tmp_path / "adapters")
    before = snapshot(tmp_path)
    with pytest.raises(FileExistsError, match="'qpeft-checkpoint' manifest, not 'qpeft-adapters'"):
        qpeft.save_adapters(model, tmp_path / "full")
    with pytest.raises(FileExistsError, match="'qpeft-adapters' manifest, not 'qpeft-checkpoint'"):
        qpeft.save(model, tmp_path / "adapters")
    assert snapshot(tmp_path) == before
    qpeft.save(_converted(1), tmp_path / "full")  # the same kind is still replaced
    qpeft.save_adapters(model, tmp_path / "adapters")


def test_export_hf_peft_into_a_trainer_folder_is_refused(tmp_path):
    out = tmp_path / "trainer"
    (out / "checkpoint-500").mkdir(parents=True)
    (out / "checkpoint-500" / "adapter_config.json").write_text("{}")
    for name in ("README.md", "optimizer.pt", "training_args.json", "adapter_config.json"):
        (out / name).write_text(name)
    before = snapshot(tmp_path)
    with pytest.raises(FileExistsError, match="README.md, checkpoint-500, optimizer.pt"):
        qpeft.export_hf_peft(_converted(), out)
    assert snapshot(tmp_path) == before
    qpeft.export_hf_peft(_converted(), tmp_path / "hf")
    qpeft.export_hf_peft(_converted(1), tmp_path / "hf")  # an exported adapter is replaced


def test_reads_and_saves_never_delete_a_user_file_named_like_a_leftover(tmp_path):
    ck = tmp_path / "ckpt"
    qpeft.save(_converted(), ck)
    (tmp_path / ".ckpt.old").write_text("a user's file")
    (tmp_path / ".ckpt.tmp-1-x").mkdir()  # pid 1 lives; and no marker: not ours anyway
    (tmp_path / ".ckpt.tmp-1-x" / "work.txt").write_text("keep")
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / f".ckpt.tmp-{dead.pid}-y").mkdir()  # a dead pid, but not qpeft's files
    (tmp_path / f".ckpt.tmp-{dead.pid}-y" / "work.txt").write_text("keep")
    before = snapshot(tmp_path)
    model = TinyBlock()
    qpeft.restore(model, ck)
    assert snapshot(tmp_path) == before
    check = untouched(model)
    with pytest.raises(FileExistsError, match=r"\.ckpt\.old is in the way"):
        qpeft.save(model, ck)
    assert snapshot(tmp_path) == before
    check()
    (tmp_path / ".ckpt.old").unlink()
    qpeft.save(_converted(1), ck)
    names = {p.name for p in tmp_path.iterdir()}
    assert names == {"ckpt", ".ckpt.tmp-1-x", f".ckpt.tmp-{dead.pid}-y"}


def test_a_dead_saves_own_leftovers_are_removed(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    qpeft.save(_converted(), tmp_path / "ck")
    left = tmp_path / f".ck.tmp-{dead.pid}-abc"
    left.mkdir()
    (left / ".qpeft-tmp").touch()
    (left / "model.safetensors").write_bytes(b"half")
    qpeft.save(_converted(1), tmp_path / "ck")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_a_symlink_is_refused_and_stays_usable(tmp_path):
    qpeft.save(_converted(), tmp_path / "real")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match="symbolic link"):
        qpeft.save(_converted(1), tmp_path / "link")
    with pytest.raises(ValueError, match="symbolic link"):
        qpeft.save_adapters(_converted(1), tmp_path / "link")
    assert snapshot(tmp_path) == before
    qpeft.restore(TinyBlock(), tmp_path / "link")  # reads follow the link
    qpeft.save(_converted(1), tmp_path / "real")
    qpeft.restore(TinyBlock(), tmp_path / "link")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]


@pytest.mark.parametrize("where", [".", "", "/", "..", "ck/.."])
def test_cwd_empty_and_root_paths_are_refused(tmp_path, monkeypatch, where):
    (tmp_path / "ck").mkdir()
    monkeypatch.chdir(tmp_path / "ck")
    qpeft.save(_converted(), tmp_path / "ck" / "inner")
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match="cannot save to"):
        qpeft.save(_converted(), where)
    with pytest.raises(ValueError, match="cannot save to"):
        qpeft.export_hf_peft(_converted(), where)
    assert snapshot(tmp_path) == before


def test_deeply_nested_json_is_a_value_error_naming_the_file(tmp_path):
    ck = tmp_path / "ck"
    qpeft.save(_converted(), ck)
    (ck / "qpeft.json").write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(ValueError, match="qpeft.json is not a usable JSON file"):
        read_json(ck / "qpeft.json")
    model = TinyBlock()
    check = untouched(model)
    with pytest.raises(ValueError, match="qpeft.json"):
        qpeft.restore(model, ck)
    check()


_WRITER = """
import sys
import qpeft
from tests.checkpoint.test_files import _numbered, _which
kind, path, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
for i in range(n):
    if kind == "read":
        assert _which(path) in (0, 1)
    else:
        qpeft.save(_numbered(int(kind)), path)
print("ok", flush=True)
"""


def test_two_writers_and_a_reader_on_one_path(tmp_path):
    from tests.checkpoint.test_files import ROOT

    path = tmp_path / "ck"
    qpeft.save(_numbered(0), path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WRITER, kind, str(path), "20"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for kind in ("0", "1", "read")
    ]
    results = [p.communicate(timeout=240) for p in procs]
    for p, (out, err) in zip(procs, results, strict=True):
        assert p.returncode == 0 and out.strip() == "ok", err[-2000:]
    assert _which(path) in (0, 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
