"""Megatron-Core plugin: LoRA for ``ColumnParallelLinear`` and ``RowParallelLinear``.

With tensor-parallel size ``P`` and rank ``p`` (``x: [s, b, in]``, full weight ``W: [out, in]``):

- column-parallel base (``W`` split on ``out``, rank ``p`` holds ``W_p: [out/P, in]``):
  ``A: [r, in]`` is replicated, ``B`` split on ``out`` (``B_p: [out/P, r]``);
  ``y_p = W_p x + s B_p (A x)``. The ``[.., r]`` activation ``h = A x`` goes through Megatron's
  ``copy_to_tensor_model_parallel_region`` (identity forward, all-reduce of ``dh`` backward), so
  ``dA`` and ``dx`` are complete on every rank; with ``gather_output`` the LoRA term is gathered
  like the base output.
- row-parallel base (``W`` split on ``in``, ``W_p: [out, in/P]``): ``A`` split on ``in``
  (``A_p: [r, in/P]``), ``B: [out, r]`` replicated; ``h = all-reduce(A_p x_p)``, ``y = W x + s B h``
  (the base's own all-reduce already summed ``W_p x_p``). The input is scattered first when the
  base's ``input_is_parallel`` is False.

A new adapter is initialised at full size (identical on every rank, which share the default RNG
state as Megatron requires) and each rank keeps its shard, so a ``P``-way model starts exactly
as the single-process one. ``svdquant`` gathers the weight residual ``W - Q(W)`` over the
tensor-parallel group, runs the SVD of the full matrix and keeps the shard.
``sharded_state_dict`` marks ``lora_b`` (column) / ``lora_a`` (row) as tensor-parallel shards on the
axis of the base weight and the other factor as replicated, so Megatron's ``dist_checkpointing``
saves and loads adapters. Sequence-parallel layers are rejected. Expert layers (``is_expert``,
e.g. each expert MLP of Megatron's ``SequentialMLP``, addressable as ``*local_experts.3.*``) are
supported when their expert tensor-parallel size is 1 (with expert parallelism each expert is whole
on its rank); expert tensor parallelism is rejected. ``GroupedMLP`` gets per-expert adapters from
:mod:`qpeft.lora.plugins.megatron_grouped` (registered below); Transformer Engine grouped experts
are not supported.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
    scatter_to_tensor_model_parallel_region,
)
from megatron.core.transformer.utils import (
    ensure_metadata_has_dp_cp_group,
    make_sharded_tensors_for_checkpoint,
)
from torch import nn

from ..adapter import LoRAAdapter
from ..layer import LoRAModule
from ..registry import register_lora

__all__ = ["LoRAColumnParallelLinear", "LoRARowParallelLinear"]


class _LoRAParallel(LoRAModule):
    """Shared parts; a subclass names the sharded axis (0: out, 1: in) and its communication."""

    supports_adapter_routing = False  # qpeft.adapter_routing: not implemented for Megatron layers
    SHARD_AXIS: int  # axis of the base weight [out, in] that is split over the TP group
    SHARDED_FACTOR: str  # the adapter factor split the same way

    def __init__(self, base: nn.Module) -> None:
        super().__init__(base)
        if getattr(base, "sequence_parallel", False):
            raise ValueError(
                f"{type(base).__name__}: LoRA does not support sequence-parallel layers"
            )
        if getattr(base, "explicit_expert_comm", False) and self.tp_size > 1:
            # The MoE token dispatcher then reduces partial outputs itself; the adapters' own
            # communication would double it.
            raise ValueError(
                f"{type(base).__name__}: LoRA on expert layers needs expert_tensor_parallel_size=1"
            )

    @property
    def tp_size(self) -> int:
        """Tensor-parallel world size of the base layer."""
        group = self.base.tp_group
        return 1 if group is None else group.size()

    @property
    def tp_rank(self) -> int:
        """This process's rank in the base layer's tensor-parallel group."""
        group = self.base.tp_group
        return 0 if group is None else group.rank()

    @staticmethod
    def features(base: nn.Module) -> tuple[int, int]:
        # Local (this rank's) sizes: the weight is [out_local, in_local].
        out_f, in_f = base.weight.shape
        return in_f, out_f

    def _full_features(self) -> tuple[int, int]:
        in_f, out_f = self.features(self.base)
        size = self.tp_size
        return (in_f, out_f * size) if self.SHARD_AXIS == 0 else (in_f * size, out_f)

    def _shard(self, full: torch.Tensor, axis: int) -> torch.Tensor:
        return full.chunk(self.tp_size, dim=axis)[self.tp_rank]

    @torch.no_grad()
    def init_adapter(self, adapter: LoRAAdapter, layer_name: str) -> None:
        """Initialise the full-size factors identically on every rank and keep this rank's shard.

        Raises:
            ValueError: for ``svdquant`` on non-finite weights (names the layer).
        """
        in_f, out_f = self._full_features()
        full = LoRAAdapter(in_f, out_f, adapter.config, adapter.lora_a.dtype, adapter.lora_a.device)
        super().init_adapter(full, layer_name)
        a_axis, b_axis = (None, 0) if self.SHARD_AXIS == 0 else (1, None)
        adapter.lora_a.copy_(full.lora_a if a_axis is None else self._shard(full.lora_a, a_axis))
        adapter.lora_b.copy_(full.lora_b if b_axis is None else self._shard(full.lora_b, b_axis))

    def quantization_residual(self) -> torch.Tensor | None:
        """The full ``W - Q(W)``, gathered over the tensor-parallel group (a collective)."""
        local = super().quantization_residual()
        return None if local is None else self._gather(local)

    def _gather(self, local: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return local
        parts = [torch.empty_like(local) for _ in range(self.tp_size)]
        dist.all_gather(parts, local.contiguous(), group=self.base.tp_group)
        return torch.cat(parts, dim=self.SHARD_AXIS)

    def _lora(self, x: torch.Tensor) -> torch.Tensor | None:
        """Sum of active adapters' ``scale * B (comm(A x))`` in the output's local layout.

        Active: enabled and not merged (a merged adapter's update is already in the weight).
        """
        total = None
        for adapter in self.adapters.values():
            if not adapter.active:
                continue
            dtype = adapter.lora_a.dtype
            h = self._after_a(torch.nn.functional.linear(x.to(dtype), adapter.lora_a))
            y = torch.nn.functional.linear(h, adapter.lora_b) * adapter.scale
            total = y if total is None else total + y
        return total

    def sharded_state_dict(
        self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None
    ) -> dict[str, Any]:
        """The base's sharded state dict plus every adapter's factors (sharded or replicated)."""
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        out = self.base.sharded_state_dict(prefix, sharded_offsets, metadata)
        for name, adapter in self.adapters.items():
            out.update(
                make_sharded_tensors_for_checkpoint(
                    adapter.state_dict(prefix="", keep_vars=True),
                    f"{prefix}adapters.{name}.",
                    {self.SHARDED_FACTOR: self.SHARD_AXIS},
                    sharded_offsets,
                    tp_group=self.base.tp_group,
                    dp_cp_group=metadata["dp_cp_group"],
                )
            )
        return out


class LoRAColumnParallelLinear(_LoRAParallel):
    """LoRA around ``ColumnParallelLinear``: ``A`` replicated, ``B`` split on ``out``."""

    SHARD_AXIS = 0
    SHARDED_FACTOR = "lora_b"

    def _after_a(self, h: torch.Tensor) -> torch.Tensor:
        # identity forward; backward all-reduces dh, completing dA (A replicated) and dx
        return copy_to_tensor_model_parallel_region(h, group=self.base.tp_group)

    def forward(self, input_: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, Any]:
        """``(output, bias)`` as the base returns them, the LoRA term added (gathered if the base
        gathers)."""
        output, bias = self.base(input_, *args, **kwargs)
        lora = self._lora(input_)
        if lora is None:
            return output, bias
        gather = kwargs.get("runtime_gather_output")
        if gather if gather is not None else self.base.gather_output:
            lora = gather_from_tensor_model_parallel_region(lora, group=self.base.tp_group)
        return output + lora.to(output.dtype), bias


class LoRARowParallelLinear(_LoRAParallel):
    """LoRA around ``RowParallelLinear``: ``A`` split on ``in``, ``B`` replicated."""

    SHARD_AXIS = 1
    SHARDED_FACTOR = "lora_a"

    def _after_a(self, h: torch.Tensor) -> torch.Tensor:
        # all-reduce forward sums the partial A_p x_p; identity backward (dh is replicated)
        return reduce_from_tensor_model_parallel_region(h, group=self.base.tp_group)

    def forward(self, input_: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """``(output, bias)`` as the base returns them, the (all-reduced) LoRA term added."""
        output, bias = self.base(input_)
        if not any(a.active for a in self.adapters.values()):
            return output, bias
        x = (
            input_
            if self.base.input_is_parallel
            else scatter_to_tensor_model_parallel_region(input_, group=self.base.tp_group)
        )
        return output + self._lora(x).to(output.dtype), bias


register_lora(ColumnParallelLinear, LoRAColumnParallelLinear)
register_lora(RowParallelLinear, LoRARowParallelLinear)

# GroupedMLP experts (needs megatron-core's MoE module, imported with this plugin).
from . import megatron_grouped  # noqa: E402, F401
