"""Quantized Megatron-Core Column/RowParallelLinear at tensor-parallel size 2 on CPU (gloo),
against one process.

Both ranks (one spawn) build the MLP of :mod:`tests.lora.plugins.test_megatron` and the
single-process ``nn.Linear`` MLP holding the gathered weights, quantize both (calibrating the
inputs on the same data) and check: every amax and every ``Q(W)`` shard is bit-identical to the
slice of the single-process one (per-row amax of column-parallel weights local, the rest reduced
over the group), outputs and LoRA gradients match in both orders of ``quantize`` and
``update_model``, svdquant on the quantized shards, blocks straddling shards refused,
``qpeft.save`` / ``restore`` per rank and Megatron ``dist_checkpointing`` with the ``_amax``
buffers, and quantized ``SequentialMLP`` experts.
"""

import os

import pytest
import torch

pytest.importorskip("megatron.core")

import qpeft  # noqa: E402
from tests.checkpoint.helpers import assert_same_state  # noqa: E402
from tests.lora.plugins.test_megatron import (  # noqa: E402
    FFN,
    HIDDEN,
    WORLD,
    _cpu_shims,
    _gather,
    _MegatronMLP,
    _sequential_mlp,
    _sharded,
    _TorchMLP,
    assert_svdquant_shards,
    spawn_gloo,
)
from tests.tolerances import DIST_ATOL  # noqa: E402

LORA = {"adapter_cfg": {"*": {"rank": 2, "scale": 0.5, "lora_b_init": "torch.nn.init.normal_"}}}
_NVFP4_8 = {"num_bits": (2, 1), "block_sizes": {-1: 8, "type": "dynamic", "scale_bits": (4, 3)}}
CONFIGS = {
    "int8": "int8",  # weight per row (axis 0), input per tensor
    "fp8": "fp8",  # per tensor
    "nvfp4_block8": {"quant_cfg": {"*weight_quantizer": _NVFP4_8, "*input_quantizer": _NVFP4_8}},
}


def _models(config, rank):
    """The TP=2 MLP and the one-process MLP with the same (gathered) weights."""
    torch.manual_seed(0)
    tp = _MegatronMLP(config)
    ref = _TorchMLP()
    with torch.no_grad():
        ref.fc1.weight.copy_(_gather(tp.fc1.weight, 0))
        ref.fc1.bias.copy_(_gather(tp.fc1.bias, 0))
        ref.fc2.weight.copy_(_gather(tp.fc2.weight, 1))
        ref.fc2.bias.copy_(tp.fc2.bias)
    return tp, ref


def _data():
    torch.manual_seed(2)
    return torch.randn(5, 2, HIDDEN)


def _quantize(model, cfg):
    x = _data()
    return qpeft.quantize(model, cfg, forward_loop=lambda m: m(x))


def _lora(model, seed=1):
    torch.manual_seed(seed)
    qpeft.update_model(model, LORA)


def _check_quantizers(tp, ref, rank):
    """Every amax and Q(W) shard is the slice of the one-process one, bit for bit."""
    rows = slice(rank * FFN // WORLD, (rank + 1) * FFN // WORLD)
    for name, axis in (("fc1", 0), ("fc2", 1)):
        got, want = getattr(tp, name), getattr(ref, name)
        assert type(got.weight_quantizer).__name__ == "ShardedTensorQuantizer"
        shard = (rows, slice(None)) if axis == 0 else (slice(None), rows)
        assert torch.equal(got.quantized_weight(), want.quantized_weight()[shard]), name
        for kind in ("weight_quantizer", "input_quantizer"):
            a, b = getattr(got, kind).amax, getattr(want, kind).amax
            assert (a is None) == (b is None), (name, kind)
            if a is not None:
                local = b[rows] if (name, kind) == ("fc1", "weight_quantizer") and b.dim() else b
                assert torch.equal(a, local), (name, kind)


def _check_forward_backward(tp, ref):
    x = _data()
    x_tp, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, expected = tp(x_tp), ref(x_ref)
    torch.testing.assert_close(out, expected, atol=DIST_ATOL, rtol=0)
    out.sum().backward()
    expected.sum().backward()
    torch.testing.assert_close(x_tp.grad, x_ref.grad, atol=DIST_ATOL, rtol=0)
    a, b = tp.fc2.adapters["default"].lora_b, ref.fc2.adapters["default"].lora_b
    torch.testing.assert_close(a.grad, b.grad, atol=DIST_ATOL, rtol=0)
    return (out - expected).abs().max().item()


def _check_orders(config, rank, cfg):
    """quantize then update_model, and update_model then quantize: both match one process."""
    worst = 0.0
    for quantize_first in (True, False):
        tp, ref = _models(config, rank)
        for model in (tp, ref):
            if quantize_first:
                _quantize(model, cfg)
                _lora(model)
            else:
                _lora(model)
                _quantize(model, cfg)
        assert type(tp.fc1).__name__ == "LoRAColumnParallelLinear"
        assert type(tp.fc1.base).__name__ == "QuantColumnParallelLinear"
        _check_quantizers(tp, ref, rank)
        worst = max(worst, _check_forward_backward(tp, ref))
    return worst


def _check_svdquant(config, rank):
    """svdquant on quantized shards = the slices of svdquant on the whole quantized weights."""
    tp, ref = _models(config, rank)
    for model in (tp, ref):
        _quantize(model, "int8_weight_only")
        qpeft.update_model(
            model, {"adapter_cfg": {"*": {"rank": 3, "lora_init_method": "svdquant"}}}
        )
    assert_svdquant_shards(tp, ref, "default", rank)


def _check_straddling_blocks_refused(config, rank):
    tp, _ = _models(config, rank)
    with pytest.raises(ValueError, match=r"fc2\.weight_quantizer: block size 16 does not divide"):
        qpeft.quantize(tp, "nvfp4_weight_only")  # blocks of 16 on fc2's local in = 8
    assert type(tp.fc2).__name__ == "RowParallelLinear"  # untouched


def _check_checkpoints(config, rank, ckpt_dir):
    """``qpeft.save`` / ``restore`` of each rank's shards, and ``dist_checkpointing``."""
    from megatron.core import dist_checkpointing

    tp, _ = _models(config, rank)
    _quantize(tp, "int8")
    _lora(tp)
    x = _data()
    qpeft.save(tp, f"{ckpt_dir}/qpeft{rank}")
    torch.manual_seed(5)
    restored = qpeft.restore(_MegatronMLP(config), f"{ckpt_dir}/qpeft{rank}")
    assert_same_state(restored, tp)
    with torch.no_grad():
        assert torch.equal(restored(x), tp(x))

    sharded = _sharded(tp)
    fc1_amax = sharded["fc1.weight_quantizer._amax"]
    assert fc1_amax.global_shape == (FFN, 1) and fc1_amax.local_shape == (FFN // WORLD, 1)
    assert sharded["fc2.weight_quantizer._amax"].global_shape == (HIDDEN, 1)  # replicated
    assert sharded["fc2.input_quantizer._amax"].global_shape == ()
    os.makedirs(f"{ckpt_dir}/dist", exist_ok=True)
    dist_checkpointing.save(sharded, f"{ckpt_dir}/dist")
    torch.manual_seed(9)
    fresh = _MegatronMLP(config)
    torch.manual_seed(6)
    _quantize(fresh, "int8")
    _lora(fresh, seed=8)
    fresh.load_state_dict(dist_checkpointing.load(_sharded(fresh), f"{ckpt_dir}/dist"))
    assert_same_state(fresh, tp)


def _check_sequential_mlp_experts():
    """The experts of SequentialMLP (expert parallel 2) are quantized like any such layer."""
    experts = _sequential_mlp(expert_tp=1)
    x, tokens, probs = torch.randn(7, HIDDEN), torch.tensor([3, 4]), torch.rand(7)
    with torch.no_grad():
        plain = experts(x, tokens, probs)[0]
    qpeft.quantize(experts, "int8_weight_only")
    layer = experts.local_experts[1].linear_fc2
    assert type(layer).__name__ == "QuantRowParallelLinear"
    want = layer.weight.detach().abs().amax(dim=1, keepdim=True)  # expert TP 1: whole rows
    assert torch.equal(layer.weight_quantizer.amax, want)
    with torch.no_grad():
        quantized = experts(x, tokens, probs)[0]
    assert not torch.equal(quantized, plain) and torch.allclose(quantized, plain, atol=0.05)
    _lora(experts)
    assert type(experts.local_experts[0].linear_fc1.base).__name__ == "QuantColumnParallelLinear"
    with torch.no_grad(), qpeft.disabled_adapters(experts):
        assert torch.equal(experts(x, tokens, probs)[0], quantized)


def _run(rank, ckpt_dir):
    from megatron.core import parallel_state
    from megatron.core.model_parallel_config import ModelParallelConfig

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=WORLD)
    _cpu_shims()
    config = ModelParallelConfig(tensor_model_parallel_size=WORLD, use_cpu_initialization=True)
    worst = {name: _check_orders(config, rank, cfg) for name, cfg in CONFIGS.items()}
    if rank == 0:
        print("max |TP=2 - TP=1| output:", worst)
    _check_svdquant(config, rank)
    _check_straddling_blocks_refused(config, rank)
    _check_checkpoints(config, rank, ckpt_dir)
    _check_sequential_mlp_experts()


def test_quantized_tensor_parallel_2_matches_one_process(tmp_path):
    spawn_gloo(_run, tmp_path)
