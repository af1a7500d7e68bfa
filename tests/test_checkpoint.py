"""save / restore / save_adapters / load_adapters: bit-exact round trips, refusals, atomicity."""

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import qpeft
from qpeft import update_model
from qpeft.checkpoint import MANIFEST, MODEL_FILE
from qpeft.modes import known_modes
from qpeft.quant import TensorQuantizer
from qpeft.safeio import read_header

from .models import TinyBlock, tiny_gpt2

X = torch.randn(5, 16, generator=torch.Generator().manual_seed(3))


def _randomize_adapters(model, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in qpeft.lora_layers(model).values():
            for adapter in layer.adapters.values():
                for p in adapter.parameters():
                    p.copy_(torch.randn(p.shape, generator=gen))


def _quantize(model, preset="int8"):
    return qpeft.quantize(model, preset, forward_loop=lambda m: m(X))


def _rich_model(merge=True):
    """Quantized, two adapters (callable pattern), edits, disabled layers, frozen and merged parts."""
    torch.manual_seed(0)
    model = _quantize(TinyBlock())
    update_model(model, {"adapter_cfg": {"*": {"rank": 4}, "*lm_head*": {"enable": False},
                                         "*q_proj*": {"lora_init_method": "svdquant"}}})
    update_model(model, {"adapter_name": "task2",
                         "adapter_cfg": {lambda n: n.startswith("mlp"): {"rank": 2, "scale": 3.0, "lora_dtype": "bf16"}}})
    update_model(model, {"adapter_name": "gone", "adapter_cfg": {"*v_proj*": {"rank": 1}}})
    _randomize_adapters(model)
    update_model(model, {"adapter_cfg": {"*mlp.up*": {"scale": 0.25}}})  # edit through the API
    model.attn["v_proj"].adapters["default"].scale = 1.5  # and a direct edit
    qpeft.disable_adapters(model, layers_to_disable="*down*", adapters_to_disable="task2")
    qpeft.freeze_lora_weights(model, layer_patterns="attn*")
    qpeft.disable_quantizer(model, "*mlp.down.input_quantizer")
    qpeft.delete_adapter(model, "gone")
    if merge:
        qpeft.merge_adapters(model, "default")
    return model


def _adapter_facts(model):
    return {
        (ln, n): (a.scale, a.enable, a.merged, a.lora_a.dtype, a.lora_a.requires_grad, a.lora_b.requires_grad)
        for ln, layer in qpeft.lora_layers(model).items() for n, a in layer.adapters.items()
    }


def _assert_same(a, b, x=X):
    assert repr(a) == repr(b)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key
    assert _adapter_facts(a) == _adapter_facts(b)
    assert [(n, p.requires_grad) for n, p in a.named_parameters()] == [(n, p.requires_grad) for n, p in b.named_parameters()]
    assert qpeft.state(a) == qpeft.state(b)
    if x is not None:
        with torch.no_grad():
            assert torch.equal(a(x), b(x))


def _untouched(model):
    """A checker that ``model`` is exactly as it is now (structure, tensors, flags, mode log)."""
    ref = copy.deepcopy(model)
    return lambda: _assert_same(model, ref, x=None)


def test_quantized_two_adapters_with_edits_round_trip_bit_exactly(tmp_path):
    model = _rich_model()
    qpeft.save(model, tmp_path / "ck")
    restored = qpeft.restore(TinyBlock(), tmp_path / "ck")
    _assert_same(model, restored)
    q, r = model.attn["q_proj"], restored.attn["q_proj"]
    assert torch.equal(q.weight_quantizer.amax, r.weight_quantizer.amax) and r.weight_quantizer.amax.shape == (16, 1)
    assert not restored.mlp.down.input_quantizer.is_enabled
    qpeft.unmerge_adapters(restored)  # the merged state is real: undoing it gives the unmerged model back
    qpeft.unmerge_adapters(model)
    _assert_same(model, restored)


def test_restore_returns_the_model_passed_in_and_skips_tensor_init(tmp_path, monkeypatch):
    model = _rich_model()
    qpeft.save(model, tmp_path / "ck")

    def no_svd(*_args):
        raise AssertionError("restore recomputed svdquant's SVD")

    monkeypatch.setattr("qpeft.lora.init.truncated_svd", no_svd)
    fresh = TinyBlock()
    assert qpeft.restore(fresh, tmp_path / "ck") is fresh
    with pytest.raises(AssertionError, match="recomputed"):  # the patch is live outside restore
        update_model(_quantize(TinyBlock()), {"adapter_cfg": {"*q_proj*": {"rank": 2, "lora_init_method": "svdquant"}}})


class _Calibrated(nn.Module):
    """A quantizer whose ``_amax`` buffer exists only once calibrated (created by the load)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(16, 4)
        self.quant = TensorQuantizer("int", 8, axis=0)

    def forward(self, x):
        return self.lin(self.quant(x.T).T)


def test_buffers_created_while_loading_are_restored(tmp_path):
    model = _Calibrated()
    with model.quant.calibrating():
        model(X)
    qpeft.save(model, tmp_path / "ck")
    fresh = _Calibrated()
    assert fresh.quant.amax is None
    qpeft.restore(fresh, tmp_path / "ck")
    assert torch.equal(fresh.quant.amax, model.quant.amax)
    assert torch.equal(fresh(X), model(X))


def test_log_is_plain_json_with_callables_resolved(tmp_path):
    model = TinyBlock()
    update_model(model, {"adapter_cfg": {lambda n: n.endswith("proj"): {"rank": 2}}})
    qpeft.save(model, tmp_path / "ck")
    log = json.loads((tmp_path / "ck" / MANIFEST).read_text())["modes"]
    assert set(log[0]["config"]["adapter_cfg"]) == {"attn.q_proj", "attn.v_proj"}
    _assert_same(model, qpeft.restore(TinyBlock(), tmp_path / "ck"))


def _scenario(mode):
    model = _quantize(TinyBlock()) if "quant" in mode else TinyBlock()
    update_model(model, {"adapter_cfg": {"*": {"rank": 2}}})
    update_model(model, {"adapter_name": "b", "adapter_cfg": {"*mlp*": {"rank": 3}}})
    _randomize_adapters(model)
    steps = {
        "peft": lambda: update_model(model, {"adapter_cfg": {"*up*": {"scale": 2.0}}}),
        "disable_adapters": lambda: qpeft.disable_adapters(model, "*mlp*", "b"),
        "enable_adapters": lambda: (qpeft.disable_adapters(model), qpeft.enable_adapters(model, "*q_proj*")),
        "freeze_lora_weights": lambda: qpeft.freeze_lora_weights(model, adapter_patterns="b"),
        "unfreeze_lora_weights": lambda: (qpeft.freeze_lora_weights(model), qpeft.unfreeze_lora_weights(model, layer_patterns="mlp*")),
        "delete_adapter": lambda: qpeft.delete_adapter(model, "b"),
        "merge_adapters": lambda: qpeft.merge_adapters(model, ["b"]),
        "unmerge_adapters": lambda: (qpeft.merge_adapters(model), qpeft.unmerge_adapters(model)),
        "export": lambda: (qpeft.disable_adapters(model, "*lm_head*"), qpeft.export(model)),
        "quantize": lambda: None,
        "disable_quantizer": lambda: qpeft.disable_quantizer(model, "*up.input_quantizer"),
        "enable_quantizer": lambda: (qpeft.disable_quantizer(model, None), qpeft.enable_quantizer(model, "*attn*")),
    }
    if mode not in steps:
        pytest.skip(f"no scenario for mode {mode!r} here; the tests of its own feature must replay it")
    steps[mode]()
    return model


@pytest.mark.parametrize("mode", known_modes())
def test_every_mode_replays(tmp_path, mode):
    model = _scenario(mode)
    assert mode in {e["mode"] for e in qpeft.state(model)}
    qpeft.save(model, tmp_path / "ck")
    _assert_same(model, qpeft.restore(TinyBlock(), tmp_path / "ck"))


def test_tied_and_non_contiguous_tensors(tmp_path):
    model = tiny_gpt2()
    update_model(model, {"adapter_cfg": {"*c_attn*": {"rank": 2}}})
    model.register_buffer("strided", torch.arange(12.0).reshape(3, 4).t())
    qpeft.save(model, tmp_path / "ck")
    assert json.loads((tmp_path / "ck" / MANIFEST).read_text())["aliases"] == {"lm_head.weight": "transformer.wte.weight"}
    assert "lm_head.weight" not in read_header(tmp_path / "ck" / MODEL_FILE)
    fresh = tiny_gpt2()
    fresh.register_buffer("strided", torch.zeros(4, 3))
    qpeft.restore(fresh, tmp_path / "ck")
    assert torch.equal(fresh.strided, model.strided)
    assert fresh.lm_head.weight is fresh.transformer.wte.weight
    ids = torch.randint(0, 64, (2, 6))
    assert torch.equal(fresh(ids).logits, model(ids).logits)


# -- refusals: a clear error, the model untouched ------------------------------------------------
def _saved(tmp_path):
    model = _rich_model()
    qpeft.save(model, tmp_path / "ck")
    return tmp_path / "ck"


class _Boom:
    """Unpickling this runs code; a loader that unpickles would create the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _corrupt_json(ck):
    (ck / MANIFEST).write_text('{"format": "qpeft-checkpoint", "format_')


def _pickle_as_tensors(ck):
    torch.save({"weights": _Boom(ck.parent / "pwned")}, ck / MODEL_FILE)


def _newer_version(ck):
    data = json.loads((ck / MANIFEST).read_text())
    (ck / MANIFEST).write_text(json.dumps({**data, "format_version": 99}))


def _truncated(ck):
    raw = (ck / MODEL_FILE).read_bytes()
    (ck / MODEL_FILE).write_bytes(raw[:-10])


def _unknown_mode(ck):
    data = json.loads((ck / MANIFEST).read_text())
    data["modes"].append({"mode": "from_the_future", "config": {}})
    (ck / MANIFEST).write_text(json.dumps(data))


def _missing_tensor_file(ck):
    (ck / MODEL_FILE).unlink()


def _extra_tensor(ck):
    tensors = load_file(ck / MODEL_FILE)
    save_file({**tensors, "mlp.up.bogus": torch.ones(2)}, ck / MODEL_FILE)


def _binary_manifest(ck):
    (ck / MANIFEST).write_bytes(b"\x80\x04\x95 pickle bytes \xff")


@pytest.mark.parametrize(("corrupt", "error", "words"), [
    (_corrupt_json, ValueError, "not a valid JSON"),
    (_binary_manifest, ValueError, "not a valid JSON"),
    (_pickle_as_tensors, ValueError, "not a safetensors file"),
    (_newer_version, ValueError, "newer"),
    (_truncated, ValueError, "truncated"),
    (_unknown_mode, ValueError, "from_the_future"),
    (_missing_tensor_file, FileNotFoundError, MODEL_FILE),
    (_extra_tensor, ValueError, "'mlp.up.bogus', which the model does not have"),
])
def test_bad_files_are_refused_and_nothing_is_executed(tmp_path, corrupt, error, words):
    ck = _saved(tmp_path)
    corrupt(ck)
    model = TinyBlock()
    unchanged = _untouched(model)
    with pytest.raises(error, match=words):
        qpeft.restore(model, ck)
    unchanged()
    assert not (tmp_path / "pwned").exists()


def test_wrong_shapes_name_the_first_mismatching_key(tmp_path):
    ck = _saved(tmp_path)
    model = TinyBlock(d=8)
    unchanged = _untouched(model)
    with pytest.raises(ValueError, match=r"tensor 'attn\.q_proj\.\S+' has shape \[\d+, 16\], the model's has \[\d+, 8\]"):
        qpeft.restore(model, ck)
    unchanged()


def test_another_architecture_names_the_layer(tmp_path):
    ck = _saved(tmp_path)
    model = tiny_gpt2()
    unchanged = _untouched(model)
    with pytest.raises(ValueError, match="attn.q_proj"):
        qpeft.restore(model, ck)
    unchanged()


class _Uncopyable(TinyBlock):
    """Like a Megatron model: deep-copying fails, so restore relies on its rollback alone."""

    def __deepcopy__(self, memo):
        raise TypeError("cannot deep-copy this model")


def test_uncopyable_model_is_rolled_back_on_failure_and_restored_on_success(tmp_path):
    ck = _saved(tmp_path)
    data = json.loads((ck / MANIFEST).read_text())
    model = _Uncopyable()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    bad = dict(data, trainable=[*data["trainable"], "no.such.param"])  # fails after the replay
    (ck / MANIFEST).write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="no.such.param"):
        qpeft.restore(model, ck)
    assert not qpeft.is_peft_model(model) and qpeft.state(model) == []
    assert isinstance(model.attn["q_proj"], nn.Linear) and [p.requires_grad for p in model.parameters()] == flags
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    (ck / MANIFEST).write_text(json.dumps(data))
    with torch.no_grad():
        assert torch.equal(qpeft.restore(model, ck)(X), _rich_model()(X))


def test_restore_refuses_a_model_already_converted(tmp_path):
    ck = _saved(tmp_path)
    model = TinyBlock()
    update_model(model, {"adapter_cfg": {"*": {"rank": 2}}})
    with pytest.raises(ValueError, match="freshly built"):
        qpeft.restore(model, ck)


def test_save_never_replaces_a_foreign_directory(tmp_path):
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="refusing"):
        qpeft.save(TinyBlock(), tmp_path / "work")
    assert (tmp_path / "work" / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"]


def test_save_replaces_an_older_checkpoint(tmp_path):
    qpeft.save(TinyBlock(), tmp_path / "ck")
    model = _rich_model()
    qpeft.save(model, tmp_path / "ck")
    _assert_same(model, qpeft.restore(TinyBlock(), tmp_path / "ck"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no temporary or backup left


# -- adapter files -------------------------------------------------------------------------------
def test_adapter_files_round_trip_only_the_adapters(tmp_path):
    model = _rich_model(merge=False)
    qpeft.save_adapters(model, tmp_path / "ad", ["task2"])
    keys = read_header(tmp_path / "ad" / "adapters.safetensors")
    assert keys and all(".adapters.task2." in k for k in keys)
    torch.manual_seed(0)
    target = qpeft.disable_quantizer(_quantize(TinyBlock()), "*mlp.down.input_quantizer")  # the same base
    qpeft.load_adapters(target, tmp_path / "ad")
    qpeft.delete_adapter(model, "default")
    with torch.no_grad():
        assert torch.equal(model(X), target(X))
    assert _adapter_facts(model) == _adapter_facts(target)  # incl. the disabled layer


def test_load_adapters_refusals_leave_model_untouched(tmp_path):
    model = _rich_model()
    qpeft.save_adapters(model, tmp_path / "ad")
    target = TinyBlock()
    update_model(target, {"adapter_name": "task2", "adapter_cfg": {"*": {"rank": 2}}})
    unchanged = _untouched(target)
    with pytest.raises(ValueError, match="already has an adapter named 'task2'"):
        qpeft.load_adapters(target, tmp_path / "ad")
    unchanged()
    small = TinyBlock(d=8)
    unchanged = _untouched(small)
    with pytest.raises(ValueError, match="shape"):
        qpeft.load_adapters(small, tmp_path / "ad")
    unchanged()
    with pytest.raises(ValueError, match="no adapter named 'nope'"):
        qpeft.save_adapters(model, tmp_path / "ad2", ["nope"])
    assert not (tmp_path / "ad2").exists()


# -- a save killed at several moments ------------------------------------------------------------
ROOT = Path(__file__).resolve().parents[1]
KILLED = 37

_CHILD = f"""
import os, shutil, sys, torch
import qpeft
import qpeft.checkpoint
from tests.test_checkpoint import _numbered

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
    qpeft.checkpoint.write_json = die  # tensors written, manifest not yet
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
    _randomize_adapters(model, seed=i)
    return model


def _child(point, path, **kw):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    return subprocess.Popen([sys.executable, "-c", _CHILD, point, str(path)], cwd=ROOT, env=env, **kw)


def _which(path):
    """Which numbered model the checkpoint at ``path`` restores to, checking it is complete."""
    restored = qpeft.restore(TinyBlock(d=64), path)
    for i in (0, 1):
        ref = _numbered(i)
        if all(torch.equal(v, ref.state_dict()[k]) for k, v in restored.state_dict().items()):
            return i
    raise AssertionError("the checkpoint is neither the old nor the new model")


@pytest.mark.parametrize(("point", "expected"), [
    ("write", 0), ("rename1", 0), ("rename2", 0), ("cleanup", 1), ("none", 1),
])
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
