"""Hostile or careless HF PEFT adapter files: strict values, bounded pattern matching, a clear
error naming the field, and the model untouched."""

import json
import time

import pytest
import torch

import qpeft
from tests.checkpoint.helpers import randomize_adapters, untouched
from tests.models import TinyBlock


@pytest.fixture
def exported(tmp_path):
    model = TinyBlock()
    qpeft.update_model(model, {"adapter_cfg": {"*": {"rank": 2}}})
    randomize_adapters(model)
    qpeft.export_hf_peft(model, tmp_path / "hf")
    return tmp_path / "hf"


def _edit(path, **changes):
    config = json.loads((path / "adapter_config.json").read_text())
    config.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"lora_alpha": float("inf")}, "lora_alpha must be a finite positive number"),
        ({"lora_alpha": 1e30}, "out of range"),
        ({"lora_alpha": True}, "lora_alpha must be a finite positive number"),
        ({"r": 2.0}, "r must be a positive integer"),
        ({"r": "2"}, "r must be a positive integer"),
        ({"rank_pattern": {"q_proj": 2.0}}, r"rank_pattern\['q_proj'\] must be a positive integer"),
        ({"rank_pattern": {"q_proj": True}}, "must be a positive integer"),
        ({"alpha_pattern": {"q_proj": float("nan")}}, "must be a finite positive number"),
        ({"rank_pattern": ["q_proj"]}, "rank_pattern must be a map"),
        ({"target_modules": 5}, "target_modules must be a string or a list of strings"),
        ({"target_modules": "nothing_matches"}, "which target_modules 'nothing_matches' does not"),
        ({"target_modules": ["q_proj"]}, "which target_modules"),
        ({"rank_pattern": {"(": 2}}, "not a valid regular expression"),
        ({"rank_pattern": {"x" * 600: 2}}, "at most 512 characters"),
        ({"use_rslora": "yes"}, "use_rslora must be a bool"),
    ],
)
def test_bad_config_values_are_refused(exported, changes, words):
    _edit(exported, **changes)
    model = TinyBlock()
    unchanged = untouched(model)
    with pytest.raises(ValueError, match=words):
        qpeft.import_hf_peft(model, exported)
    unchanged()


def test_a_catastrophic_pattern_is_refused_quickly(tmp_path):
    # (a|aa)+c on a name of 40 'a's backtracks through ~10^8 paths in Python's re
    name = "a" * 40
    model = torch.nn.Sequential()
    model.add_module(name, torch.nn.Linear(8, 8))
    qpeft.update_model(model, {"adapter_cfg": {"*": {"rank": 2}}})
    qpeft.export_hf_peft(model, tmp_path / "hf")
    _edit(tmp_path / "hf", rank_pattern={"(a|aa)+c": 4})
    fresh = torch.nn.Sequential()
    fresh.add_module(name, torch.nn.Linear(8, 8))
    start = time.monotonic()
    with pytest.raises(ValueError, match="takes too long to match"):
        qpeft.import_hf_peft(fresh, tmp_path / "hf")
    assert time.monotonic() - start < 10
    assert not qpeft.is_peft_model(fresh)


def test_a_string_target_modules_selecting_every_module_imports(exported):
    _edit(exported, target_modules=".*")
    model = qpeft.import_hf_peft(TinyBlock(), exported)
    assert qpeft.is_peft_model(model)
