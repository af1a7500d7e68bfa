"""Safe files under save: tied and strided tensors, refusals, and saves killed at any moment."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import qpeft
from qpeft import update_model
from qpeft.checkpoint.full import MANIFEST, MODEL_FILE
from qpeft.checkpoint.tensor_files import read_header
from tests.checkpoint.helpers import assert_same, randomize_adapters, rich_model
from tests.models import TinyBlock, tiny_gpt2


def test_tied_and_non_contiguous_tensors(tmp_path):
    model = tiny_gpt2()
    update_model(model, {"adapter_cfg": {"*c_attn*": {"rank": 2}}})
    model.register_buffer("strided", torch.arange(12.0).reshape(3, 4).t())
    qpeft.save(model, tmp_path / "ck")
    assert json.loads((tmp_path / "ck" / MANIFEST).read_text())["aliases"] == {
        "lm_head.weight": "transformer.wte.weight"
    }
    assert "lm_head.weight" not in read_header(tmp_path / "ck" / MODEL_FILE)
    fresh = tiny_gpt2()
    fresh.register_buffer("strided", torch.zeros(4, 3))
    qpeft.restore(fresh, tmp_path / "ck")
    assert torch.equal(fresh.strided, model.strided)
    assert fresh.lm_head.weight is fresh.transformer.wte.weight
    ids = torch.randint(0, 64, (2, 6))
    assert torch.equal(fresh(ids).logits, model(ids).logits)


def test_save_never_replaces_a_foreign_directory(tmp_path):
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="refusing"):
        qpeft.save(TinyBlock(), tmp_path / "work")
    assert (tmp_path / "work" / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"]


def test_save_replaces_an_older_checkpoint(tmp_path):
    qpeft.save(TinyBlock(), tmp_path / "ck")
    model = rich_model()
    qpeft.save(model, tmp_path / "ck")
    assert_same(model, qpeft.restore(TinyBlock(), tmp_path / "ck"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no temporary or backup left


# -- a save killed at several moments ------------------------------------------------------------
ROOT = Path(__file__).resolve().parents[2]
KILLED = 37

_CHILD = f"""
import os, shutil, sys, torch
import qpeft
import qpeft.checkpoint.full
from tests.checkpoint.test_files import _numbered

point, path = sys.argv[1], sys.argv[2]
die = lambda *a, **k: os._exit({KILLED})
renames = []
real_rename = os.rename

def rename(src, dst):
    renames.append(src)
    if point == "rename" + str(len(renames)):
        die()
    real_rename(src, dst)

if point == "write":
    qpeft.checkpoint.full.write_json = die  # tensors written, manifest not yet
elif point == "cleanup":
    shutil.rmtree = die              # both renames done, the old copy not yet deleted
os.rename = rename
if point == "loop":
    print("ready", flush=True)
    i = 0
    while True:
        qpeft.save(_numbered(i % 2), path)
        i += 1
qpeft.save(_numbered(1), path)
"""


def _numbered(i):
    """Model ``i``: a small converted model whose every tensor depends on ``i``."""
    torch.manual_seed(i)
    model = TinyBlock(d=64)
    update_model(model, {"adapter_cfg": {"*": {"rank": 8}}})
    randomize_adapters(model, seed=i)
    return model


def _child(point, path, **kw):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    return subprocess.Popen(
        [sys.executable, "-c", _CHILD, point, str(path)], cwd=ROOT, env=env, **kw
    )


def _which(path):
    """Which numbered model the checkpoint at ``path`` restores to, checking it is complete."""
    restored = qpeft.restore(TinyBlock(d=64), path)
    for i in (0, 1):
        ref = _numbered(i)
        if all(torch.equal(v, ref.state_dict()[k]) for k, v in restored.state_dict().items()):
            return i
    raise AssertionError("the checkpoint is neither the old nor the new model")


@pytest.mark.parametrize(
    ("point", "expected"),
    [
        ("write", 0),
        ("rename1", 0),
        ("rename2", 0),
        ("cleanup", 1),
        ("none", 1),
    ],
)
def test_save_killed_at_any_moment_leaves_old_or_new(tmp_path, point, expected):
    path = tmp_path / "ck"
    qpeft.save(_numbered(0), path)
    code = _child(point, path).wait(timeout=120)
    assert code == (0 if point == "none" else KILLED)
    assert _which(path) == expected
    qpeft.save(_numbered(1), path)  # the next save cleans up whatever the killed one left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"] and _which(path) == 1


def test_save_loop_killed_by_sigkill(tmp_path):
    path = tmp_path / "ck"
    qpeft.save(_numbered(0), path)
    for delay in (0.05, 0.3):
        child = _child("loop", path, stdout=subprocess.PIPE)
        assert child.stdout.readline().strip() == b"ready"
        time.sleep(delay)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
        child.stdout.close()
        assert _which(path) in (0, 1)


class _Views(nn.Module):
    """A buffer that is a strided view into part of a parameter's storage (not a tied copy)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 6)
        self.register_buffer("col", self.lin.weight.detach()[1:5, 2])

    def forward(self, x):
        return self.lin(x)


def test_overlapping_views_and_unsavable_entries(tmp_path):
    model = _Views()
    update_model(model, {"adapter_cfg": {"*": {"rank": 2}}})
    qpeft.save(model, tmp_path / "ck")
    fresh = _Views()
    qpeft.restore(fresh, tmp_path / "ck")
    assert torch.equal(fresh.col, model.col) and torch.equal(fresh.lin.weight, model.lin.weight)
    model.register_buffer("odd", torch.zeros(2, dtype=torch.float8_e8m0fnu))
    with pytest.raises(TypeError, match="'odd' has dtype torch.float8_e8m0fnu"):
        qpeft.save(model, tmp_path / "ck2")
    assert not (tmp_path / "ck2").exists()
