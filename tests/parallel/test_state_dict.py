"""Gathered state dicts and torch.distributed.checkpoint for sharded LoRA models (2 gloo ranks)."""

import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp

import qpeft
from tests.models import TinyBlock
from tests.parallel.cases import block_batch, block_model, trained_block
from tests.parallel.checks import assert_close, assert_same_tensors, load

WORLD = 2


@pytest.mark.parametrize("engine", ["fsdp2", "tp", "ddp"])
def test_gathered_state_dict_has_single_process_keys_and_values(outdir, engine):
    ref = trained_block().state_dict()
    adapters = {k: v for k, v in ref.items() if qpeft.parallel.is_adapter_key(k)}
    assert len(adapters) == 14  # 2 factors of a on 5 layers and of b on the 2 MLP layers
    for rank in range(WORLD):
        record = load(outdir, "sd_gathered", rank)
        assert_same_tensors(record[engine], ref, f"{engine} rank {rank}")
        assert_same_tensors(
            record[engine + "_adapters"], adapters, f"{engine} rank {rank} adapters"
        )
        assert record[engine + "_rank0"] == (sorted(ref) if rank == 0 else [])


@pytest.mark.parametrize("engine", ["fsdp2", "tp"])
def test_full_state_dict_loads_into_sharded_models(outdir, engine):
    want = trained_block()(block_batch()[0]).detach()
    for rank in range(WORLD):
        assert_close(load(outdir, "sd_load_full", rank)[engine], want, f"{engine} rank {rank}")


@pytest.mark.parametrize("saved_by", ["tp", "fsdp2"])
def test_dcp_checkpoint_reloads_across_layouts(outdir, saved_by):
    want = trained_block()(block_batch()[0]).detach()
    for rank in range(WORLD):
        assert_close(load(outdir, "sd_dcp", rank)[saved_by], want, f"{saved_by} -> tp rank {rank}")
    single = block_model()  # and into one process, without a process group
    state = single.state_dict()
    with warnings.catch_warnings():  # "torch.distributed is ... uninitialized": intended here
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, checkpoint_id=outdir / f"dcp_{saved_by}", no_dist=True)
    single.load_state_dict(state)
    assert_same_tensors(
        single.state_dict(), trained_block().state_dict(), f"{saved_by} -> one process"
    )


def test_qpeft_save_of_a_gathered_sharded_model_restores_on_one_process(outdir):
    restored = qpeft.restore(TinyBlock(16), outdir / "qpeft_ckpt")
    assert_same_tensors(restored.state_dict(), trained_block().state_dict(), "restored")
    assert qpeft.state(restored) == qpeft.state(trained_block())


# -- one process: errors leave the model as it was -----------------------------------------------
def _same(model, before):
    return all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_full_state_dict_of_a_plain_model_is_its_state_dict():
    model = block_model()
    assert_same_tensors(qpeft.full_state_dict(model), model.state_dict(), "plain")


def test_load_adapters_only_keeps_the_base():
    model, source = block_model(), trained_block()
    base_before = model.state_dict()["mlp.up.weight"].clone()
    qpeft.load_full_state_dict(model, qpeft.full_state_dict(source, adapters_only=True))
    assert_same_tensors(
        qpeft.full_state_dict(model, adapters_only=True),
        qpeft.full_state_dict(source, adapters_only=True),
        "adapters",
    )
    assert torch.equal(model.state_dict()["mlp.up.weight"], base_before)


@pytest.mark.parametrize(
    ("edit", "error", "match"),
    [
        (
            lambda sd: sd.update({"mlp.up.adapters.zz.lora_a": torch.zeros(1)}),
            KeyError,
            "adapters.zz",
        ),
        (lambda sd: sd.pop("mlp.up.weight"), KeyError, "lacks keys .*mlp.up.weight"),
        (lambda sd: sd.pop("mlp.up.adapters.b.lora_a"), KeyError, "mlp.up.adapters.b.lora_a"),
        (
            lambda sd: sd.update({"mlp.up.adapters.a.lora_b": torch.zeros(3, 4)}),
            ValueError,
            r"'mlp.up.adapters.a.lora_b': shape \(3, 4\)",
        ),
    ],
)
def test_bad_state_dict_is_rejected_untouched(edit, error, match):
    model = block_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bad = {k: v + 1 for k, v in trained_block().state_dict().items()}
    edit(bad)
    with pytest.raises(error, match=match):
        qpeft.load_full_state_dict(model, bad)
    assert _same(model, before)


def test_adapters_only_state_dict_of_a_moe_model_holds_every_expert_factor():
    from tests.models import MOE_MODELS

    model = MOE_MODELS["qwen3_moe"]()
    qpeft.update_model(model, {"adapter_cfg": {"*": {"rank": 2}}})
    adapters = qpeft.full_state_dict(model, adapters_only=True)
    experts = [k for k in model.state_dict() if ".experts.adapters." in k]
    assert len(experts) == 2 * 2 * 2  # 2 layers x 2 projections x (lora_a, lora_b)
    assert "model.layers.0.mlp.experts.adapters.default.gate_up_proj.lora_a" in experts
    assert set(experts) <= set(adapters)
    assert all(qpeft.parallel.is_adapter_key(k) for k in adapters)
    fresh = MOE_MODELS["qwen3_moe"]()
    qpeft.update_model(fresh, {"adapter_cfg": {"*": {"rank": 2}}})
    qpeft.load_full_state_dict(fresh, adapters)  # adapters only: the base is kept
    assert len(adapters) == 26  # the dict passed is not filled with the model's other keys
    assert_same_tensors(qpeft.full_state_dict(fresh, adapters_only=True), adapters, "moe")
