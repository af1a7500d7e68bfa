"""Every kind of LoRA layer, each as a tiny container model: the table of
``tests/lora/test_layer_invariants.py`` and the plugin tests build their layers here.

A :class:`LayerKind` gives ``build()`` (a fresh model, the same weights every call), ``inputs()``
(fixed inputs) and ``base_output(model, inputs)``: the unconverted model's output, or for
Megatron's ``GroupedMLP`` (whose own forward needs CUDA's grouped_gemm) a per-expert loop that
matches it to fp32 rounding (``exact_base`` False). Megatron layers run at tensor-parallel size 1
in this process with single-process stand-in groups (:class:`SingleGroup`), inside
:func:`single_process_group`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.models import TinyMLP

HIDDEN, FFN, EXPERTS = 8, 16, 3
COUNTS = [3, 0, 6]  # GroupedMLP / SequentialMLP rows per expert; expert 1 gets none


@dataclass(frozen=True)
class LayerKind:
    """One LoRA layer kind: how to build a model holding it and run it."""

    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[], tuple[torch.Tensor, ...]]
    reference: Callable[[nn.Module, tuple[torch.Tensor, ...]], torch.Tensor] | None = None
    megatron: bool = False

    @property
    def exact_base(self) -> bool:
        """Whether :meth:`base_output` is the base module's own forward (bit-exact comparisons)."""
        return self.reference is None

    def run(self, model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        with torch.no_grad():
            return model(*inputs)

    def base_output(self, model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        with torch.no_grad():
            return model(*inputs) if self.reference is None else self.reference(model, inputs)


# -- plain torch and transformers layers -----------------------------------------------------


def _seeded(build: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    def fresh() -> nn.Module:
        torch.manual_seed(0)
        return build()

    return fresh


def _tokens(features: int, rows: int = 6) -> Callable[[], tuple[torch.Tensor, ...]]:
    def make() -> tuple[torch.Tensor, ...]:
        gen = torch.Generator().manual_seed(1)
        return (torch.randn(rows, features, generator=gen),)

    return make


def _conv1d() -> nn.Module:
    from transformers.pytorch_utils import Conv1D

    layer = Conv1D(16, HIDDEN)  # weight [in, out]
    with torch.no_grad():
        layer.bias.normal_()
    return nn.Sequential(layer)


class ExpertsModel(nn.Module):
    """A container for an experts module: ``forward(*inputs)``, its output without a bias."""

    def __init__(self, experts: nn.Module) -> None:
        super().__init__()
        self.experts = experts

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        out = self.experts(*inputs)
        return out[0] if isinstance(out, tuple) else out


def _hf_experts(layout: str) -> nn.Module:
    """transformers experts: ``fused`` (Qwen3-MoE), ``split`` (NemotronH: ``up_proj``, no gate),
    ``transposed`` (GPT-OSS, with biases)."""
    if layout == "fused":
        from transformers import Qwen3MoeConfig
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts as cls

        cfg = Qwen3MoeConfig(hidden_size=HIDDEN, moe_intermediate_size=FFN, num_experts=EXPERTS)
    elif layout == "split":
        from transformers import NemotronHConfig
        from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHExperts as cls

        cfg = NemotronHConfig(hidden_size=HIDDEN, moe_intermediate_size=FFN, n_routed_experts=3)
    else:
        from transformers import GptOssConfig
        from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts as cls

        cfg = GptOssConfig(hidden_size=HIDDEN, intermediate_size=FFN, num_local_experts=EXPERTS)
    cfg._experts_implementation = "grouped_mm"  # the 5.x default; B = 0 is then bit-identical
    experts = cls(cfg)
    with torch.no_grad():
        for param in experts.parameters():  # some classes leave their weights torch.empty
            param.normal_(0, 0.3)
    return ExpertsModel(experts)


def _routed(tokens: int = 6, k: int = 2) -> Callable[[], tuple[torch.Tensor, ...]]:
    def make() -> tuple[torch.Tensor, ...]:
        gen = torch.Generator().manual_seed(1)
        hidden = torch.randn(tokens, HIDDEN, generator=gen)
        index = torch.stack([torch.randperm(EXPERTS, generator=gen)[:k] for _ in range(tokens)])
        return hidden, index, torch.rand(tokens, k, generator=gen)

    return make


# -- Megatron-Core ---------------------------------------------------------------------------


class SingleGroup:
    """A process group of ``size`` ranks seen from ``rank`` (only size() and rank() are asked)."""

    def __init__(self, size: int = 1, rank: int = 0) -> None:
        self._size, self._rank = size, rank

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return self._rank


class MegatronModel(nn.Module):
    """A container for one Megatron layer; returns the layer's output without its bias."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.layer(*inputs)[0]


def _megatron_linear(kind: str) -> nn.Module:
    pytest.importorskip("megatron.core")
    from megatron.core.model_parallel_config import ModelParallelConfig
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    config = ModelParallelConfig(use_cpu_initialization=True)
    common = {"config": config, "init_method": nn.init.xavier_normal_, "tp_group": SingleGroup()}
    if kind == "column":
        layer = ColumnParallelLinear(HIDDEN, FFN, bias=True, gather_output=False, **common)
    else:
        layer = RowParallelLinear(
            HIDDEN, FFN, bias=True, input_is_parallel=True, skip_bias_add=False, **common
        )
    return MegatronModel(layer)


def _transformer_config(**extra: Any) -> Any:
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=1,
        hidden_size=HIDDEN,
        num_attention_heads=2,
        num_moe_experts=EXPERTS,
        moe_ffn_hidden_size=FFN,
        use_cpu_initialization=True,
        add_bias_linear=False,
        **extra,
    )


def sequential_mlp() -> nn.Module:
    """Megatron's ``SequentialMLP`` (one Column/RowParallel MLP per expert), single process."""
    pytest.importorskip("megatron.core")
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.mlp import MLPSubmodules
    from megatron.core.transformer.moe.experts import SequentialMLP

    groups = ProcessGroupCollection(
        ep=SingleGroup(), expt_tp=SingleGroup(), expt_dp=SingleGroup(), tp=SingleGroup()
    )
    submodules = MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
    return ExpertsModel(SequentialMLP(EXPERTS, _transformer_config(), submodules, groups))


def grouped_mlp(
    gated: bool = True,
    dtype: torch.dtype = torch.float32,
    expert_tp: int = 1,
    ep_group: Any = None,
    **config: Any,
) -> nn.Module:
    """Megatron's ``GroupedMLP`` built on the CPU (its check that grouped_gemm is installed
    skipped)."""
    pytest.importorskip("megatron.core")
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.moe import experts, grouped_gemm_util

    cfg = _transformer_config(
        gated_linear_unit=gated,
        activation_func=F.silu if gated else F.gelu,
        init_method_std=0.3,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        **config,
    )
    groups = ProcessGroupCollection(
        ep=ep_group or SingleGroup(), expt_tp=SingleGroup(expert_tp), expt_dp=SingleGroup()
    )
    torch.manual_seed(0)
    with _patched(grouped_gemm_util, "assert_grouped_gemm_is_available", lambda: None):
        return ExpertsModel(experts.GroupedMLP(EXPERTS, cfg, pg_collection=groups))


@contextlib.contextmanager
def single_process_group():
    """A one-rank gloo group (in-memory store) for the Megatron kinds, destroyed on exit.

    Megatron's constructors keep the :class:`SingleGroup` they are given only while
    ``torch.distributed`` is initialised, and its communication helpers look the default group up
    at every call, so the Megatron kinds are built and run inside this context."""
    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def _patched(owner: Any, name: str, value: Any):
    saved = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, saved)


def expert_rows(dtype: torch.dtype = torch.float32, counts: list[int] = COUNTS):
    """``(rows [S, H] sorted by expert, tokens_per_expert [E], probs [S])``."""
    torch.manual_seed(1)
    rows = sum(counts)
    return torch.randn(rows, HIDDEN, dtype=dtype), torch.tensor(counts), torch.rand(rows)


def grouped_reference(model, x, counts, probs, adapter: str | None = "default", scale=None):
    """``GroupedMLP`` as a per-expert loop on the ``[E, in, out]`` weight views (fake-quantized
    when quantized), fp32; with the LoRA terms of ``adapter`` (its own scale unless ``scale`` is
    given) when not None."""
    layer = model.experts
    inner, quant = layer, None
    while hasattr(inner, "base"):  # through LoRA and quantized wrappers
        quant = inner if hasattr(inner, "quantized_weights") else quant
        inner = inner.base
    if quant is None:
        w1 = inner.weight1.view(EXPERTS, HIDDEN, -1).float()
        w2 = inner.weight2.view(EXPERTS, -1, HIDDEN).float()
    else:  # qpeft.quantize: the fake-quantized [E, in, out] views
        w1, w2 = (w.float() for w in quant.quantized_weights().values())
    lora = layer.adapters[adapter] if adapter is not None else None
    scale = scale if scale is not None or lora is None else lora.scale
    act, out, start = inner.config.activation_func, [], 0
    for e, n in enumerate(counts.tolist()):
        xs, ps = x[start : start + n].float(), probs[start : start + n, None].float()
        start += n
        h = _plus_lora(xs, xs @ w1[e], lora, "fc1", e, scale)
        if inner.config.gated_linear_unit:
            gate, up = h.chunk(2, dim=-1)
            g = act(gate) * up * ps
        else:
            g = act(h) * ps
        out.append(_plus_lora(g, g @ w2[e], lora, "fc2", e, scale))
    return torch.cat(out).to(x.dtype)


def _plus_lora(x, y, adapter, name, expert, scale):
    if adapter is None or name not in adapter.factors:
        return y
    f = adapter.factors[name]
    return y + scale * (x @ f.lora_a[expert].float().T) @ f.lora_b[expert].float().T


KINDS = [
    LayerKind("linear", _seeded(TinyMLP), _tokens(8)),
    LayerKind("conv1d", _seeded(_conv1d), _tokens(HIDDEN)),
    LayerKind("hf_experts_fused", _seeded(lambda: _hf_experts("fused")), _routed()),
    LayerKind("hf_experts_split", _seeded(lambda: _hf_experts("split")), _routed()),
    LayerKind("hf_experts_transposed", _seeded(lambda: _hf_experts("transposed")), _routed()),
    LayerKind(
        "megatron_column",
        _seeded(lambda: _megatron_linear("column")),
        _tokens(HIDDEN),
        megatron=True,
    ),
    LayerKind(
        "megatron_row", _seeded(lambda: _megatron_linear("row")), _tokens(HIDDEN), megatron=True
    ),
    LayerKind(
        "megatron_sequential_mlp",
        _seeded(sequential_mlp),
        lambda: expert_rows(),
        megatron=True,
    ),
    LayerKind(
        "megatron_grouped_mlp",
        grouped_mlp,
        lambda: expert_rows(),
        reference=lambda m, x: grouped_reference(m, *x, adapter=None),
        megatron=True,
    ),
]
