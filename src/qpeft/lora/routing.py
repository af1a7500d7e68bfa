"""``adapter_routing``: per-sample adapters for one batch (serving many adapters at once).

Inside ``with qpeft.adapter_routing(model, names):`` sample ``i`` of every batch that reaches a LoRA
layer gets exactly adapter ``names[i]`` (its own ``scale``), whatever the adapters' ``enable``
flags; ``None`` means no adapter at all for that sample (the base model's output). A layer that
lacks the named adapter adds nothing for that sample.
Works for training, inference and ``generate`` (the batch size must stay ``len(names)``).

The math inside one LoRA layer. With the ``K`` routed adapters of one dtype stacked (ranks
zero-padded to ``r = max r_k``, plus one
all-zero adapter at index ``K`` for samples routed to no adapter):

    A: [K+1, r, in]   B: [K+1, out, r]   s: [K+1]   idx: [b]   (idx_i = K when sample i has none)
    x: [b, L, in]  ->  t = bmm(x, A[idx]^T) * s[idx]   [b, L, r]
                       y = baddbmm(y, t, B[idx]^T)      [b, L, out]

Two batched matmuls per dtype group whatever the mix of adapters: no loop over sub-batches. Zero
padding and the zero adapter add exact zeros, so a sample routed to no adapter keeps the base output
bit for bit. Gradients flow to the factors through the gather.

With few tokens per sample (decoding: ``L = 1``) gathering ``[b, r, in]`` and ``[b, out, r]`` copies
of the factors costs more than the products. There every token multiplies all ``K`` adapters at
once and a mask keeps its own (no gather, two plain matmuls over the concatenated ranks
``R = sum r_k``)::

    A: [R, in]   B: [out, R]   m: [b, R] (s_k on the columns of sample i's adapter k, else 0)
    t = (x A^T) * m[sample]    [b, L, R]
    y = y + t B^T              [b, L, out]

It does ``K`` times the adapter arithmetic, so it is taken only while ``L * (R - r) <= 16 r``
(:data:`DENSE_MARGIN`), i.e. while that arithmetic is cheaper than the gathers.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .layer import check_adapter_names, lora_layers, require_lora_layers

__all__ = ["adapter_routing", "LayerRoute", "plan_route", "routed_forward", "DENSE_MARGIN"]


def _check_names(model: nn.Module, names: Sequence[str | None]) -> list[str | None]:
    if isinstance(names, str) or not isinstance(names, Sequence):
        raise TypeError(
            f"adapter_routing: expected a list of adapter names (or None), got {names!r}"
        )
    names = list(names)
    if not names:
        raise ValueError("adapter_routing: the list of adapter names is empty")
    for i, name in enumerate(names):
        if name is not None and not isinstance(name, str):
            raise TypeError(f"adapter_routing: names[{i}] = {name!r} is neither a str nor None")
    layers = require_lora_layers(model, "adapter_routing")
    check_adapter_names(layers, [n for n in names if n is not None], "adapter_routing")
    merged = sorted(
        {(ln, a) for ln, layer in layers.items() for a, ad in layer.adapters.items() if ad.merged}
    )
    if merged:
        raise ValueError(
            f"adapter_routing: adapter {merged[0][1]!r} is merged into layer {merged[0][0]!r}; "
            "call qpeft.unmerge_adapters first (a merged adapter would reach every sample)"
        )
    return names


@contextmanager
def adapter_routing(model: nn.Module, adapter_names: Sequence[str | None]) -> Iterator[nn.Module]:
    """Route sample ``i`` of each batch through adapter ``adapter_names[i]`` inside the block.

    Args:
        model: a model converted by :func:`qpeft.update_model`.
        adapter_names: one adapter name per sample, or None for "no adapter" for that sample.

    Raises:
        TypeError: ``adapter_names`` is not a list of str/None.
        ValueError: empty list, a name no layer has, a merged adapter, or a model without LoRA
        layers (checked on
            entry, nothing changed); inside the block, a forward whose batch size differs from
            ``len(adapter_names)`` (names the layer).

    Nothing is recorded in the mode log: the model leaves the block as it entered it.
    """
    names = _check_names(model, adapter_names)
    layers = lora_layers(model)
    # layers with their own forward (grouped experts, Megatron) would ignore the routing silently
    fixed = [n for n, layer in layers.items() if not layer.supports_adapter_routing]
    if fixed:
        raise ValueError(
            f"adapter_routing: layer {fixed[0]!r} ({type(layers[fixed[0]]).__name__}) does not "
            "support per-sample adapters"
        )
    routes = {n: plan_route(n, layer.adapters, names) for n, layer in layers.items()}
    saved = {n: layer._routing for n, layer in layers.items()}
    try:
        for n, layer in layers.items():
            layer._routing = routes[n]
        yield model
    finally:
        for n, layer in layers.items():
            layer._routing = saved[n]


DENSE_MARGIN = 16  # dense path while tokens_per_sample * (R - r) <= DENSE_MARGIN * r


@dataclass(frozen=True)
class _Group:
    names: tuple[str, ...]  # adapters of one dtype, in stacking order
    index: torch.Tensor  # [b] long; len(names) means "no adapter of this group"
    # Without autograd, tensors built from unchanged factors are reused across the block's calls
    # (decoding calls every layer once per token): key -> (factor versions and scales, tensors).
    cache: dict = field(default_factory=dict, compare=False, repr=False)

    def reuse(self, key: str, adapters: list[nn.Module], build):
        """``build()``, or its cached result while no factor (or scale) changed and grad is off."""
        params = [p for m in adapters for p in (m.lora_a, m.lora_b)]
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            return build()
        stamp = tuple((id(p), p._version) for p in params) + tuple(m.scale for m in adapters)
        hit = self.cache.get(key)
        if hit is None or hit[0] != stamp:
            hit = self.cache[key] = (stamp, build())
        return hit[1]


@dataclass(frozen=True)
class LayerRoute:
    """The routing of one layer: its name, batch size and one gather index per adapter dtype."""

    layer: str
    batch: int
    groups: tuple[_Group, ...]

    def apply(self, layer: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``y`` plus each sample's routed adapter update (:func:`routed_forward`)."""
        return routed_forward(layer, self, x, y)


def plan_route(layer_name: str, adapters: nn.ModuleDict, names: Sequence[str | None]) -> LayerRoute:
    """Group the layer's adapters named in ``names`` by dtype and build each group's index.

    Samples whose name is None, or names an adapter this layer lacks, get no adapter here.
    """
    present = [n for n in dict.fromkeys(names) if n is not None and n in adapters]
    by_dtype: dict[torch.dtype, list[str]] = {}
    for name in present:
        by_dtype.setdefault(adapters[name].lora_a.dtype, []).append(name)
    device = next(iter(adapters.values())).lora_a.device if len(adapters) else None
    groups = []
    for group in by_dtype.values():
        slot = {n: i for i, n in enumerate(group)}
        index = torch.tensor(
            [slot.get(n, len(group)) for n in names], dtype=torch.long, device=device
        )
        groups.append(_Group(tuple(group), index))
    return LayerRoute(layer_name, len(names), tuple(groups))


def _stack(factors: list[torch.Tensor], rank_dim: int, rank: int) -> torch.Tensor:
    """Stack factors zero-padded to ``rank`` along ``rank_dim``, plus one all-zero factor."""
    padded = []
    for f in factors:
        extra = rank - f.shape[rank_dim]
        pad = (0, extra, 0, 0) if rank_dim == 1 else (0, 0, 0, extra)
        padded.append(F.pad(f, pad) if extra else f)
    padded.append(torch.zeros_like(padded[0]))
    return torch.stack(padded)


def _gathered_update(x, y, adapters: list[nn.Module], group: _Group, rank: int):
    dtype = adapters[0].lora_a.dtype

    def stacked():
        a = _stack([m.lora_a for m in adapters], 0, rank)  # [K+1, r, in]
        b = _stack([m.lora_b for m in adapters], 1, rank)  # [K+1, out, r]
        scale = torch.tensor([m.scale for m in adapters] + [0.0], dtype=dtype, device=x.device)
        return a, b, scale

    a, b, scale = group.reuse("gathered", adapters, stacked)
    index = group.index.to(x.device)
    x3 = x.reshape(x.shape[0], -1, x.shape[-1]).to(dtype)
    t = torch.bmm(x3, a[index].transpose(1, 2)) * scale[index][:, None, None]
    y3 = y.reshape(y.shape[0], -1, y.shape[-1])
    if y.dtype == dtype:
        return torch.baddbmm(y3, t, b[index].transpose(1, 2)).view(y.shape)
    return (y3 + torch.bmm(t, b[index].transpose(1, 2)).to(y.dtype)).view(y.shape)


def _dense_update(x, y, adapters: list[nn.Module], group: _Group):
    dtype = adapters[0].lora_a.dtype

    def concatenated():
        a = torch.cat([m.lora_a for m in adapters], 0)  # [R, in]
        b = torch.cat([m.lora_b for m in adapters], 1)  # [out, R]
        columns = torch.cat(
            [torch.full((m.rank,), k, device=x.device) for k, m in enumerate(adapters)]
        )
        scales = torch.tensor([m.scale for m in adapters], dtype=dtype, device=x.device)
        index = group.index.to(x.device)
        mask = torch.where(
            index[:, None] == columns[None, :], scales[columns][None, :], 0.0
        )  # [b, R]
        return a, b, mask[:, None, :]

    a, b, mask = group.reuse("dense", adapters, concatenated)
    x3 = x.reshape(x.shape[0], -1, x.shape[-1]).to(dtype)
    t = ((x3 @ a.t()) * mask).view(-1, a.shape[0])  # [b * L, R]
    y2 = y.reshape(-1, y.shape[-1])
    if y.dtype == dtype:
        return torch.addmm(y2, t, b.t()).view(y.shape)
    return (y2 + (t @ b.t()).to(y.dtype)).view(y.shape)


def _group_update(x: torch.Tensor, y: torch.Tensor, adapters: list[nn.Module], group: _Group):
    rank = max(a.rank for a in adapters)
    total = sum(a.rank for a in adapters)
    tokens = x.numel() // (x.shape[0] * x.shape[-1])  # per sample
    if tokens * (total - rank) <= DENSE_MARGIN * rank:
        return _dense_update(x, y, adapters, group)
    return _gathered_update(x, y, adapters, group, rank)


def routed_forward(
    layer: nn.Module, route: LayerRoute, x: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    """``y`` plus, for every sample, its routed adapter's ``scale * B(A(x))``.

    Raises:
        ValueError: if the batch (first) dimension of ``x`` differs from the number of names.
    """
    if x.dim() < 2 or x.shape[0] != route.batch:
        got = x.shape[0] if x.dim() >= 2 else "no batch dimension"
        raise ValueError(
            f"adapter_routing: {route.batch} adapter names were given but LoRA layer "
            f"{route.layer!r} got an input of shape {tuple(x.shape)} (batch {got})"
        )
    for group in route.groups:
        adapters = [layer.adapters[n] for n in group.names]
        y = _group_update(x, y, adapters, group)
    return y
