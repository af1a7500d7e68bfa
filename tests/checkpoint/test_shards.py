"""export_hf_checkpoint(..., max_shard_size=...): transformers' sharded safetensors layout."""

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

import qpeft
from tests.checkpoint.helpers import deploy_llama

transformers = pytest.importorskip("transformers")
pytest.importorskip("compressed_tensors")
from transformers.utils.quantization_config import CompressedTensorsConfig  # noqa: E402


def _load(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoModelForCausalLM.from_pretrained(
            path, quantization_config=CompressedTensorsConfig(dequantize=True)
        )


def _shard_names(path):
    return sorted(p.name for p in path.iterdir() if p.name.endswith(".safetensors"))


def test_sharded_checkpoint_loads_in_transformers_to_the_same_weights(tmp_path):
    model = deploy_llama("nvfp4_weight_only")
    whole = qpeft.export_hf_checkpoint(model, tmp_path / "whole")
    sharded = qpeft.export_hf_checkpoint(model, tmp_path / "sharded", max_shard_size="60KB")
    assert _shard_names(whole) == ["model.safetensors"]
    assert not (whole / "model.safetensors.index.json").exists()
    names = _shard_names(sharded)
    n = len(names)
    assert n > 2 and names == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    everything = load_file(str(whole / "model.safetensors"))
    assert index["weight_map"].keys() == everything.keys()
    total = sum(t.numel() * t.element_size() for t in everything.values())
    assert index["metadata"]["total_size"] == total
    for name in names:  # each shard under the limit unless it holds a single larger tensor
        shard = load_file(str(sharded / name))
        size = sum(t.numel() * t.element_size() for t in shard.values())
        assert size <= 60_000 or len(shard) == 1, name
        assert all(index["weight_map"][k] == name for k in shard)
        assert all(
            torch.equal(v.view(-1).view(torch.uint8), everything[k].view(-1).view(torch.uint8))
            for k, v in shard.items()
        )
    a, b = _load(whole).state_dict(), _load(sharded).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    qpeft.export_hf_checkpoint(model, sharded)  # its own sharded directory is replaced
    assert _shard_names(sharded) == ["model.safetensors"]


@pytest.mark.parametrize(
    ("limit", "same_as"), [("60KB", 60_000), ("59KiB", 59 * 1024), ("480Kb", 60_000)]
)
def test_sizes_follow_transformers_units(tmp_path, limit, same_as):
    model = deploy_llama("fp8")
    a = qpeft.export_hf_checkpoint(model, tmp_path / "a", max_shard_size=limit, format="modelopt")
    b = qpeft.export_hf_checkpoint(model, tmp_path / "b", max_shard_size=same_as, format="modelopt")
    index_a = json.loads((a / "model.safetensors.index.json").read_text())
    index_b = json.loads((b / "model.safetensors.index.json").read_text())
    assert index_a == index_b and (a / "hf_quant_config.json").is_file()


@pytest.mark.parametrize("bad", ["5 GB", "GB", "0MB", "5TB", 0, -1, True, 1.5, None])
def test_bad_shard_sizes_are_refused_before_anything_is_written(tmp_path, bad):
    model = deploy_llama("fp8")
    with pytest.raises(ValueError, match="max_shard_size"):
        qpeft.export_hf_checkpoint(model, tmp_path / "hf", max_shard_size=bad)
    assert not (tmp_path / "hf").exists()
