"""``compress`` on grouped HF experts: bit-exact runs, restore, nothing dense, refusals."""

import copy

import pytest
import torch

import qpeft
from tests.models import MOE_MODELS, token_ids
from tests.quant.bitwise import assert_bits_equal

LORA = {"adapter_cfg": {"*": {"rank": 4, "lora_b_init": "torch.nn.init.normal_"}}}


def _moe(preset, dtype=torch.float32, lora=True):
    torch.manual_seed(0)
    ids = token_ids()
    model = MOE_MODELS["qwen3_moe"]().to(dtype)
    model = qpeft.quantize(model, preset, forward_loop=lambda m: m(input_ids=ids))
    model.requires_grad_(False)
    if lora:
        qpeft.update_model(model, LORA)
    return model, ids


def _run(model, ids):
    y = model(input_ids=ids).logits
    (y.float() * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    return y, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def _assert_same(a, b):
    assert_bits_equal(a[0], b[0])
    assert a[1].keys() == b[1].keys()
    for name in a[1]:
        assert_bits_equal(a[1][name], b[1][name])


@pytest.mark.parametrize("preset", ["int8", "fp8", "int4", "nvfp4", "mxfp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compressed_experts_run_bit_identically_with_adapters_on_them(preset, dtype):
    model, ids = _moe(preset, dtype)
    reference = copy.deepcopy(model)
    model = qpeft.compress(model)
    experts = model.model.layers[0].mlp.experts
    assert type(experts.base).__name__ == "CompressedHFExperts"
    ref = _run(reference, ids)
    assert any("experts" in n for n in ref[1])
    _assert_same(_run(model, ids), ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_adapters_attach_to_experts_after_compress(dtype, tmp_path):
    """A new adapter (update_model, load_adapters) on packed experts takes the compute dtype and
    device without a dense weight, and runs as on the fake-quantized model."""
    model, ids = _moe("nvfp4", dtype, lora=False)
    reference = copy.deepcopy(model)
    model = qpeft.compress(model)
    for m in (model, reference):
        torch.manual_seed(3)
        qpeft.update_model(m, LORA)
    adapter = model.model.layers[0].mlp.experts.adapters["default"]
    assert {p.dtype for p in adapter.parameters()} == {dtype}
    _assert_same(_run(model, ids), _run(reference, ids))
    qpeft.save_adapters(model, tmp_path / "a")
    qpeft.delete_adapter(model, "default")
    qpeft.load_adapters(model, tmp_path / "a")
    reference.zero_grad(set_to_none=True)
    _assert_same(_run(model, ids), _run(reference, ids))


def test_no_dense_expert_weight_is_kept_or_saved_for_backward():
    model, ids = _moe("nvfp4")
    raw = model.model.layers[0].mlp.experts.base
    dense = {tuple(raw.gate_up_proj.shape), tuple(raw.down_proj.shape)}
    model = qpeft.compress(model)
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if "adapters" not in name and t.is_floating_point():
            assert tuple(t.shape) not in dense, name
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids).logits.sum()
    assert saved and not dense & set(saved)


def test_save_and_restore_of_compressed_experts_are_bit_exact(tmp_path):
    model, ids = _moe("nvfp4")
    model = qpeft.compress(model)
    qpeft.save(model, tmp_path / "c")
    torch.manual_seed(1)
    restored = qpeft.restore(MOE_MODELS["qwen3_moe"](), tmp_path / "c")
    keys = model.state_dict().keys()
    assert "model.layers.0.mlp.experts.gate_up_proj_packed" in keys
    assert restored.state_dict().keys() == keys
    for k, v in model.state_dict().items():
        r = restored.state_dict()[k]
        same = torch.equal(r.reshape(-1).view(torch.uint8), v.reshape(-1).view(torch.uint8))
        assert r.dtype == v.dtype and same, k
    with torch.no_grad():
        assert_bits_equal(restored(input_ids=ids).logits, model(input_ids=ids).logits)


def test_compressed_experts_refuse_what_needs_the_master_weight():
    model, _ = _moe("int8")
    model = qpeft.compress(model, layer_patterns="*mlp.experts*")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"merge_adapters.*mlp\.experts.*compressed"):
        qpeft.merge_adapters(model)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_trainable_expert_weights_are_refused_naming_the_layer():
    model, _ = _moe("int8", lora=False)
    model.model.layers[0].mlp.experts.gate_up_proj.requires_grad_(True)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.experts.*trainable"):
        qpeft.compress(model)
    assert not any(k.endswith("_packed") for k in model.state_dict())
