"""The mode log stays proportional to the model's structure: superseded toggles and the history of
deleted adapters are compacted away, and the compacted log restores the same model."""

import json

import torch

import qpeft
from qpeft.checkpoint.full import MANIFEST
from tests.checkpoint.helpers import X, assert_same, randomize_adapters
from tests.models import TinyBlock


def _model():
    torch.manual_seed(0)
    model = TinyBlock()
    qpeft.update_model(model, {"adapter_name": "keep", "adapter_cfg": {"*": {"rank": 2}}})
    randomize_adapters(model)
    return model


def test_add_delete_cycles_do_not_grow_the_log(tmp_path):
    model = _model()
    baseline = qpeft.state(model)
    for _ in range(300):
        qpeft.update_model(model, {"adapter_name": "tmp", "adapter_cfg": {"*": {"rank": 4}}})
        qpeft.disable_adapters(model, adapters_to_disable="tmp")
        qpeft.delete_adapter(model, "tmp")
    assert qpeft.state(model) == baseline
    qpeft.save(model, tmp_path / "ck")
    assert_same(qpeft.restore(TinyBlock(), tmp_path / "ck"), model)


def test_many_toggles_leave_one_entry_per_flag_and_pair(tmp_path):
    model = _model()
    for i in range(2000):
        toggle = qpeft.enable_adapters if i % 2 else qpeft.disable_adapters
        toggle(model)
    qpeft.disable_adapters(model, layers_to_disable="mlp*")
    modes = [e["mode"] for e in qpeft.state(model)]
    assert modes == ["peft", "enable_adapters", "disable_adapters"]
    qpeft.save(model, tmp_path / "ck")
    assert (tmp_path / "ck" / MANIFEST).stat().st_size < 20_000
    restored = qpeft.restore(TinyBlock(), tmp_path / "ck")
    assert_same(restored, model)
    enabled = {
        ln: layer.adapters["keep"].enable for ln, layer in qpeft.lora_layers(restored).items()
    }
    assert enabled and all(on == (not ln.startswith("mlp")) for ln, on in enabled.items())


def test_a_compacted_log_replays_to_the_same_model(tmp_path):
    model = _model()
    qpeft.update_model(model, {"adapter_name": "b", "adapter_cfg": {"mlp*": {"rank": 3}}})
    randomize_adapters(model, seed=2)
    qpeft.freeze_lora_weights(model, adapter_patterns="b")
    qpeft.merge_adapters(model, "b")
    qpeft.unmerge_adapters(model)
    qpeft.unfreeze_lora_weights(model, adapter_patterns="b")
    qpeft.delete_adapter(model, "b")
    qpeft.update_model(model, {"adapter_name": "b", "adapter_cfg": {"*attn*": {"rank": 5}}})
    qpeft.merge_adapters(model, "keep")
    log = qpeft.state(model)
    assert all(e["config"].get("name") != "b" for e in log)  # no deletion recorded
    assert [e["config"]["adapter_cfg"] for e in log if e["mode"] == "peft"][1].keys() == {
        n for n in qpeft.lora_layers(model) if "attn" in n
    }
    qpeft.save(model, tmp_path / "ck")
    assert_same(qpeft.restore(TinyBlock(), tmp_path / "ck"), model)
    assert json.loads(json.dumps(log)) == log


def test_deleting_every_adapter_restores_the_same_values(tmp_path):
    model = _model()
    qpeft.delete_adapter(model, "keep")
    assert qpeft.state(model) == []
    qpeft.save(model, tmp_path / "ck")
    restored = qpeft.restore(TinyBlock(), tmp_path / "ck")
    for key, value in model.state_dict().items():
        assert torch.equal(value, restored.state_dict()[key])
    with torch.no_grad():
        assert torch.equal(model(X), restored(X))


def test_a_log_written_before_compaction_still_restores(tmp_path):
    model = _model()
    qpeft.save(model, tmp_path / "ck")
    manifest = json.loads((tmp_path / "ck" / MANIFEST).read_text())
    extra = {"adapter_name": "gone", "adapter_cfg": {"mlp.up": {"rank": 2}}}
    manifest["modes"] += [
        {"mode": "peft", "config": {**manifest["modes"][0]["config"], **extra}},
        {"mode": "disable_adapters", "config": {"selection": {"mlp.up": ["gone", "keep"]}}},
        {"mode": "enable_adapters", "config": {"selection": {"mlp.up": ["keep"]}}},
        {"mode": "delete_adapter", "config": {"name": "gone"}},
    ]
    (tmp_path / "ck" / MANIFEST).write_text(json.dumps(manifest))
    restored = qpeft.restore(TinyBlock(), tmp_path / "ck")
    assert [e["mode"] for e in qpeft.state(restored)] == ["peft", "enable_adapters"]
    with torch.no_grad():
        assert torch.equal(restored(X), model(X))


def test_deleting_every_adapter_of_a_quantized_model_restores_it(tmp_path):
    model = TinyBlock()
    qpeft.quantize(model, "int8_weight_only")
    qpeft.update_model(model, {"adapter_cfg": {"*": {"rank": 2}}})
    qpeft.delete_adapter(model, "default")
    qpeft.save(model, tmp_path / "ck")
    restored = qpeft.restore(TinyBlock(), tmp_path / "ck")
    with torch.no_grad():
        assert torch.equal(model(X), restored(X))
