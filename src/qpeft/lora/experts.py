"""LoRA on grouped experts: modules that keep every expert's weight in one 3-D tensor.

An experts module holds, per projection ``p`` (e.g. ``gate_up_proj``, ``down_proj``), a weight
``W_p: [E, out, in]`` (or the transposed layout ``[E, in, out]``). One adapter gives every expert
of every projection its own low-rank pair::

    A_p: [E, r, in],  B_p: [E, out, r],  y[s] = W_p[e] x[s] + scale * B_p[e] (A_p[e] x[s])

for the row ``s`` routed to expert ``e``. Both products run over all routed rows at once (one
grouped GEMM or one batched matmul, see :mod:`qpeft.lora.moe_rows`), never a loop over experts.

:class:`LoRAExperts` is the generic layer: it sizes, initialises and evaluates the adapters; a
plugin subclass (see :mod:`qpeft.lora.plugins.moe`) says which projections a module has and
writes the expert forward around :meth:`LoRAExperts.project`. A base weight is fake-quantized by
``<p>_weight_quantizer`` when the wrapped module chain has one (one module over the whole
``[E, ...]`` tensor, so per-expert scales are the quantizer's own axis/blocks); ``svdquant`` seeds
every expert's pair from the rank-r SVD of its own residual ``W_p[e] - Q(W_p)[e]`` (batched SVD).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.wrapping import innermost
from ..quant.compressed_experts import packed_projections, projection_tensors
from ..quant.layer import QuantModule, find_weight_quantizer
from .adapter import AdapterState
from .config import PEFTAttributeConfig
from .init import init_factors, svdquant_factors
from .layer import LoRAModule
from .moe_rows import Routing, expert_matmul

__all__ = ["Projection", "GroupedLoRA", "ExpertsLoRAAdapter", "LoRAExperts"]

_ALIGN_BYTES = 16  # grouped GEMM strides: pad the rank so the [S, r] intermediate stays aligned


@dataclass(frozen=True)
class Projection:
    """One 3-D projection weight: ``in``/``out`` features and whether it is stored ``[E, in,
    out]``."""

    in_features: int
    out_features: int
    transposed: bool


class GroupedLoRA(nn.Module):
    """The factors of one projection for all experts: ``lora_a [E, r, in]``, ``lora_b [E, out,
    r]``."""

    def __init__(
        self, experts: int, proj: Projection, rank: int, dtype: torch.dtype, device: Any
    ) -> None:
        super().__init__()
        self.transposed = proj.transposed
        self.lora_a = nn.Parameter(
            torch.zeros(experts, rank, proj.in_features, dtype=dtype, device=device)
        )
        self.lora_b = nn.Parameter(
            torch.zeros(experts, proj.out_features, rank, dtype=dtype, device=device)
        )

    def forward(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """``B[e] (A[e] x[s])`` for every row: ``x [S, in] -> [S, out]`` (unscaled, adapter
        dtype)."""
        a, b = self.lora_a, self.lora_b
        pad = -a.shape[1] % max(1, _ALIGN_BYTES // a.element_size())
        if routing.kind == "grouped" and pad:
            # Zero rank padding keeps the grouped GEMM's strides aligned; it adds exact zeros.
            a, b = F.pad(a, (0, 0, 0, pad)), F.pad(b, (0, pad))
        return expert_matmul(
            expert_matmul(x, a.transpose(-2, -1), routing), b.transpose(-2, -1), routing
        )

    def delta_weight(self, scale: float) -> torch.Tensor:
        """``scale * B[e] @ A[e]`` for every expert, fp32, in the base weight's own layout."""
        delta = torch.bmm(self.lora_b.float(), self.lora_a.float()) * scale
        return delta.transpose(-2, -1) if self.transposed else delta


class ExpertsLoRAAdapter(AdapterState):
    """One named adapter of an experts layer: a :class:`GroupedLoRA` per projection, one scale.

    Its children are named after the projections, so the state_dict keys of adapter ``default``
    are ``<experts>.adapters.default.<projection>.lora_a`` / ``.lora_b``. A projection pattern can
    leave some projections out (``update_model`` with
    ``<experts>.<projection>: {"enable": False}``): those have no child, no parameters and no
    LoRA term.

    ``scale``, ``enable``, ``merged``, :attr:`active` and :attr:`config` are the
    :class:`~qpeft.lora.adapter.AdapterState` every adapter has.
    """

    def __init__(
        self,
        experts: int,
        projections: dict[str, Projection],
        config: PEFTAttributeConfig,
        dtype: torch.dtype,
        device: Any,
    ) -> None:
        super().__init__(config)
        for name, proj in projections.items():  # children named as the base weights they adapt
            self.add_module(name, GroupedLoRA(experts, proj, config.rank, dtype, device))

    @property
    def factors(self) -> dict[str, GroupedLoRA]:
        """``{projection name: GroupedLoRA}``."""
        return dict(self.named_children())

    @property
    def rank(self) -> int:
        """The adapter's rank ``r``."""
        return next(self.children()).lora_a.shape[1]

    def delta_weight(self) -> dict[str, torch.Tensor]:
        """``{projection: scale * B @ A}``, fp32, each ``[E, ...]`` in its base weight's layout.

        Export folds an experts adapter with ``W_p += delta_weight()[p]`` for every projection.
        """
        return {name: f.delta_weight(self.scale) for name, f in self.factors.items()}

    def extra_repr(self) -> str:
        return (
            f"projections={list(self.factors)}, rank={self.rank}, scale={self.scale}, "
            f"enable={self.enable}"
        )


class LoRAExperts(LoRAModule):
    """Base class of LoRA layers over grouped experts; subclasses give projections and forward."""

    supports_adapter_routing = False  # qpeft.adapter_routing: not implemented for experts

    @staticmethod
    def projections(base: nn.Module) -> dict[str, Projection]:
        """``{parameter name: Projection}`` of the (innermost) experts module."""
        raise NotImplementedError

    @staticmethod
    def num_experts(base: nn.Module) -> int:
        """Number of experts ``E`` of the (innermost) experts module."""
        raise NotImplementedError

    @staticmethod
    def features(base: nn.Module) -> tuple[int, int]:
        """Not defined for experts (one ``(in, out)`` per projection): raises TypeError."""
        raise TypeError("an experts layer has one (in, out) per projection; see projections()")

    # -- weights ------------------------------------------------------------------------------
    def expert_weight(self, name: str) -> torch.Tensor:
        """Projection ``name``'s original 3-D weight ``[E, ...]``: the parameter ``name`` itself
        here.

        A subclass whose module stores the experts otherwise (e.g. Megatron's 2-D ``weight1``)
        returns a 3-D view of its storage; merge and export write through that view.
        """
        return getattr(self._inner(), name)

    def base_weights(self) -> dict[str, torch.Tensor]:
        """The original 3-D weights (or 3-D views of them), by projection name."""
        return {name: self.expert_weight(name) for name in self.projections(self._inner())}

    def weight_kind(self) -> tuple[torch.dtype, torch.device]:
        """The compute dtype and device of the experts' weights, packed (``qpeft.compress``) or
        not, read without dequantizing."""
        inner = self._inner()
        packed = packed_projections(inner)
        if packed:
            name, projection = next(iter(packed.items()))
            return projection.dtype, projection_tensors(inner, name)["packed"].device
        weight = next(iter(self.base_weights().values()))
        return weight.dtype, weight.device

    def weight_quantizer(self, name: str) -> nn.Module | None:
        """``<name>_weight_quantizer`` of the wrapped chain (a quantized experts wrapper), or
        None."""
        return find_weight_quantizer(self.base, f"{name}_weight_quantizer", enabled=False)

    def effective_weight(self, name: str) -> torch.Tensor:
        """Projection ``name``'s weight as the forward uses it: fake-quantized when it has a
        quantizer.

        Over a quantized experts wrapper (``qpeft.quantize``) this is the wrapper's cached ``Q(W)``.
        """
        if isinstance(self.base, QuantModule):
            return self.base.quantized(f"{name}_weight_quantizer")
        weight = self.expert_weight(name)
        quantizer = self.weight_quantizer(name)
        return weight if quantizer is None else quantizer(weight)

    def _inner(self) -> nn.Module:
        return innermost(self)

    # -- adapters -----------------------------------------------------------------------------
    def new_adapter(
        self,
        config: PEFTAttributeConfig,
        dtype: torch.dtype | None,
        only: Collection[str] | None = None,
    ) -> ExpertsLoRAAdapter:
        """A zero-filled adapter with one factor pair per projection, on the weights' device.

        Args:
            config: the adapter's attributes.
            dtype: the factors' dtype; None uses the base weights'.
            only: the projections that get factors (None: all). Unknown names are a ValueError.
        """
        inner = self._inner()
        projections = self.projections(inner)
        if only is not None:
            unknown = [p for p in only if p not in projections]
            if unknown or not only:
                raise ValueError(
                    f"{type(self).__name__}: projections {list(only)} are not a non-empty subset "
                    f"of {list(projections)}"
                )
            projections = {p: proj for p, proj in projections.items() if p in only}
        weight_dtype, device = self.weight_kind()
        return ExpertsLoRAAdapter(
            self.num_experts(inner), projections, config, dtype or weight_dtype, device
        )

    @torch.no_grad()
    def init_adapter(self, adapter: ExpertsLoRAAdapter, layer_name: str) -> None:
        """Fill a new adapter per expert: ``kaiming_zeros`` (initializers per expert) or
        ``svdquant`` (a batched SVD of every expert's residual ``W_p[e] - Q(W_p)[e]``).

        Raises:
            ValueError: for ``svdquant`` on non-finite weights (names the layer and projection).
        """
        config = adapter.config
        for name, factors in adapter.factors.items():
            if config.lora_init_method != "svdquant":
                init_factors(factors.lora_a, factors.lora_b, config)
                continue
            residual = self.projection_residual(name)
            rank, what = factors.lora_a.shape[1], f" projection {name!r}"
            found = svdquant_factors(residual, rank, adapter.scale, layer_name, what)
            if found is not None:  # else the factors stay zero
                factors.lora_a.copy_(found[0])
                factors.lora_b.copy_(found[1])

    def projection_residual(self, name: str) -> torch.Tensor | None:
        """``W_p - Q(W_p)`` of projection ``name`` in fp32, ``[E, out, in]``; None without an
        enabled weight quantizer."""
        quantizer = find_weight_quantizer(self.base, f"{name}_weight_quantizer")
        if quantizer is None:
            return None
        weight = self.expert_weight(name).detach()
        residual = weight.float() - quantizer(weight).float()
        return (
            residual.transpose(-2, -1)
            if self.projections(self._inner())[name].transposed
            else residual
        )

    def folded_parameters(self) -> list[nn.Parameter]:
        """The experts module's own parameters (the 3-D weights, or the storage they view)."""
        return list(self._inner().parameters(recurse=False))

    def probe_inputs(self, rows: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        """``(x [rows, H], experts [rows, 1], weights [rows, 1])``: row ``i`` to expert ``i%E``."""
        inner = self._inner()
        dtype, device = self.weight_kind()
        hidden = next(iter(self.projections(inner).values())).in_features
        x = torch.randn(rows, hidden, generator=generator).to(device, dtype)
        experts = torch.arange(rows, device=device) % self.num_experts(inner)
        ones = torch.ones(rows, 1, device=device, dtype=dtype)
        return x, experts.unsqueeze(-1), ones

    # -- forward pieces -----------------------------------------------------------------------
    def active_adapters(self) -> list[ExpertsLoRAAdapter]:
        """Active (enabled, not merged) adapters, in insertion order."""
        return [a for a in self.adapters.values() if a.active]

    @torch.no_grad()
    def fold_adapter(self, adapter: ExpertsLoRAAdapter, sign: float) -> None:
        """``W_p <- cast(W_p + sign * delta_p)`` for every projection (merge, unmerge, export)."""
        for name, delta in adapter.delta_weight().items():
            weight = self.expert_weight(name)
            # detach() shares the version counter, so caches keyed on the weight see the change
            view = weight.detach()
            view.copy_((view.float() + sign * delta).to(weight.dtype))

    def lora_delta(
        self, name: str, x: torch.Tensor, routing: Routing, out: torch.Tensor
    ) -> torch.Tensor:
        """``out`` plus every enabled adapter's ``scale * B[e] A[e] x`` for projection ``name``.

        Adapters without factors for ``name`` (projection patterns left it out) add nothing.
        """
        cast: dict[torch.dtype, torch.Tensor] = {}
        for adapter in self.active_adapters():
            factors = adapter.factors.get(name)
            if factors is None:
                continue
            dtype = factors.lora_a.dtype
            if dtype not in cast:
                cast[dtype] = x if x.dtype == dtype else x.to(dtype)
            out = out + (factors(cast[dtype], routing) * adapter.scale).to(out.dtype)
        return out
