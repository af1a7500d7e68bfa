"""Every value a manifest holds is validated with the API's rules: a hand-edited or hostile
``qpeft.json`` is refused with an error naming the field, and the model is left untouched."""

import json

import pytest
import torch

import qpeft
from qpeft.checkpoint.full import MANIFEST
from tests.checkpoint.helpers import rich_model, untouched
from tests.models import TinyBlock


def _edit(path, change):
    manifest = json.loads((path / MANIFEST).read_text())
    change(manifest)
    (path / MANIFEST).write_text(json.dumps(manifest))


def _first_flags(manifest):
    layer = next(iter(manifest["adapters"]))
    return next(iter(manifest["adapters"][layer].values()))


def _set_flag(key, value):
    return lambda m: _first_flags(m).__setitem__(key, value)


@pytest.fixture
def saved(tmp_path):
    qpeft.save(rich_model(), tmp_path / "ck")
    return tmp_path / "ck"


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (_set_flag("scale", float("nan")), "scale nan is invalid"),
        (_set_flag("scale", float("inf")), "scale inf is invalid"),
        (_set_flag("scale", 0), "scale 0 is invalid"),
        (_set_flag("scale", -1.5), "scale -1.5 is invalid"),
        (_set_flag("scale", True), "scale True is invalid"),
        (_set_flag("scale", "2"), "scale '2' is invalid"),
        (_set_flag("enable", "no"), "bools 'enable', 'merged'"),
        (_set_flag("merged", 1), "bools 'enable', 'merged'"),
        (_set_flag("extra", 1), "exactly a 'scale'"),
    ],
)
def test_bad_adapter_flags_are_refused(saved, change, words):
    _edit(saved, change)
    model = TinyBlock()
    unchanged = untouched(model)
    with pytest.raises(ValueError, match=words):
        qpeft.restore(model, saved)
    unchanged()


def test_merged_true_on_an_adapter_never_merged_is_refused(tmp_path):
    model = TinyBlock()
    qpeft.update_model(model, {"adapter_cfg": {"*": {"rank": 2}}})
    qpeft.save(model, tmp_path / "ck")
    _edit(tmp_path / "ck", _set_flag("merged", True))
    fresh = TinyBlock()
    unchanged = untouched(fresh)
    with pytest.raises(ValueError, match="merged=True, but its mode log leaves it merged=False"):
        qpeft.restore(fresh, tmp_path / "ck")
    unchanged()


@pytest.mark.parametrize("aliases", [{"a": "b", "b": "a"}, {"a": "a"}, {"a": "b", "b": "c"}])
def test_alias_chains_and_cycles_are_refused(saved, aliases):
    _edit(saved, lambda m: m.__setitem__("aliases", aliases))
    model = TinyBlock()
    with pytest.raises(ValueError, match="points at an alias"):
        qpeft.restore(model, saved)


def _adapter_file(tmp_path):
    model = TinyBlock()
    qpeft.update_model(model, {"adapter_name": "a", "adapter_cfg": {"*": {"rank": 2}}})
    qpeft.save_adapters(model, tmp_path / "ad")
    return tmp_path / "ad"


def _first_layer(manifest):
    return next(iter(manifest["adapters"]["a"]["layers"].values()))


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (lambda m: m["adapters"]["a"].__setitem__("trainable", "no"), "'trainable' must be a bool"),
        (lambda m: _first_layer(m).__setitem__("rank", "8"), "rank"),
        (lambda m: _first_layer(m).__setitem__("rank", True), "rank"),
        (lambda m: _first_layer(m).__setitem__("scale", float("inf")), "scale"),
        (lambda m: _first_layer(m).__setitem__("enable", "no"), "enable"),
        (lambda m: m["adapters"]["a"].__setitem__("skipped_projections", {"x": [1]}), "skipped"),
    ],
)
def test_bad_adapter_file_values_are_refused(tmp_path, change, words):
    path = _adapter_file(tmp_path)
    _edit(path, change)
    model = TinyBlock()
    unchanged = untouched(model)
    with pytest.raises(ValueError, match=words):
        qpeft.load_adapters(model, path)
    unchanged()
    assert not qpeft.is_peft_model(model)


def test_a_valid_checkpoint_still_restores(saved):
    restored = qpeft.restore(TinyBlock(), saved)
    assert qpeft.is_peft_model(restored)
    assert all(
        torch.isfinite(t).all() for t in restored.state_dict().values() if t.is_floating_point()
    )
