"""Megatron-Core plugin: quantized ``GroupedMLP``, one weight quantizer per projection.

``GroupedMLP`` keeps its ``E`` local experts in ``weight1: [H, E * F']`` and ``weight2: [E * F, H]``
and computes on the ``[E, in, out]`` views ``weight1.view(E, H, F')`` / ``weight2.view(E, F, H)``.
:class:`QuantGroupedMLP` quantizes those views per expert (``fc1_weight_quantizer`` and
``fc2_weight_quantizer``, :class:`~qpeft.quant.experts.TransposedExpertsTensorQuantizer`: each
expert's ``[out, in]`` matrix as an ``nn.Linear`` weight, ``_amax: [E, out, 1]`` per row), the
projection names the LoRA plugin (:mod:`qpeft.lora.plugins.megatron_grouped`) uses, which reads the
quantized views through ``effective_weight``. Its forward is ``GroupedMLP``'s own with the quantized
weights in place (CUDA ``grouped_gemm``). ``sharded_state_dict`` adds the ``_amax`` buffers split
on the expert axis over expert parallelism. Expert tensor parallelism is refused.
"""

from __future__ import annotations

from typing import Any

import torch
from megatron.core.dist_checkpointing import ShardedTensor
from megatron.core.transformer.moe.experts import GroupedMLP
from torch import nn

from ...core.wrapping import innermost
from ..experts import QuantExperts
from ..registry import register_quant

__all__ = ["QuantGroupedMLP"]

_STORAGE = {"fc1": "weight1", "fc2": "weight2"}  # projection -> GroupedMLP parameter


def _views(inner: nn.Module) -> dict[str, torch.Tensor]:
    experts, hidden = inner.num_local_experts, inner.config.hidden_size
    return {
        "fc1": inner.weight1.view(experts, hidden, -1),
        "fc2": inner.weight2.view(experts, -1, hidden),
    }


class QuantGroupedMLP(QuantExperts):
    """Megatron's ``GroupedMLP`` with ``fc1_weight_quantizer`` / ``fc2_weight_quantizer``."""

    def __init__(self, base: nn.Module, **quantizers: Any) -> None:
        """Wrap ``base``; ValueError when its experts are split by expert tensor parallelism."""
        group = base.tp_group
        if group is not None and group.size() > 1:
            raise ValueError(
                f"{type(base).__name__}: quantized experts need expert_tensor_parallel_size=1"
            )
        super().__init__(base, **quantizers)

    @staticmethod
    def projections(raw: nn.Module) -> dict[str, bool]:
        return {"fc1": True, "fc2": True}  # the [E, in, out] views

    def weights(self) -> dict[str, torch.Tensor]:
        """``{"fc1_weight_quantizer": weight1 as [E, H, F'], "fc2_...": weight2 as [E, F, H]}``."""
        return {f"{n}_weight_quantizer": v for n, v in _views(innermost(self)).items()}

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """``GroupedMLP.forward`` with ``weight1`` / ``weight2`` fake-quantized per expert."""
        inner = innermost(self)
        weights = {
            _STORAGE[name]: q.reshape(getattr(inner, _STORAGE[name]).shape)
            for name, q in self.quantized_weights().items()
        }
        return torch.func.functional_call(inner, weights, args, kwargs)

    def sharded_state_dict(
        self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None
    ) -> dict[str, Any]:
        """GroupedMLP's own sharded state dict plus every ``_amax`` ``[E_local, ...]``, this rank's
        slice on the expert axis (as the weights), replicated over expert data parallelism."""
        inner = innermost(self)
        out = inner.sharded_state_dict(prefix, sharded_offsets, metadata)
        axis = len(sharded_offsets)
        expert_shard = (axis, inner.ep_group.rank(), inner.ep_group.size())
        for name, q in self.quantizers().items():
            if q.amax is None:
                continue
            key = f"{prefix}{name}._amax"
            out[key] = ShardedTensor.from_rank_offsets(
                key,
                q._amax,
                *sharded_offsets,
                expert_shard,
                replica_id=(0, 0, inner.dp_group.rank()),
                prepend_axis_num=axis,
            )
        return out


register_quant(GroupedMLP, QuantGroupedMLP)
