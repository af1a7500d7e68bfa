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


def _quantized_adapted(tmp_path):
    model = TinyBlock(d=32)
    qpeft.quantize(
        model, "mxfp4"
    )  # no amax: nothing in the tensor file tells the layer is quantized
    qpeft.update_model(model, {"adapter_cfg": {"*": {"rank": 2}}})
    qpeft.save(model, tmp_path / "ck")
    return tmp_path / "ck"


def test_a_log_that_lost_a_quantizer_entry_is_refused(tmp_path):
    path = _quantized_adapted(tmp_path)
    _edit(path, lambda m: m["modes"][0]["config"]["layers"].pop("attn.q_proj"))
    model = TinyBlock(d=32)
    unchanged = untouched(model)
    with pytest.raises(
        ValueError,
        match="'attn.q_proj' a LoRALinear, but the saved model had a LoRALinear/QuantLinear",
    ):
        qpeft.restore(model, path)
    unchanged()


def test_a_checkpoint_without_the_wrappers_field_still_restores(tmp_path):
    path = _quantized_adapted(tmp_path)
    _edit(path, lambda m: m.pop("wrappers"))
    restored = qpeft.restore(TinyBlock(d=32), path)
    assert type(restored.attn["q_proj"].base).__name__ == "QuantLinear"


def test_a_malformed_wrappers_field_is_refused(saved):
    _edit(saved, lambda m: m.__setitem__("wrappers", ["x"]))
    with pytest.raises(ValueError, match="'wrappers' must map module paths to class names"):
        qpeft.restore(TinyBlock(), saved)


def test_restoring_into_a_meta_device_model_is_refused(saved):
    with torch.device("meta"):
        model = TinyBlock()
    with pytest.raises(ValueError, match="on the meta device"):
        qpeft.restore(model, saved)
    assert not qpeft.is_peft_model(model)


def _set_rank(rank):
    def change(manifest):
        for entry in manifest["modes"]:
            if entry["mode"] == "peft":
                for attrs in entry["config"]["adapter_cfg"].values():
                    attrs["rank"] = rank

    return change


def test_a_huge_rank_in_the_log_is_refused_before_allocating(tmp_path):
    model = TinyBlock()
    qpeft.update_model(model, {"adapter_cfg": {"*": {"rank": 2}}})
    qpeft.save(model, tmp_path / "ck")
    _edit(tmp_path / "ck", _set_rank(1_000_000))
    with pytest.raises(ValueError, match="asks for rank 1000000.*nothing was allocated"):
        qpeft.restore(TinyBlock(), tmp_path / "ck")


def test_a_huge_rank_in_an_adapter_file_is_refused_before_allocating(tmp_path):
    path = _adapter_file(tmp_path)
    _edit(path, lambda m: _first_layer(m).__setitem__("rank", 1_000_000))
    model = TinyBlock()
    with pytest.raises(ValueError, match="asks for rank 1000000"):
        qpeft.load_adapters(model, path)
    assert not qpeft.is_peft_model(model)


def test_a_huge_amax_shape_is_refused_before_allocating(tmp_path):
    model = TinyBlock()
    qpeft.quantize(model, "int8_weight_only")
    qpeft.save(model, tmp_path / "ck")

    def change(manifest):
        info = next(iter(manifest["modes"][0]["config"]["layers"].values()))["weight_quantizer"]
        info["amax_shape"] = [1 << 20, 1 << 20]

    _edit(tmp_path / "ck", change)
    with pytest.raises(ValueError, match=r"amax shape \[1048576, 1048576\]"):
        qpeft.restore(TinyBlock(), tmp_path / "ck")


def test_a_tensor_file_linked_from_outside_the_folder_is_refused(tmp_path, saved):
    outside = tmp_path / "elsewhere.safetensors"
    (saved / "model.safetensors").rename(outside)
    (saved / "model.safetensors").symlink_to(outside)
    with pytest.raises(ValueError, match="symbolic link to .*outside the checkpoint folder"):
        qpeft.restore(TinyBlock(), saved)
    assert outside.exists()


def _compressed(tmp_path):
    model = TinyBlock(d=32)
    qpeft.quantize(model, "int4")
    model.requires_grad_(False)
    qpeft.compress(model)
    qpeft.save(model, tmp_path / "ck")
    return tmp_path / "ck"


def _spec_of_first_layer(manifest):
    entry = next(e for e in manifest["modes"] if e["mode"] == "compress")
    return next(iter(entry["config"]["layers"].values()))["spec"]


@pytest.mark.parametrize(
    ("key", "value", "words"),
    [
        ("num_bits", "4", "packing spec: invalid num_bits"),
        ("num_bits", True, "packing spec: invalid num_bits"),
        ("shape", [1 << 30, 1 << 30], "the log and the checkpoint disagree"),
        ("fmt", "nvfp4", "the log and the checkpoint disagree"),
        ("narrow_range", "no", "packing spec: invalid narrow_range"),
    ],
)
def test_a_tampered_packing_spec_is_refused(tmp_path, key, value, words):
    path = _compressed(tmp_path)
    _edit(path, lambda m: _spec_of_first_layer(m).__setitem__(key, value))
    model = TinyBlock(d=32)
    unchanged = untouched(model)
    with pytest.raises(ValueError, match=words):
        qpeft.restore(model, path)
    unchanged()


def test_a_compress_entry_with_an_unknown_dtype_is_refused_naming_it(tmp_path):
    path = _compressed(tmp_path)

    def change(manifest):
        entry = next(e for e in manifest["modes"] if e["mode"] == "compress")
        next(iter(entry["config"]["layers"].values()))["dtype"] = "float64"

    _edit(path, change)
    with pytest.raises(ValueError, match="needs a 'spec' and a 'dtype' among"):
        qpeft.restore(TinyBlock(d=32), path)
