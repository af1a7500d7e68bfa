"""Checkpoints and adapter tools on compressed models: save/restore bit-exact and small, adapter
files, HF PEFT export, per-sample adapter routing."""

import copy
import os

import torch

import qpeft
from qpeft.quant import CompressedLinear
from tests.models import TinyBlock
from tests.quant.bitwise import assert_bits_equal

LORA = {
    "adapter_cfg": {
        "*": {"rank": 4, "lora_b_init": "torch.nn.init.normal_"},
        "*lm_head*": {"enable": False},
    }
}
X = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(3))


def _model(preset="nvfp4", dtype=torch.float32, lora_first=True):
    torch.manual_seed(0)
    model = TinyBlock().to(dtype)
    model = qpeft.quantize(model, preset, forward_loop=lambda m: m(X.to(dtype)))
    model.requires_grad_(False)
    if lora_first:
        qpeft.update_model(model, LORA)
    reference = copy.deepcopy(model)
    model = qpeft.compress(model, layer_patterns="*")
    if not lora_first:
        for m in (model, reference):
            torch.manual_seed(1)
            qpeft.update_model(m, LORA)
    return model, reference


def _size(path):
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))


def test_save_and_restore_are_bit_exact_and_the_checkpoint_is_small(tmp_path):
    for preset, dtype in [
        ("nvfp4", torch.float32),
        ("int4", torch.bfloat16),
        ("int8", torch.float32),
    ]:
        model, reference = _model(preset, dtype, lora_first=preset != "int4")
        qpeft.save(model, tmp_path / preset)
        qpeft.save(reference, tmp_path / f"{preset}_dense")
        assert _size(tmp_path / preset) < _size(tmp_path / f"{preset}_dense")
        restored = qpeft.restore(TinyBlock().to(dtype), tmp_path / preset)
        assert isinstance(restored.attn.q_proj.base, CompressedLinear)
        a, b = model.state_dict(), restored.state_dict()
        assert a.keys() == b.keys()
        for key in a:
            assert a[key].dtype == b[key].dtype and torch.equal(
                a[key].view(torch.uint8) if a[key].dtype == torch.float8_e4m3fn else a[key],
                b[key].view(torch.uint8) if b[key].dtype == torch.float8_e4m3fn else b[key],
            ), key
        x = X.to(dtype)
        assert_bits_equal(restored(x), reference(x))
        assert [p for p in restored.parameters() if p.requires_grad]  # adapters still train


def test_restore_refuses_a_model_of_another_dtype(tmp_path):
    model, _ = _model("int8")
    qpeft.save(model, tmp_path / "c")
    fresh = TinyBlock().to(torch.bfloat16)
    check = copy.deepcopy(fresh.state_dict())
    try:
        qpeft.restore(fresh, tmp_path / "c")
    except ValueError as err:
        assert "compress" in str(err)
    else:
        raise AssertionError("restore accepted a bf16 model for an fp32 checkpoint")
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in check.items())


def test_save_adapters_and_load_adapters_on_compressed_models(tmp_path):
    model, reference = _model("nvfp4")
    qpeft.save_adapters(model, tmp_path / "a")
    other, _ = _model("nvfp4")
    qpeft.delete_adapter(other, "default")
    qpeft.load_adapters(other, tmp_path / "a")
    assert_bits_equal(other(X), reference(X))


def test_export_hf_peft_on_a_compressed_model_writes_the_same_adapter(tmp_path):
    from safetensors.torch import load_file

    model, reference = _model("int8", lora_first=False)
    qpeft.export_hf_peft(model, tmp_path / "c")
    qpeft.export_hf_peft(reference, tmp_path / "r")
    a = load_file(tmp_path / "c" / "adapter_model.safetensors")
    b = load_file(tmp_path / "r" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_adapter_routing_on_a_compressed_model_matches_the_fake_quantized_one():
    model, reference = _model("int8_weight_only")
    for m in (model, reference):
        torch.manual_seed(2)
        qpeft.update_model(m, {**LORA, "adapter_name": "other"})
    names = ["default", None, "other"]
    outs = []
    for m in (model, reference):
        with qpeft.adapter_routing(m, names):
            outs.append(m(X))
    assert_bits_equal(outs[0], outs[1])


def test_ddp_leaves_the_packed_buffers_alone_after_compress_and_restore(tmp_path):
    """DDP reads ``_ddp_params_and_buffers_to_ignore`` (torch's contract): the packed codes and
    scales are frozen and equal on every rank, and gloo cannot broadcast fp8 scales (the 2-rank
    DDP tests in tests/parallel run nvfp4 through it)."""
    packed = ("weight_packed", "weight_scale", "weight_scale_2")
    for lora_first in (True, False):  # adapters after compress rename the packed buffers
        model, _ = _model("nvfp4", lora_first=lora_first)
        want = sorted(n for n, _ in model.named_buffers() if n.rsplit(".", 1)[-1] in packed)
        assert want and model._ddp_params_and_buffers_to_ignore == want
        assert lora_first or "attn.q_proj.base.base.weight_packed" in want
        qpeft.save(model, tmp_path / str(lora_first))
        restored = qpeft.restore(TinyBlock(), tmp_path / str(lora_first))
        assert restored._ddp_params_and_buffers_to_ignore == want
    assert not hasattr(_model("nvfp4")[1], "_ddp_params_and_buffers_to_ignore")  # not compressed
