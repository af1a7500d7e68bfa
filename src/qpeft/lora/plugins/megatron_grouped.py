"""Megatron-Core plugin: LoRA on ``GroupedMLP``, all local experts in two 2-D weights.

``GroupedMLP`` (``E`` local experts, hidden ``H``, expert FFN ``F``) stores
``weight1: [H, E * F']`` (``F' = 2F`` with a gated linear unit, ``[gate; up]`` per expert) and
``weight2: [E * F, H]``, and computes on the ``[E, in, out]`` views ``weight1.view(E, H, F')`` and
``weight2.view(E, F, H)``. Its rows arrive sorted by expert (``tokens_per_expert: [E]`` counts)::

    h[s] = x[s] @ W1[e] + scale * B1[e] (A1[e] x[s])        # fc1: in H, out F'
    y[s] = g[s] @ W2[e] + scale * B2[e] (A2[e] g[s])        # fc2: in F, out H
    g[s] = act(h[s]) * prob[s]                              # act = glu(act_fn) when gated

for the row ``s`` of expert ``e`` (``A1: [E, r, H]``, ``B1: [E, F', r]``, ``A2: [E, r, F]``,
``B2: [E, H, r]``). Every product is one grouped GEMM over the rows: ``grouped_gemm``'s
``gmm`` (as Megatron's own forward) for CUDA inputs when that package is installed, otherwise
``torch.nn.functional.grouped_mm`` (CPU, or CUDA bf16), see :mod:`qpeft.lora.moe_rows`.
``moe_apply_probs_on_input`` and the zero-token branch (every parameter kept in the graph) follow
Megatron's forward; ``moe_act`` activation recompute is not applied (the activation is kept).
Merge and export fold ``scale * B[e] @ A[e]`` into each expert's block of ``weight1``/``weight2``
through the same views. ``sharded_state_dict`` adds the factors, split on the expert axis over
expert parallelism, so ``dist_checkpointing`` saves and loads them. Expert tensor parallelism
(``expert_tensor_parallel_size > 1``) is rejected.
"""

from __future__ import annotations

from typing import Any

import torch
from megatron.core.dist_checkpointing import ShardedTensor
from megatron.core.transformer.moe import grouped_gemm_util as gg
from megatron.core.transformer.moe.experts import GroupedMLP
from torch import nn

from ..experts import LoRAExperts, Projection
from ..moe_rows import Routing, expert_matmul
from ..registry import register_lora

__all__ = ["LoRAGroupedMLP"]

_STORAGE = {"fc1": "weight1", "fc2": "weight2"}  # projection -> GroupedMLP parameter


class LoRAGroupedMLP(LoRAExperts):
    """LoRA around Megatron's ``GroupedMLP``: projections ``fc1`` and ``fc2``, ``[E, in, out]``
    layout.

    Raises:
        ValueError: at wrapping, when the experts are split by expert tensor parallelism.
    """

    def __init__(self, base: nn.Module) -> None:
        super().__init__(base)
        inner = self._inner()
        if inner.tp_group is not None and inner.tp_group.size() > 1:
            raise ValueError(
                f"{type(inner).__name__}: LoRA on expert layers needs expert_tensor_parallel_size=1"
            )

    @staticmethod
    def projections(base: nn.Module) -> dict[str, Projection]:
        experts, hidden = base.num_local_experts, base.config.hidden_size
        fc1_out = base.weight1.shape[1] // experts
        ffn = base.weight2.shape[0] // experts
        return {"fc1": Projection(hidden, fc1_out, True), "fc2": Projection(ffn, hidden, True)}

    @staticmethod
    def num_experts(base: nn.Module) -> int:
        return base.num_local_experts

    def expert_weight(self, name: str) -> torch.Tensor:
        """The ``[E, in, out]`` view of ``weight1`` (``fc1``) or ``weight2`` (``fc2``)."""
        inner = self._inner()
        proj = self.projections(inner)[name]
        weight = getattr(inner, _STORAGE[name])
        return weight.view(inner.num_local_experts, proj.in_features, proj.out_features)

    def _matmul(
        self, x: torch.Tensor, weight: torch.Tensor, routing: Routing, counts: torch.Tensor
    ) -> torch.Tensor:
        if routing.kind == "grouped" and x.is_cuda and gg.grouped_gemm_is_available():
            return gg.ops.gmm(x, weight, counts, trans_b=False)  # as GroupedMLP.forward
        return expert_matmul(x, weight, routing)

    def _project(
        self, name: str, x: torch.Tensor, routing: Routing, counts: torch.Tensor
    ) -> torch.Tensor:
        out = self._matmul(x, self.effective_weight(name), routing, counts)
        return self.lora_delta(name, x, routing, out)

    def forward(
        self,
        permuted_local_hidden_states: torch.Tensor,
        tokens_per_expert: torch.Tensor,
        permuted_probs: torch.Tensor,
    ) -> tuple[torch.Tensor, None]:
        """``(output [S, H], None)`` for rows ``[S, H]`` sorted by expert, ``[E]`` counts, ``[S]``
        probs.

        Raises:
            ValueError: for ``moe_apply_probs_on_input`` with ``moe_router_topk != 1``.
        """
        config = self._inner().config
        x, probs = permuted_local_hidden_states, permuted_probs
        if config.moe_apply_probs_on_input:
            if config.moe_router_topk != 1:
                raise ValueError("moe_apply_probs_on_input needs moe_router_topk=1")
            x = (probs.unsqueeze(-1) * x).to(x.dtype)
            probs = torch.ones_like(probs)
        routing = _routing(tokens_per_expert, probs, x)
        h = self._project("fc1", x, routing, tokens_per_expert)
        out = self._project(
            "fc2", _activation(config, h, probs.unsqueeze(-1)), routing, tokens_per_expert
        )
        return out, None

    def sharded_state_dict(
        self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None
    ) -> dict[str, Any]:
        """GroupedMLP's own sharded state dict (a quantized one's ``_amax`` too) plus every
        adapter factor, for ``dist_checkpointing``.

        A factor ``[E_local, ...]`` is this rank's slice of the global ``[E_global, ...]`` tensor
        on the expert axis (expert-parallel rank ``p`` holds experts ``p * E_local ...``), as the
        experts' weights are; it is replicated over the expert data-parallel group.
        """
        inner = self._inner()
        out = self.base.sharded_state_dict(prefix, sharded_offsets, metadata)  # with any _amax
        axis = len(sharded_offsets)
        expert_shard = (axis, inner.ep_group.rank(), inner.ep_group.size())
        for name, adapter in self.adapters.items():
            for key, factor in adapter.state_dict(
                prefix=f"{prefix}adapters.{name}.", keep_vars=True
            ).items():
                out[key] = ShardedTensor.from_rank_offsets(
                    key,
                    factor,
                    *sharded_offsets,
                    expert_shard,
                    replica_id=(0, 0, inner.dp_group.rank()),
                    prepend_axis_num=axis,
                )
        return out


def _routing(tokens_per_expert: torch.Tensor, probs: torch.Tensor, x: torch.Tensor) -> Routing:
    """Grouped rows: ``counts[e]`` consecutive rows per expert, in expert order.

    With no row at all (Megatron's zero-token branch) the layout is ``batched``: its per-row
    ``bmm`` over zero rows still puts every weight and factor in the graph (zero gradients).
    """
    device = x.device
    counts = tokens_per_expert.to(device=device, dtype=torch.long)
    experts = torch.arange(counts.numel(), device=device)
    rows = int(counts.sum())
    if rows != x.shape[0]:
        raise ValueError(f"tokens_per_expert sums to {rows} but there are {x.shape[0]} rows")
    return Routing(
        "grouped" if rows else "batched",
        experts.repeat_interleave(counts),
        torch.arange(rows, device=device),
        probs,
        torch.cumsum(counts, 0, dtype=torch.int32),
        rows,
        1,
    )


def _activation(config: Any, h: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """``act(h) * probs`` in ``h``'s dtype; gated: ``act(gate) * up`` on the halves of ``h``."""
    act = config.activation_func
    if config.gated_linear_unit:
        gate, up = torch.chunk(h, 2, dim=-1)
        out = act(gate) * up
    else:
        out = act(h)
    return (out * probs).to(h.dtype)


register_lora(GroupedMLP, LoRAGroupedMLP)
