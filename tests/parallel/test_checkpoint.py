"""qpeft.save / save_adapters / load_adapters / restore on sharded models (2 gloo ranks) vs. one
process."""

import pytest
import torch

import qpeft
from qpeft.checkpoint.files import read_json
from qpeft.checkpoint.tensor_files import read_header
from tests.models import TinyBlock, tiny_gpt2
from tests.parallel.cases import block_batch, block_model, gpt2_model, trained_block
from tests.parallel.checks import assert_close, assert_same_tensors, load

WORLD = 2
FILES = {
    "": ("qpeft.json", "model.safetensors"),
    "_adapters": ("qpeft.json", "adapters.safetensors"),
}


def _adapters(model):
    return {k: v for k, v in model.state_dict().items() if qpeft.parallel.is_adapter_key(k)}


@pytest.mark.parametrize("engine", ["fsdp2", "tp"])
def test_save_on_sharded_ranks_restores_on_one_process(outdir, engine):
    restored = qpeft.restore(TinyBlock(16), outdir / f"ck_{engine}")
    ref = trained_block()
    assert_same_tensors(restored.state_dict(), ref.state_dict(), f"{engine} restored")
    assert qpeft.state(restored) == qpeft.state(ref)
    out = restored(block_batch()[0]).detach()
    for rank in range(WORLD):
        record = load(outdir, "ck_save_sharded", rank)[engine]
        assert_close(out, record["out"], f"{engine} rank {rank}: restored vs. sharded output")
        assert record["seen"] == [
            "model.safetensors",
            "qpeft.json",
        ]  # written before any rank returned


@pytest.mark.parametrize("engine", ["fsdp2", "tp"])
def test_adapter_file_saved_on_sharded_ranks_loads_on_one_process(outdir, engine):
    loaded = qpeft.load_adapters(TinyBlock(16), outdir / f"ck_{engine}_adapters")
    assert_same_tensors(_adapters(loaded), _adapters(trained_block()), f"{engine} adapters")


@pytest.mark.parametrize("engine", ["fsdp2", "tp"])
@pytest.mark.parametrize("kind", sorted(FILES))
def test_sharded_save_writes_the_single_process_files(outdir, tmp_path, engine, kind):
    single = tmp_path / "single"
    (qpeft.save_adapters if kind else qpeft.save)(trained_block(), single)
    manifest, tensors = FILES[kind]
    sharded = outdir / f"ck_{engine}{kind}"
    assert read_json(sharded / manifest) == read_json(single / manifest)
    assert read_header(sharded / tensors) == read_header(single / tensors)


@pytest.mark.parametrize("engine", ["fsdp2", "tp"])
def test_tied_weights_are_stored_once_as_on_one_process(outdir, tmp_path, engine):
    qpeft.save(gpt2_model(), tmp_path / "single")
    aliases = read_json(outdir / f"ck_gpt2_{engine}" / "qpeft.json")["aliases"]
    assert aliases == read_json(tmp_path / "single" / "qpeft.json")["aliases"]
    assert aliases == {"lm_head.weight": "transformer.wte.weight"}
    restored = qpeft.restore(tiny_gpt2(), outdir / f"ck_gpt2_{engine}")
    want = gpt2_model().state_dict()
    assert all(
        torch.equal(v, want[k]) for k, v in restored.state_dict().items()
    )  # gathering is exact


def test_ddp_model_is_saved_locally_by_each_rank(outdir):
    want = block_model().state_dict()
    for rank in range(WORLD):
        restored = qpeft.restore(TinyBlock(16), outdir / f"ck_ddp_r{rank}")
        assert sorted(restored.state_dict()) == sorted(want)
        assert all(torch.equal(v, want[k]) for k, v in restored.state_dict().items())


def test_only_rank_0_writes_and_no_temporary_directory_is_left(outdir):
    assert (outdir / "ck_only_r0" / "adapters.safetensors").is_file()
    assert not (outdir / "ck_only_r1").exists()
    assert not list(outdir.glob(".ck_*"))


def test_a_failed_write_on_rank_0_raises_on_every_rank_and_writes_nothing(outdir):
    errors = [load(outdir, "ck_rank0_writes", rank)["error"] for rank in range(WORLD)]
    assert errors[0].startswith("FileExistsError:") and "holds notes.txt" in errors[0]
    assert errors[1].startswith("RuntimeError: rank 0 failed to write") and errors[0] in errors[1]
    assert [p.name for p in (outdir / "ck_blocked").iterdir()] == ["notes.txt"]


def _with_b_disabled(model):
    return qpeft.disable_adapters(model, adapters_to_disable="b")


@pytest.mark.parametrize("engine", ["fsdp2", "tp"])
def test_load_adapters_into_sharded_models_matches_one_process(outdir, engine):
    ref = _with_b_disabled(trained_block())
    want = ref(block_batch()[0]).detach()
    assert not torch.allclose(
        want, _with_b_disabled(block_model())(block_batch()[0])
    )  # loading matters
    for rank in range(WORLD):
        record = load(outdir, "ck_load_adapters", rank)[engine]
        assert_close(record["out"], want, f"{engine} rank {rank} output")  # b disabled as saved
        assert_same_tensors(record["params"], _adapters(ref), f"{engine} rank {rank} adapters")


def test_load_adapters_into_a_sharded_model_refuses_to_add_adapters(outdir):
    for rank in range(WORLD):
        record = load(outdir, "ck_load_adapters", rank)
        assert "has no adapter 'b'" in record["error"] and "before sharding" in record["error"]
        assert record["untouched"]


@pytest.mark.parametrize("engine", ["fsdp2", "tp"])
def test_restore_then_shard_matches_one_process(outdir, engine):
    want = trained_block()(block_batch()[0]).detach()
    for rank in range(WORLD):
        assert_close(
            load(outdir, "ck_restore_then_shard", rank)[engine], want, f"{engine} rank {rank}"
        )


def test_restore_into_a_sharded_model_is_refused(outdir):
    for rank in range(WORLD):
        error = load(outdir, "ck_restore_then_shard", rank)["error"]
        assert "sharded" in error and "then shard it" in error
