r"""Megatron-Core plugin: quantized ``ColumnParallelLinear`` / ``RowParallelLinear`` (and so the
experts of ``SequentialMLP``) and grouped experts of ``GroupedMLP``.

A tensor-parallel layer of size ``P`` holds one shard of ``W: [out, in]`` (column-parallel: rows,
``W_p: [out/P, in]``; row-parallel: columns, ``W_p: [out, in/P]``). Its quantized result must be
the slice of the single-process one, ``Q(W)_p == Q(W_p)``, so every amax that spans the shards
is reduced (max) over the tensor-parallel group and every other stays local:

- per tensor (fp8/int ``axis=None``, the nvfp4 global amax): reduced;
- per index of ``axis`` (``axis=0``: one amax per output row): local when the sharded axis is kept
  (column-parallel rows), reduced when it is reduced over (row-parallel);
- blocks: local; a block size that does not divide the local size of the sharded axis (blocks
  would straddle two ranks) is refused with a ``ValueError`` naming the quantizer; a whole-axis
  block (``None``) on the sharded axis is reduced.

The input quantizer sees the input as the layer receives it: whole (column-parallel, or
row-parallel with ``input_is_parallel=False``, quantized before Megatron scatters it; elementwise
quantization commutes with the scatter), or this rank's columns (row-parallel with
``input_is_parallel``), where its calibrated (and dynamic) amax follows the same rules. The forward
is the base layer's own (``(output, bias)``, ``gather_output``, ``skip_bias_add``...) run with
``Q(W)`` in place of its weight (:func:`torch.func.functional_call`). ``sharded_state_dict`` adds
the quantizers' ``_amax``: sharded on the axis of the weight's shards when local to them,
replicated otherwise. Sequence-parallel layers and expert tensor parallelism are refused.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.utils import (
    ensure_metadata_has_dp_cp_group,
    make_sharded_tensors_for_checkpoint,
)
from torch import nn

from ...core.wrapping import innermost
from .. import blocks as bl
from ..layer import QuantDense
from ..quantizer import TensorQuantizer
from ..registry import register_quant

__all__ = ["ShardedTensorQuantizer", "QuantColumnParallelLinear", "QuantRowParallelLinear"]


def _group_size(group: Any) -> int:
    return 1 if group is None else group.size()


class ShardedTensorQuantizer(TensorQuantizer):
    """A quantizer of a tensor split over a tensor-parallel group along ``shard_dim`` (None: not
    split): an amax that spans the shards is all-reduced (max) over the group."""

    shard_dim: int | None = None
    tp_group: Any = None

    def shard(self, group: Any, dim: int | None) -> None:
        """Declare the tensors quantized here split along ``dim`` over ``group``."""
        self.tp_group, self.shard_dim = group, dim

    @property
    def tp_size(self) -> int:
        """The size of the group the tensor is split over."""
        return _group_size(self.tp_group) if self.shard_dim is not None else 1

    def _blocked(self) -> bool:
        return self.block_sizes is not None and self.fmt in ("int", "fp8")

    def spans_shards(self, ndim: int) -> bool:
        """Whether one amax entry covers several shards (for a tensor of ``ndim`` dims)."""
        if self.shard_dim is None:
            return False
        d = self.shard_dim % ndim
        if self._blocked():
            sizes = {a % ndim: s for a, s in self.block_sizes.items()}
            return d in sizes and sizes[d] is None
        if self.axis is None or self.fmt == "nvfp4":
            return True
        axes = self.axis if isinstance(self.axis, tuple) else (self.axis,)
        return d not in {a % ndim for a in axes}

    def amax_axis(self, ndim: int) -> int:
        """The axis of ``_amax`` that indexes the sharded axis of a local amax (``ndim``: data)."""
        d = self.shard_dim % ndim
        if not self._blocked():
            return d
        sizes = {a % ndim for a in self.block_sizes}
        return sum(2 if k in sizes else 1 for k in range(d))  # a blocked dim is (n / b, b)

    def check_blocks(self, shape: tuple[int, ...]) -> None:
        """Refuse blocks that would straddle two shards of a local tensor of ``shape``.

        Raises:
            ValueError: naming the quantizer, the block size and the local size.
        """
        if self.block_sizes is None or self.tp_size == 1:
            return
        d = self.shard_dim % len(shape)
        for axis, size in self.block_sizes.items():
            if size is not None and axis % len(shape) == d and shape[d] % size:
                raise ValueError(
                    f"{self._label()}: block size {size} does not divide the local shard's size "
                    f"{shape[d]} of axis {axis} (tensor-parallel size {self.tp_size}): blocks "
                    "would straddle two shards"
                )

    def _reduce(self, amax: torch.Tensor, ndim: int) -> torch.Tensor:
        if self.tp_size == 1 or not self.spans_shards(ndim):
            return amax
        amax = amax.clone()
        dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=self.tp_group)
        return amax

    def _fresh_amax(self, x: torch.Tensor) -> torch.Tensor:
        if self._blocked():
            return self._reduce(bl.block_amax(x, self.block_sizes), x.dim())
        return super()._fresh_amax(x)  # through _amax_of

    def _amax_of(self, xa: torch.Tensor) -> torch.Tensor:
        return self._reduce(super()._amax_of(xa), xa.dim())


class _QuantParallel(QuantDense):
    """Shared parts; a subclass names the sharded axis of ``W: [out, in]`` (0: out, 1: in)."""

    SHARD_AXIS: int
    weight_quantizer_class = ShardedTensorQuantizer

    @classmethod
    def quantizer_classes(cls, raw: nn.Module) -> dict[str, type[TensorQuantizer]]:
        """``weight_quantizer`` and ``input_quantizer``, both :class:`ShardedTensorQuantizer`."""
        return {
            "weight_quantizer": ShardedTensorQuantizer,
            "input_quantizer": ShardedTensorQuantizer,
        }

    @staticmethod
    def input_shard_dim(base: nn.Module) -> int | None:
        """The axis of the input that is split over the group as the layer receives it."""
        return None

    def __init__(
        self,
        base: nn.Module,
        weight_quantizer: TensorQuantizer | None = None,
        input_quantizer: TensorQuantizer | None = None,
    ) -> None:
        """Wrap ``base``; ValueError for sequence parallelism, expert tensor parallelism and
        blocks straddling shards (names the quantizer)."""
        kind = type(base).__name__
        if getattr(base, "sequence_parallel", False):
            raise ValueError(f"{kind}: quantize does not support sequence-parallel layers")
        if getattr(base, "explicit_expert_comm", False) and _group_size(base.tp_group) > 1:
            raise ValueError(f"{kind}: quantized expert layers need expert_tensor_parallel_size=1")
        super().__init__(base, weight_quantizer, input_quantizer)
        self.weight_quantizer.shard(base.tp_group, self.SHARD_AXIS)
        self.input_quantizer.shard(base.tp_group, self.input_shard_dim(base))
        self.weight_quantizer.check_blocks(tuple(base.weight.shape))
        if self.input_quantizer.shard_dim is not None:
            self.input_quantizer.check_blocks(tuple(base.weight.shape[1:]))

    def forward(self, input_: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, Any]:
        """The base layer's forward (``(output, bias)``) on ``Qin(x)`` with ``Qw(W)``."""
        inner = innermost(self)
        x = self.input_quantizer(input_)
        weight = {"weight": self.quantized_weight()}
        return torch.func.functional_call(inner, weight, (x, *args), kwargs)

    def sharded_state_dict(
        self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None
    ) -> dict[str, Any]:
        """The base's sharded state dict plus every ``_amax`` (sharded when local to a shard)."""
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        inner = innermost(self)
        out = inner.sharded_state_dict(prefix, sharded_offsets, metadata)
        amaxes, axes = {}, {}
        for name, q in self.quantizers().items():
            if q.amax is None:
                continue
            key = f"{name}._amax"
            amaxes[key] = q._amax
            ndim = 2 if name == "weight_quantizer" else q.amax.dim() - len(q.block_sizes or {})
            if q.tp_size > 1 and q.amax.dim() and not q.spans_shards(ndim):
                axes[key] = q.amax_axis(ndim)
        out.update(
            make_sharded_tensors_for_checkpoint(
                amaxes,
                prefix,
                axes,
                sharded_offsets,
                tp_group=inner.tp_group,
                dp_cp_group=metadata["dp_cp_group"],
            )
        )
        return out


class QuantColumnParallelLinear(_QuantParallel):
    """Quantized ``ColumnParallelLinear`` (``W`` split on ``out``, the input whole)."""

    SHARD_AXIS = 0


class QuantRowParallelLinear(_QuantParallel):
    """Quantized ``RowParallelLinear`` (``W`` split on ``in``; the input too when parallel)."""

    SHARD_AXIS = 1

    @staticmethod
    def input_shard_dim(base: nn.Module) -> int | None:
        return -1 if base.input_is_parallel else None


register_quant(ColumnParallelLinear, QuantColumnParallelLinear)
register_quant(RowParallelLinear, QuantRowParallelLinear)

# GroupedMLP experts (needs megatron-core's MoE module, imported with this plugin).
from . import megatron_grouped  # noqa: E402, F401
