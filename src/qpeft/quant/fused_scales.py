"""Per-tensor scales shared by the layers an inference engine fuses into one GEMM.

Engines run q/k/v and gate/up as one GEMM with one per-tensor scale: vLLM requantizes FP8 shards
to the group's largest scale and takes the largest NVFP4 global scale, so a model whose fused
layers were trained with their own scales is served with others. ``quantize(...,
tie_fused_scales=True)`` gives each fused group the group's max of every per-tensor amax (the
NVFP4 global amax, a per-tensor FP8 or INT weight amax, a static per-tensor input amax), so what
is trained is what an engine serves.

A group is the sibling layers of one parent whose last names form one of :data:`FUSED_NAMES`
(two or more present): ``q_proj``/``k_proj``/``v_proj``, ``gate_proj``/``up_proj``, BERT's
``query``/``key``/``value``, Mixtral-style ``w1``/``w3``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .layer import QuantModule

__all__ = ["FUSED_NAMES", "fused_groups", "tie_scales"]

FUSED_NAMES: tuple[frozenset[str], ...] = (
    frozenset({"q_proj", "k_proj", "v_proj"}),
    frozenset({"gate_proj", "up_proj"}),
    frozenset({"query", "key", "value"}),
    frozenset({"w1", "w3"}),
)


def fused_groups(names: Iterable[str]) -> list[list[str]]:
    """The fused groups among logical layer ``names`` (each sorted, two or more members)."""
    found: dict[tuple[str, int], list[str]] = {}
    for name in names:
        parent, _, last = name.rpartition(".")
        for i, members in enumerate(FUSED_NAMES):
            if last in members:
                found.setdefault((parent, i), []).append(name)
    return [sorted(group) for group in found.values() if len(group) > 1]


@torch.no_grad()
def tie_scales(wrappers: dict[str, QuantModule]) -> list[list[str]]:
    """Set every per-tensor amax of each fused group of ``wrappers`` to the group's max.

    Returns:
        The groups that were tied (their logical names).
    """
    tied = []
    for group in fused_groups(wrappers):
        changed = False
        for kind in ("weight_quantizer", "input_quantizer"):
            quantizers = [wrappers[name].quantizers().get(kind) for name in group]
            amaxes = [q.amax if q is not None and q.is_enabled else None for q in quantizers]
            if any(a is None or a.numel() != 1 for a in amaxes):
                continue  # per-row, per-block, dynamic or disabled: nothing an engine ties
            top = torch.stack([a.reshape(()) for a in amaxes]).max()
            for quantizer, amax in zip(quantizers, amaxes, strict=True):
                quantizer.amax = top.reshape(amax.shape)
            changed = True
        if changed:
            tied.append(group)
    return tied
