"""LoRA on Megatron-Core's GroupedMLP, on CPU (torch grouped_mm), against a per-expert loop.

GroupedMLP's own forward needs CUDA's grouped_gemm package and bf16, so the reference here is a
plain loop over experts on the weights' ``[E, in, out]`` views; the builders (with their test-only
shims) are in :mod:`tests.lora.layer_kinds`, and the invariants every layer kind keeps (B = 0,
merge, disable, save/restore, export) are checked in ``tests/lora/test_layer_invariants.py``.
"""

import os

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("megatron.core")

import qpeft  # noqa: E402
from tests.lora.layer_kinds import EXPERTS, FFN, HIDDEN, grouped_reference  # noqa: E402
from tests.lora.layer_kinds import SingleGroup as _Group  # noqa: E402
from tests.lora.layer_kinds import expert_rows as _inputs  # noqa: E402
from tests.lora.layer_kinds import grouped_mlp as _grouped_mlp  # noqa: E402
from tests.tolerances import BF16_ATOL, BF16_RTOL, FP32_ATOL, FP32_RTOL  # noqa: E402

RANK, SCALE = 4, 0.5
RANDOM_B = {"*experts": {"rank": RANK, "scale": SCALE, "lora_b_init": "torch.nn.init.normal_"}}
TOL = {
    torch.float32: {"atol": FP32_ATOL, "rtol": FP32_RTOL},
    torch.bfloat16: {"atol": BF16_ATOL, "rtol": BF16_RTOL},
}


def _reference(model, x, counts, probs, with_lora=True):
    return grouped_reference(model, x, counts, probs, "default" if with_lora else None, SCALE)


@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_matches_per_expert_loop(gated, dtype):
    model = _grouped_mlp(gated, dtype)
    x, counts, probs = _inputs(dtype)
    qpeft.update_model(model, {"adapter_cfg": {"*experts": {"rank": RANK, "scale": SCALE}}})
    layer = model.experts
    assert type(layer).__name__ == "LoRAGroupedMLP"
    fc1_out = 2 * FFN if gated else FFN
    assert layer.adapters["default"].factors["fc1"].lora_a.shape == (EXPERTS, RANK, HIDDEN)
    assert layer.adapters["default"].factors["fc1"].lora_b.shape == (EXPERTS, fc1_out, RANK)
    assert layer.adapters["default"].factors["fc2"].lora_b.shape == (EXPERTS, HIDDEN, RANK)
    with torch.no_grad():
        base = _reference(model, x, counts, probs, with_lora=False)
        torch.testing.assert_close(model(x, counts, probs), base, **TOL[dtype])  # B = 0
        for factors in layer.adapters["default"].factors.values():
            factors.lora_b.normal_()
        out = model(x, counts, probs)
        torch.testing.assert_close(out, _reference(model, x, counts, probs), **TOL[dtype])
        assert not torch.allclose(out.float(), base.float(), atol=10 * TOL[dtype]["atol"])


def test_gradients_reach_every_factor_and_training_lowers_the_loss():
    model = _grouped_mlp()
    x, counts, probs = _inputs()
    qpeft.update_model(model, {"adapter_cfg": RANDOM_B})
    params = [p for p in model.parameters() if p.requires_grad]
    assert len(params) == 4 and not model.experts.weight1.requires_grad
    target = torch.randn(x.shape[0], HIDDEN)
    opt = torch.optim.SGD(params, lr=0.1)
    losses = []
    for _ in range(5):
        loss = F.mse_loss(model(x, counts, probs), target)
        opt.zero_grad()
        loss.backward()
        losses.append(loss.item())
        opt.step()
    for factors in model.experts.adapters["default"].factors.values():
        for grad in (factors.lora_a.grad, factors.lora_b.grad):
            assert grad[0].abs().sum() > 0 and grad[2].abs().sum() > 0
            assert torch.count_nonzero(grad[1]) == 0  # expert 1 has no rows
    assert losses[-1] < losses[0]


def test_zero_tokens_keep_every_parameter_in_the_graph():
    model = _grouped_mlp()
    qpeft.update_model(model, {"adapter_cfg": RANDOM_B})
    x, counts, probs = _inputs(counts=[0, 0, 0])
    x.requires_grad_()
    out = model(x, counts, probs)
    assert out.shape == (0, HIDDEN)
    out.sum().backward()
    for p in (p for p in model.parameters() if p.requires_grad):
        assert p.grad is not None and torch.count_nonzero(p.grad) == 0


def test_probs_on_input_and_its_topk_check():
    model = _grouped_mlp(
        moe_apply_probs_on_input=True, moe_router_topk=1, moe_router_pre_softmax=True
    )
    qpeft.update_model(model, {"adapter_cfg": RANDOM_B})
    x, counts, probs = _inputs()
    with torch.no_grad():
        want = _reference(model, probs[:, None] * x, counts, torch.ones_like(probs))
        torch.testing.assert_close(model(x, counts, probs), want, atol=FP32_ATOL, rtol=FP32_RTOL)
    model.experts.config.moe_router_topk = 2
    with pytest.raises(ValueError, match="moe_router_topk=1"):
        model(x, counts, probs)


def test_bad_counts_and_expert_tensor_parallelism_are_rejected():
    model = _grouped_mlp()
    qpeft.update_model(model, {"adapter_cfg": RANDOM_B})
    x, _, probs = _inputs()
    with pytest.raises(ValueError, match="tokens_per_expert sums to 2"):
        model(x, torch.tensor([1, 0, 1]), probs)
    split = _grouped_mlp(expert_tp=2)
    with pytest.raises(ValueError, match="GroupedMLP: .*expert_tensor_parallel_size=1"):
        qpeft.update_model(split, {"adapter_cfg": RANDOM_B})
    assert type(split.experts).__name__ == "GroupedMLP"  # untouched


def test_merge_folds_per_expert_into_the_storage_layout():
    model = _grouped_mlp()
    qpeft.update_model(model, {"adapter_cfg": RANDOM_B})
    layer = model.experts
    w1 = layer.weight1.detach().clone()
    f1 = layer.adapters["default"].factors["fc1"]
    with torch.no_grad():
        want = w1.view(EXPERTS, HIDDEN, -1) + SCALE * (f1.lora_b @ f1.lora_a).transpose(-2, -1)
    qpeft.merge_adapters(model)
    assert layer.weight1.shape == (HIDDEN, EXPERTS * 2 * FFN)
    torch.testing.assert_close(
        layer.weight1.view(EXPERTS, HIDDEN, -1), want, atol=FP32_ATOL, rtol=FP32_RTOL
    )


def test_an_fc2_pattern_adapts_only_fc2(tmp_path):
    model = _grouped_mlp()
    qpeft.update_model(model, {"adapter_cfg": {"*experts.fc2": RANDOM_B["*experts"]}})
    layer = model.experts
    assert list(layer.adapters["default"].factors) == ["fc2"]
    assert not [k for k in model.state_dict() if ".fc1." in k]
    x, counts, probs = _inputs()
    with torch.no_grad():
        ref = model(x, counts, probs)
        torch.testing.assert_close(
            ref, _reference(model, x, counts, probs), atol=FP32_ATOL, rtol=FP32_RTOL
        )
        assert not torch.allclose(
            ref, _reference(model, x, counts, probs, with_lora=False), atol=10 * FP32_ATOL
        )
    qpeft.save(model, tmp_path / "ckpt")
    with torch.no_grad():
        assert torch.equal(qpeft.restore(_grouped_mlp(), tmp_path / "ckpt")(x, counts, probs), ref)
    w1, w2 = layer.weight1.detach().clone(), layer.weight2.detach().clone()
    qpeft.export(model)
    assert torch.equal(model.experts.weight1, w1) and not torch.equal(model.experts.weight2, w2)
    with torch.no_grad():
        torch.testing.assert_close(
            _reference(model, x, counts, probs, with_lora=False),
            ref,
            atol=FP32_ATOL,
            rtol=FP32_RTOL,
        )


def test_every_product_is_one_grouped_mm_on_cpu(monkeypatch):
    model = _grouped_mlp()
    qpeft.update_model(model, {"adapter_cfg": RANDOM_B})
    x, counts, probs = _inputs()
    calls = []
    grouped_mm = F.grouped_mm
    monkeypatch.setattr(
        F, "grouped_mm", lambda *a, **k: calls.append(k["offs"].tolist()) or grouped_mm(*a, **k)
    )
    model(x, counts, probs)
    assert calls == [[3, 3, 9]] * 6  # fc1, its A and B, fc2, its A and B; offsets = cumsum(counts)


def test_sharded_state_dict_splits_the_factors_on_the_expert_axis():
    model = _grouped_mlp(ep_group=_Group(size=2, rank=1))  # this rank holds experts 3, 4, 5 of 6
    qpeft.update_model(model, {"adapter_cfg": RANDOM_B})
    sharded = model.experts.sharded_state_dict(prefix="experts.")
    a1 = sharded["experts.adapters.default.fc1.lora_a"]
    assert a1.global_shape == (2 * EXPERTS, RANK, HIDDEN) and a1.global_offset == (EXPERTS, 0, 0)
    assert torch.equal(a1.data, model.experts.adapters["default"].factors["fc1"].lora_a)
    assert "experts.weight1" in sharded  # GroupedMLP's own entries are kept


@pytest.mark.parametrize("quantize_first", [True, False])
def test_quantized_experts_are_read_by_the_lora_layer(quantize_first):
    """qpeft.quantize gives GroupedMLP per-expert fc1/fc2 weight quantizers (each expert's
    [out, in] matrix quantized alone); LoRAGroupedMLP computes with those quantized weights."""
    from qpeft.quant.quantizer import TensorQuantizer

    model = _grouped_mlp()
    x, counts, probs = _inputs()
    steps = [
        lambda: qpeft.quantize(model, "int8_weight_only"),
        lambda: qpeft.update_model(model, {"adapter_cfg": RANDOM_B}),
    ]
    for step in steps if quantize_first else steps[::-1]:
        step()
    layer = model.experts
    assert type(layer.base).__name__ == "QuantGroupedMLP"
    for name, out in (("fc1", 2 * FFN), ("fc2", HIDDEN)):
        quantizer = getattr(layer, f"{name}_weight_quantizer")
        assert quantizer.amax.shape == (EXPERTS, out, 1)
        weight, got = layer.expert_weight(name), layer.effective_weight(name)
        for e in range(EXPERTS):
            alone = TensorQuantizer(axis=0)
            with alone.calibrating():
                want = alone(weight[e].T.detach()).T
            assert torch.equal(got[e], want), (name, e)
    with torch.no_grad():
        torch.testing.assert_close(
            model(x, counts, probs), _reference(model, x, counts, probs), **TOL[torch.float32]
        )
        with qpeft.disabled_adapters(model):
            base = model(x, counts, probs)
        plain = grouped_reference(model, x, counts, probs, None)  # quantized weights
        torch.testing.assert_close(base, plain, **TOL[torch.float32])


def test_svdquant_and_sharded_amax_of_quantized_experts():
    model = _grouped_mlp(ep_group=_Group(size=2, rank=1))  # this rank holds experts 3, 4, 5 of 6
    qpeft.quantize(model, "int8_weight_only")
    qpeft.update_model(model, {"adapter_cfg": {"*": {"rank": 2, "lora_init_method": "svdquant"}}})
    factors = model.experts.adapters["default"].factors
    assert all(f.lora_b.abs().sum() > 0 for f in factors.values())
    sharded = model.experts.sharded_state_dict(prefix="experts.")
    amax = sharded["experts.fc1_weight_quantizer._amax"]
    assert amax.global_shape == (2 * EXPERTS, 2 * FFN, 1) and amax.global_offset == (EXPERTS, 0, 0)


def _dist_checkpoint_worker(rank, store, ckpt_dir):
    import torch.distributed as dist
    from megatron.core import dist_checkpointing
    from megatron.core.transformer.moe import grouped_gemm_util

    grouped_gemm_util.assert_grouped_gemm_is_available = lambda: None
    # dist_checkpointing's CUDA-only calls, redirected in this test process only
    torch.cuda.synchronize = lambda *args, **kwargs: None
    torch.cuda.current_device = lambda: "cpu"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=1)
    try:
        model = _grouped_mlp()
        qpeft.quantize(model, "int8_weight_only")  # the _amax buffers are saved too
        qpeft.update_model(model, {"adapter_cfg": RANDOM_B})
        assert "experts.fc1_weight_quantizer._amax" in model.state_dict()
        dist_checkpointing.save(model.experts.sharded_state_dict(prefix="experts."), ckpt_dir)
        fresh = _grouped_mlp()
        torch.manual_seed(9)
        with torch.no_grad():
            fresh.experts.weight2.mul_(2.0)  # another amax
        qpeft.quantize(fresh, "int8_weight_only")
        qpeft.update_model(fresh, {"adapter_cfg": RANDOM_B})
        with torch.no_grad():
            fresh.experts.weight1.add_(1.0)
        assert not torch.equal(
            fresh.experts.adapters["default"].factors["fc2"].lora_b,
            model.experts.adapters["default"].factors["fc2"].lora_b,
        )
        fresh.load_state_dict(
            dist_checkpointing.load(fresh.experts.sharded_state_dict(prefix="experts."), ckpt_dir)
        )
        for (name, got), want in zip(
            fresh.state_dict().items(), model.state_dict().values(), strict=True
        ):
            assert torch.equal(got, want), name
    finally:
        dist.destroy_process_group()


def test_dist_checkpointing_round_trip(tmp_path):
    ckpt = tmp_path / "ckpt"
    os.makedirs(ckpt)
    torch.multiprocessing.spawn(
        _dist_checkpoint_worker, args=(str(tmp_path / "store"), str(ckpt)), nprocs=1, join=True
    )
