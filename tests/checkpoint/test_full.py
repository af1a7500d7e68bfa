"""save / restore / save_adapters / load_adapters: bit-exact round trips, refusals, rollback."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import qpeft
from qpeft import update_model
from qpeft.checkpoint.full import MANIFEST, MODEL_FILE
from qpeft.checkpoint.tensor_files import read_header
from qpeft.core.modes import known_modes
from qpeft.quant import TensorQuantizer
from tests.checkpoint.helpers import (
    X,
    adapter_facts,
    assert_same,
    quantize_tiny,
    randomize_adapters,
    rich_model,
    untouched,
)
from tests.models import TinyBlock, tiny_gpt2


def test_quantized_two_adapters_with_edits_round_trip_bit_exactly(tmp_path):
    model = rich_model()
    qpeft.save(model, tmp_path / "ck")
    restored = qpeft.restore(TinyBlock(), tmp_path / "ck")
    assert_same(model, restored)
    q, r = model.attn["q_proj"], restored.attn["q_proj"]
    assert torch.equal(
        q.weight_quantizer.amax, r.weight_quantizer.amax
    ) and r.weight_quantizer.amax.shape == (16, 1)
    assert not restored.mlp.down.input_quantizer.is_enabled
    qpeft.unmerge_adapters(
        restored
    )  # the merged state is real: undoing it gives the unmerged model back
    qpeft.unmerge_adapters(model)
    assert_same(model, restored)


def test_restore_returns_the_model_passed_in_and_skips_tensor_init(tmp_path, monkeypatch):
    model = rich_model()
    qpeft.save(model, tmp_path / "ck")

    def no_svd(*_args):
        raise AssertionError("restore recomputed svdquant's SVD")

    monkeypatch.setattr("qpeft.lora.init.truncated_svd", no_svd)
    fresh = TinyBlock()
    assert qpeft.restore(fresh, tmp_path / "ck") is fresh
    with pytest.raises(AssertionError, match="recomputed"):  # the patch is live outside restore
        update_model(
            quantize_tiny(TinyBlock()),
            {"adapter_cfg": {"*q_proj*": {"rank": 2, "lora_init_method": "svdquant"}}},
        )


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
    assert_same(model, qpeft.restore(TinyBlock(), tmp_path / "ck"))


def _scenario(mode):
    quantized = "quant" in mode or mode == "compress"
    model = quantize_tiny(TinyBlock()) if quantized else TinyBlock()
    update_model(model, {"adapter_cfg": {"*": {"rank": 2}}})
    update_model(model, {"adapter_name": "b", "adapter_cfg": {"*mlp*": {"rank": 3}}})
    randomize_adapters(model)
    steps = {
        "peft": lambda: update_model(model, {"adapter_cfg": {"*up*": {"scale": 2.0}}}),
        "disable_adapters": lambda: qpeft.disable_adapters(model, "*mlp*", "b"),
        "enable_adapters": lambda: (
            qpeft.disable_adapters(model),
            qpeft.enable_adapters(model, "*q_proj*"),
        ),
        "freeze_lora_weights": lambda: qpeft.freeze_lora_weights(model, adapter_patterns="b"),
        "unfreeze_lora_weights": lambda: (
            qpeft.freeze_lora_weights(model),
            qpeft.unfreeze_lora_weights(model, layer_patterns="mlp*"),
        ),
        "delete_adapter": lambda: qpeft.delete_adapter(model, "b"),
        "merge_adapters": lambda: qpeft.merge_adapters(model, ["b"]),
        "unmerge_adapters": lambda: (qpeft.merge_adapters(model), qpeft.unmerge_adapters(model)),
        "export": lambda: (qpeft.disable_adapters(model, "*lm_head*"), qpeft.export(model)),
        "quantize": lambda: None,
        "disable_quantizer": lambda: qpeft.disable_quantizer(model, "*up.input_quantizer"),
        "enable_quantizer": lambda: (
            qpeft.disable_quantizer(model, None),
            qpeft.enable_quantizer(model, "*attn*"),
        ),
        "refine_svdquant": lambda: qpeft.refine_svdquant(model, "b", iters=1),
        "compress": lambda: qpeft.compress(model),
    }
    assert mode in steps, f"mode {mode!r} has no save/restore scenario: add one here"
    steps[mode]()
    return model


@pytest.mark.parametrize("mode", known_modes())
def test_every_mode_replays(tmp_path, mode):
    model = _scenario(mode)
    if mode == "delete_adapter":  # compacted away with the deleted adapter's history
        assert all(e["config"].get("adapter_name") != "b" for e in qpeft.state(model))
    else:
        assert mode in {e["mode"] for e in qpeft.state(model)}
    qpeft.save(model, tmp_path / "ck")
    assert_same(model, qpeft.restore(TinyBlock(), tmp_path / "ck"))


# -- refusals: a clear error, the model untouched ------------------------------------------------
def _saved(tmp_path):
    model = rich_model()
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


@pytest.mark.parametrize(
    ("corrupt", "error", "words"),
    [
        (_corrupt_json, ValueError, "not a valid JSON"),
        (_binary_manifest, ValueError, "not a valid JSON"),
        (_pickle_as_tensors, ValueError, "not a safetensors file"),
        (_newer_version, ValueError, "newer"),
        (_truncated, ValueError, "truncated"),
        (_unknown_mode, ValueError, "from_the_future"),
        (_missing_tensor_file, FileNotFoundError, MODEL_FILE),
        (_extra_tensor, ValueError, "'mlp.up.bogus', which the model does not have"),
    ],
)
def test_bad_files_are_refused_and_nothing_is_executed(tmp_path, corrupt, error, words):
    ck = _saved(tmp_path)
    corrupt(ck)
    model = TinyBlock()
    unchanged = untouched(model)
    with pytest.raises(error, match=words):
        qpeft.restore(model, ck)
    unchanged()
    assert not (tmp_path / "pwned").exists()


def test_wrong_shapes_name_the_first_mismatching_key(tmp_path):
    ck = _saved(tmp_path)
    model = TinyBlock(d=8)
    unchanged = untouched(model)
    with pytest.raises(
        ValueError,
        match=r"tensor 'attn\.q_proj\.\S+' has shape \[\d+, 16\], the model's has \[\d+, 8\]",
    ):
        qpeft.restore(model, ck)
    unchanged()


def test_another_architecture_names_the_layer(tmp_path):
    ck = _saved(tmp_path)
    model = tiny_gpt2()
    unchanged = untouched(model)
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
    assert (
        isinstance(model.attn["q_proj"], nn.Linear)
        and [p.requires_grad for p in model.parameters()] == flags
    )
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    (ck / MANIFEST).write_text(json.dumps(data))
    with torch.no_grad():
        assert torch.equal(qpeft.restore(model, ck)(X), rich_model()(X))


def test_restore_refuses_a_model_already_converted(tmp_path):
    ck = _saved(tmp_path)
    model = TinyBlock()
    update_model(model, {"adapter_cfg": {"*": {"rank": 2}}})
    with pytest.raises(ValueError, match="freshly built"):
        qpeft.restore(model, ck)


# -- adapter files -------------------------------------------------------------------------------
def test_adapter_files_round_trip_only_the_adapters(tmp_path):
    model = rich_model(merge=False)
    qpeft.save_adapters(model, tmp_path / "ad", ["task2"])
    keys = read_header(tmp_path / "ad" / "adapters.safetensors")
    assert keys and all(".adapters.task2." in k for k in keys)
    torch.manual_seed(0)
    target = qpeft.disable_quantizer(
        quantize_tiny(TinyBlock()), "*mlp.down.input_quantizer"
    )  # the same base
    qpeft.load_adapters(target, tmp_path / "ad")
    qpeft.delete_adapter(model, "default")
    with torch.no_grad():
        assert torch.equal(model(X), target(X))
    assert adapter_facts(model) == adapter_facts(target)  # incl. the disabled layer


def test_load_adapters_refusals_leave_modeluntouched(tmp_path):
    model = rich_model()
    qpeft.save_adapters(model, tmp_path / "ad")
    target = TinyBlock()
    update_model(target, {"adapter_name": "task2", "adapter_cfg": {"*": {"rank": 2}}})
    unchanged = untouched(target)
    with pytest.raises(ValueError, match="already has an adapter named 'task2'"):
        qpeft.load_adapters(target, tmp_path / "ad")
    unchanged()
    small = TinyBlock(d=8)
    unchanged = untouched(small)
    with pytest.raises(ValueError, match="shape"):
        qpeft.load_adapters(small, tmp_path / "ad")
    unchanged()
    with pytest.raises(ValueError, match="no adapter named 'nope'"):
        qpeft.save_adapters(model, tmp_path / "ad2", ["nope"])
    assert not (tmp_path / "ad2").exists()


def test_a_checkpoint_with_the_removed_input_sharing_mode_is_refused_naming_it(tmp_path):
    model = TinyBlock()
    qpeft.update_model(model, {"adapter_cfg": {"*": {"rank": 2}}})
    qpeft.save(model, tmp_path / "ck")
    manifest = json.loads((tmp_path / "ck" / MANIFEST).read_text())
    manifest["modes"].append({"mode": "input_sharing", "config": {"enabled": True}})
    (tmp_path / "ck" / MANIFEST).write_text(json.dumps(manifest))
    fresh = TinyBlock()
    with pytest.raises(ValueError, match="'input_sharing'.*set_input_sharing was removed"):
        qpeft.restore(fresh, tmp_path / "ck")
    assert not qpeft.is_peft_model(fresh) and qpeft.state(fresh) == []
