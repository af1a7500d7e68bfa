"""Megatron-Core Column/RowParallelLinear LoRA with tensor-parallel size 2 on CPU (gloo).

Both ranks (one spawn, to pay Megatron's import once) build the Megatron MLP
``RowParallel(gelu(ColumnParallel(x)))``, add LoRA with ``qpeft.update_model``, run forward and
backward and check their shards against a single-process ``nn.Linear`` MLP holding the gathered
weights, the same LoRA config and seed; then save/load the adapters with ``dist_checkpointing``,
check svdquant on shards, the rejection of sequence parallelism, a 2-layer GPTModel (local layer
spec), and per-expert LoRA on a SequentialMLP with expert parallelism 2. CUDA-only calls are
redirected by the test-only ``_cpu_shims``.
"""

import contextlib
import os
import socket

import pytest
import torch
from torch import nn

pytest.importorskip("megatron.core")

import qpeft  # noqa: E402
from tests.tolerances import DIST_ATOL  # noqa: E402

HIDDEN, FFN, RANK, WORLD = 8, 16, 4, 2
LORA = {"adapter_cfg": {"*": {"rank": RANK, "scale": 0.5, "lora_b_init": "torch.nn.init.normal_"}}}


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _MegatronMLP(nn.Module):
    def __init__(self, config):
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

        super().__init__()
        init = nn.init.xavier_normal_
        self.fc1 = ColumnParallelLinear(
            HIDDEN, FFN, config=config, init_method=init, bias=True, gather_output=False
        )
        self.fc2 = RowParallelLinear(
            FFN,
            HIDDEN,
            config=config,
            init_method=init,
            bias=True,
            input_is_parallel=True,
            skip_bias_add=False,
        )

    def forward(self, x):
        h, _ = self.fc1(x)
        y, _ = self.fc2(torch.nn.functional.gelu(h))
        return y


class _TorchMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(HIDDEN, FFN)
        self.fc2 = nn.Linear(FFN, HIDDEN)

    def forward(self, x):
        return self.fc2(torch.nn.functional.gelu(self.fc1(x)))


def _gather(t, dim):
    import torch.distributed as dist

    parts = [torch.empty_like(t) for _ in range(WORLD)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, dim=dim)


class _NoCudaRngTracker:
    """Stands in for Megatron's CUDA RNG tracker: forking the model-parallel RNG does nothing."""

    def fork(self, name="model-parallel-rng"):
        return contextlib.nullcontext()

    def add(self, name, seed):
        pass

    def is_initialized(self):
        return True


def _cpu_shims():
    """Test-only redirections of the CUDA-only calls Megatron-Core 0.16.1 makes, to run on CPU.

    - ``torch.cuda.synchronize`` (before dist_checkpointing copies tensors out): a no-op;
    - ``torch.cuda.current_device`` (device of dist_checkpointing's failure flag): ``"cpu"``;
    - ``tensor_parallel.get_cuda_rng_tracker`` (attention dropout forks the CUDA RNG): a tracker
      whose ``fork`` does nothing (the test GPT has no dropout).
    """
    import megatron.core.tensor_parallel as tensor_parallel
    import megatron.core.tensor_parallel.random as tp_random

    torch.cuda.synchronize = lambda *args, **kwargs: None
    torch.cuda.current_device = lambda: "cpu"
    tracker = _NoCudaRngTracker()

    def get_tracker(*args, **kwargs):
        return tracker

    tensor_parallel.get_cuda_rng_tracker = tp_random.get_cuda_rng_tracker = get_tracker


def _check_dist_checkpoint(tp, config, ckpt_dir):
    """Megatron's dist_checkpointing saves the adapters' shards; a fresh model loads them."""
    from megatron.core import dist_checkpointing

    dist_checkpointing.save(_sharded(tp), ckpt_dir)
    torch.manual_seed(7)
    fresh = _MegatronMLP(config)
    torch.manual_seed(8)
    qpeft.update_model(fresh, LORA)
    fresh.load_state_dict(dist_checkpointing.load(_sharded(fresh), ckpt_dir))
    for (name, got), want in zip(fresh.state_dict().items(), tp.state_dict().values(), strict=True):
        if isinstance(want, torch.Tensor):
            assert torch.equal(got, want), name


class _Grid(nn.Module):
    """Test weight quantizer: round to a fixed 1/16 grid (elementwise, so shards agree with the
    whole)."""

    def forward(self, w):
        return (w * 16).round() / 16


def _check_svdquant(tp, ref, rank):
    """svdquant on TP shards = the slices of svdquant on the whole (gathered) weights."""
    for model in (tp, ref):
        for layer in (model.fc1, model.fc2):
            layer.base.weight_quantizer = _Grid()
        qpeft.update_model(
            model,
            {
                "adapter_name": "sq",
                "adapter_cfg": {"*": {"rank": 3, "lora_init_method": "svdquant"}},
            },
        )
    assert_svdquant_shards(tp, ref, "sq", rank)


def assert_svdquant_shards(tp, ref, name, rank):
    """Each rank's svdquant factors are its slices of the one-process factors (column: B on out,
    row: A on in)."""
    shard = slice(rank * FFN // WORLD, (rank + 1) * FFN // WORLD)
    a1, a2 = tp.fc1.adapters[name], tp.fc2.adapters[name]
    r1, r2 = ref.fc1.adapters[name], ref.fc2.adapters[name]
    assert r1.lora_b.abs().sum() > 0
    for got, want in [
        (a1.lora_a, r1.lora_a),
        (a1.lora_b, r1.lora_b[shard]),
        (a2.lora_a, r2.lora_a[:, shard]),
        (a2.lora_b, r2.lora_b),
    ]:
        torch.testing.assert_close(got, want, atol=DIST_ATOL, rtol=0)


def _check_sequence_parallel_is_rejected():
    from megatron.core.model_parallel_config import ModelParallelConfig
    from megatron.core.tensor_parallel import ColumnParallelLinear

    config = ModelParallelConfig(
        tensor_model_parallel_size=WORLD, sequence_parallel=True, use_cpu_initialization=True
    )
    model = nn.ModuleDict(
        {"fc": ColumnParallelLinear(HIDDEN, FFN, config=config, init_method=nn.init.zeros_)}
    )
    with pytest.raises(ValueError, match="sequence-parallel"):
        qpeft.update_model(model, LORA)
    assert type(model["fc"]) is ColumnParallelLinear  # untouched


def _check_gpt(rank):
    """A 2-layer GPT (local layer spec) at TP=2: B=0 keeps the logits, training lowers the loss,
    replicated factors stay equal on both ranks, and the model's sharded_state_dict has adapters."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(
        num_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        tensor_model_parallel_size=WORLD,
        use_cpu_initialization=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )
    torch.manual_seed(0)
    gpt = GPTModel(
        config=config,
        transformer_layer_spec=get_gpt_layer_local_spec(),
        vocab_size=64,
        max_sequence_length=16,
    )
    torch.manual_seed(3)
    ids = torch.randint(0, 64, (2, 8))
    inputs = {
        "input_ids": ids,
        "position_ids": torch.arange(8).expand(2, 8),
        "attention_mask": torch.triu(torch.ones(1, 1, 8, 8), diagonal=1).bool(),
    }
    with torch.no_grad():
        before = gpt(**inputs)
    qpeft.update_model(gpt, {"adapter_cfg": {"*": {"rank": 4}, "*output_layer": {"enable": False}}})
    kinds = {type(m).__name__ for m in qpeft.lora_layers(gpt).values()}
    assert kinds == {"LoRAColumnParallelLinear", "LoRARowParallelLinear"}
    with torch.no_grad():
        assert torch.equal(gpt(**inputs), before)
    opt = torch.optim.SGD([p for p in gpt.parameters() if p.requires_grad], lr=0.5)
    losses = []
    for _ in range(4):
        loss = gpt(**inputs, labels=ids).float().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for layer in qpeft.lora_layers(gpt).values():
        replicated = (
            layer.adapters["default"].lora_a
            if layer.SHARD_AXIS == 0
            else layer.adapters["default"].lora_b
        )
        assert torch.equal(
            _gather(replicated.detach(), 0).chunk(WORLD)[1 - rank], replicated.detach()
        )
    sharded = gpt.sharded_state_dict()
    key = "decoder.layers.0.mlp.linear_fc1.adapters.default.lora_b"
    # The decoder stacks its layers: a leading layer axis (sharded_offsets) precedes the factor's.
    assert sharded[key].global_shape == (config.num_layers, config.ffn_hidden_size, 4)
    assert sharded[key].local_shape == (config.ffn_hidden_size // WORLD, 4)


def _sequential_mlp(expert_tp):
    """Megatron's SequentialMLP with 2 local experts; expert TP size ``expert_tp``."""
    from megatron.core import parallel_state
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.mlp import MLPSubmodules
    from megatron.core.transformer.moe.experts import SequentialMLP
    from megatron.core.transformer.transformer_config import TransformerConfig

    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=WORLD,
        expert_tensor_parallel_size=expert_tp,
        expert_model_parallel_size=WORLD // expert_tp,
    )
    config = TransformerConfig(
        num_layers=1,
        hidden_size=HIDDEN,
        num_attention_heads=2,
        tensor_model_parallel_size=WORLD,
        expert_tensor_parallel_size=expert_tp,
        expert_model_parallel_size=WORLD // expert_tp,
        num_moe_experts=2 * WORLD // expert_tp,
        moe_ffn_hidden_size=FFN,
        use_cpu_initialization=True,
        add_bias_linear=False,
    )
    torch.manual_seed(0)
    submodules = MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
    return SequentialMLP(
        2, config, submodules, pg_collection=ProcessGroupCollection.use_mpu_process_groups()
    )


def _check_sequential_mlp_experts():
    """Per-expert LoRA on SequentialMLP (expert parallel 2, expert TP 1); expert TP 2 is
    rejected."""
    with pytest.raises(ValueError, match="expert_tensor_parallel_size=1"):
        qpeft.update_model(_sequential_mlp(expert_tp=WORLD), LORA)
    experts = _sequential_mlp(expert_tp=1)
    x, tokens, probs = torch.randn(7, HIDDEN), torch.tensor([3, 4]), torch.rand(7)
    with torch.no_grad():
        before = experts(x, tokens, probs)[0]
    qpeft.update_model(
        experts, {"adapter_cfg": {"*": {"rank": RANK}, "*local_experts.1.*": {"rank": 2}}}
    )
    assert experts.local_experts[1].linear_fc2.adapters["default"].rank == 2
    with torch.no_grad():
        assert torch.equal(experts(x, tokens, probs)[0], before)  # B = 0
        for layer in qpeft.lora_layers(experts).values():
            layer.adapters["default"].lora_b.normal_()
        out = experts(x, tokens, probs)[0]
        for layer in qpeft.lora_layers(experts).values():  # fold: W += scale * B @ A
            layer.base_weight.add_(layer.adapters["default"].delta_weight())
    with torch.no_grad(), qpeft.disabled_adapters(experts):
        torch.testing.assert_close(experts(x, tokens, probs)[0], out, atol=DIST_ATOL, rtol=0)
    assert not torch.allclose(out, before)


def _check_against_reference(rank, ckpt_dir):
    from megatron.core import parallel_state
    from megatron.core.model_parallel_config import ModelParallelConfig

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=WORLD)
    _cpu_shims()
    config = ModelParallelConfig(tensor_model_parallel_size=WORLD, use_cpu_initialization=True)
    torch.manual_seed(0)
    tp = _MegatronMLP(config)
    torch.manual_seed(1)
    qpeft.update_model(tp, LORA)
    assert type(tp.fc1).__name__ == "LoRAColumnParallelLinear"
    ref = _TorchMLP()
    with torch.no_grad():
        ref.fc1.weight.copy_(_gather(tp.fc1.weight, 0))
        ref.fc1.bias.copy_(_gather(tp.fc1.bias, 0))
        ref.fc2.weight.copy_(_gather(tp.fc2.weight, 1))
        ref.fc2.bias.copy_(tp.fc2.bias)
    torch.manual_seed(1)
    qpeft.update_model(ref, LORA)  # same seed: the TP shards must be slices of these factors

    a1, a2 = tp.fc1.adapters["default"], tp.fc2.adapters["default"]
    r1, r2 = ref.fc1.adapters["default"], ref.fc2.adapters["default"]
    assert a1.lora_a.shape == (RANK, HIDDEN) and a1.lora_b.shape == (FFN // WORLD, RANK)
    assert a2.lora_a.shape == (RANK, FFN // WORLD) and a2.lora_b.shape == (HIDDEN, RANK)
    torch.testing.assert_close(a1.lora_a, r1.lora_a, atol=0, rtol=0)
    torch.testing.assert_close(_gather(a1.lora_b, 0), r1.lora_b, atol=0, rtol=0)
    torch.testing.assert_close(_gather(a2.lora_a, 1), r2.lora_a, atol=0, rtol=0)

    torch.manual_seed(2)
    x = torch.randn(5, 2, HIDDEN)  # [s, b, h], identical on both ranks
    x_tp, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = tp(x_tp)
    expected = ref(x_ref)
    torch.testing.assert_close(out, expected, atol=DIST_ATOL, rtol=0)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    torch.testing.assert_close(x_tp.grad, x_ref.grad, atol=DIST_ATOL, rtol=0)
    shard = slice(rank * FFN // WORLD, (rank + 1) * FFN // WORLD)
    pairs = [
        (a1.lora_a.grad, r1.lora_a.grad),
        (a1.lora_b.grad, r1.lora_b.grad[shard]),
        (a2.lora_a.grad, r2.lora_a.grad[:, shard]),
        (a2.lora_b.grad, r2.lora_b.grad),
    ]
    for got, want in pairs:
        torch.testing.assert_close(got, want, atol=DIST_ATOL, rtol=0)
    assert tp.fc1.weight.grad is None  # base frozen

    sharded = _sharded(tp)
    b1 = sharded["fc1.adapters.default.lora_b"]
    assert b1.global_shape == (FFN, RANK) and b1.local_shape == (FFN // WORLD, RANK)
    a2s = sharded["fc2.adapters.default.lora_a"]
    assert a2s.global_shape == (RANK, FFN) and a2s.local_shape == (RANK, FFN // WORLD)
    assert sharded["fc1.adapters.default.lora_a"].global_shape == (RANK, HIDDEN)
    assert "fc1.weight" in sharded and "fc2.weight" in sharded
    _check_dist_checkpoint(tp, config, ckpt_dir)
    _check_svdquant(tp, ref, rank)
    _check_sequence_parallel_is_rejected()
    _check_gpt(rank)
    _check_sequential_mlp_experts()


def _sharded(model):
    from megatron.core.transformer.utils import sharded_state_dict_default

    out = {}
    for name, child in model.named_children():
        out.update(sharded_state_dict_default(child, f"{name}."))
    return out


def _worker(rank, port, check, ckpt_dir):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        check(rank, ckpt_dir)
    finally:
        dist.destroy_process_group()


def spawn_gloo(check, ckpt_dir):
    """Run ``check(rank, ckpt_dir)`` (a module-level function) on ``WORLD`` gloo ranks."""
    torch.multiprocessing.spawn(
        _worker, args=(_free_port(), check, str(ckpt_dir)), nprocs=WORLD, join=True
    )


def test_tensor_parallel_2_on_cpu_gloo(tmp_path):
    spawn_gloo(_check_against_reference, tmp_path)
