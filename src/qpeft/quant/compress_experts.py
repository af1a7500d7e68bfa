"""``compress`` of grouped experts: the checks, packing, build and replay of one experts layer.

Each projection ``p`` whose ``<p>_weight_quantizer`` is enabled is packed as the quantizer
computes it: the ``[E, out, in]`` tensor (a transposed layout ``[E, in, out]`` is packed as
``W_p[e].T``) with one amax group set per expert, so the packing spec keeps the expert dim in its
axis (per tensor: ``axis=0``, groups ``[E, 1, 1]``; per row: ``axis=(0, 1)``, ``[E, out, 1]``);
blocks run along ``in`` as for a linear weight. Projections whose quantizer is disabled stay
dense. The mode log records ``{"projections": {p: spec}, "dtype": ...}`` per layer.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from ..core.wrapping import innermost
from .compressed_experts import (
    compressed_experts_class,
    install_packed,
    packed_projections,
    projection_shape,
)
from .experts import QuantExperts
from .packing import PackSpec, check_packable, pack, packed_layout

__all__ = ["experts_spec", "experts_refusal", "pack_experts", "replay_experts"]

_DTYPES = ("float32", "bfloat16", "float16")


def _enabled(layer: QuantExperts) -> dict[str, bool]:
    """``{projection: stored transposed}`` of the projections with an enabled quantizer."""
    raw = innermost(layer)
    return {
        name: transposed
        for name, transposed in layer.projections(raw).items()
        if getattr(layer, f"{name}_weight_quantizer").is_enabled
    }


def experts_spec(layer: QuantExperts, name: str) -> PackSpec:
    """The packing spec of projection ``name`` (``[E, out, in]``), before ``neg_zero`` is known."""
    q, raw = getattr(layer, f"{name}_weight_quantizer"), innermost(layer)
    e, a, b = projection_shape(raw, name)
    shape = (e, b, a) if layer.projections(raw)[name] else (e, a, b)
    axis = 0 if q.axis is None else (0, 1 + q.axis % 2)  # the expert dim always has its groups
    blocks = None if q.block_sizes is None else tuple(sorted(q.block_sizes.items()))
    return PackSpec(q.fmt, shape, q.num_bits, axis, blocks, q.narrow_range)


def experts_refusal(layer: QuantExperts, frozen: bool = True, values: bool = True) -> str | None:
    """Why the experts ``layer`` cannot be compressed, or None (``values``: check the weights are
    finite; a replay skips it, since the checkpoint's packed tensors replace them)."""
    if compressed_experts_class(layer) is None:
        return f"{type(layer).__name__} grouped experts have no packed forward"
    raw = innermost(layer)
    for name in layer.projections(raw):
        weight = getattr(raw, name)
        if frozen and weight.requires_grad:
            return (
                f"its weight {name!r} is trainable (requires_grad); compress needs a frozen base: "
                "freeze it (update_model freezes the base by default, or requires_grad_(False))"
            )
    for name in _enabled(layer):
        q, weight = getattr(layer, f"{name}_weight_quantizer"), getattr(raw, name)
        if q.collects_amax and not q.dynamic and q.amax is None:
            return f"its {name} weight quantizer is not calibrated (no amax); run qpeft.quantize"
        reason = check_packable(q)
        if reason is not None:
            return f"projection {name!r}: {reason}"
        if str(weight.dtype).removeprefix("torch.") not in _DTYPES:
            return f"weights of dtype {weight.dtype} are not compressed"
        if values and not bool(torch.isfinite(weight).all()):
            return f"its weight {name!r} has non-finite values"
    return None


def _pack_one(layer: QuantExperts, name: str) -> tuple[PackSpec, dict[str, torch.Tensor]]:
    q, raw = getattr(layer, f"{name}_weight_quantizer"), innermost(layer)
    weight = getattr(raw, name).detach()
    oriented = weight.transpose(-2, -1).contiguous() if layer.projections(raw)[name] else weight
    amax = q._fresh_amax(oriented) if q.dynamic else q.amax
    tensors, spec = pack(oriented, experts_spec(layer, name), amax)
    return spec, tensors


def _wrap(layer: QuantExperts) -> Any:
    quantizers = layer.quantizers()
    for name in packed_projections(innermost(layer)):
        quantizers[f"{name}_weight_quantizer"].reset_amax()  # the packed scales hold it now
    layer.clear_weight_caches()
    return compressed_experts_class(layer)(innermost(layer), **quantizers)


def pack_experts(layer: QuantExperts) -> tuple[Any, dict[str, Any]]:
    """Pack every enabled projection of ``layer`` (each master weight dropped as soon as its
    codes exist); returns the compressed wrapper and its mode-log entry."""
    raw, log = innermost(layer), {}
    dtype = getattr(raw, next(iter(_enabled(layer)))).dtype
    for name, transposed in _enabled(layer).items():
        spec, tensors = _pack_one(layer, name)
        install_packed(raw, name, spec, tensors, dtype, transposed)
        log[name] = spec.to_json()
    entry = {"projections": log, "dtype": str(dtype).removeprefix("torch.")}
    return _wrap(layer), entry


def _check_entry(name: str, layer: QuantExperts, entry: Any) -> dict[str, PackSpec]:
    if (
        not isinstance(entry, dict)
        or entry.get("dtype") not in _DTYPES
        or not isinstance(entry.get("projections"), dict)
    ):
        raise ValueError(
            f"compress replay: experts layer {name!r} needs 'projections' and a 'dtype' among "
            f"{list(_DTYPES)}, got {str(entry)[:80]}"
        )
    raw, specs = innermost(layer), {}
    if sorted(entry["projections"]) != sorted(_enabled(layer)):
        raise ValueError(
            f"compress replay: experts layer {name!r} records projections "
            f"{sorted(entry['projections'])}, its enabled quantizers are {sorted(_enabled(layer))}"
        )
    for proj, data in entry["projections"].items():
        spec, weight = PackSpec.from_json(data), getattr(raw, proj)
        want = experts_spec(layer, proj)
        if replace(spec, neg_zero=True) != want:  # neg_zero depends on the values
            raise ValueError(
                f"compress replay: layer {name!r} projection {proj!r} records packing {spec}, but "
                f"its quantizer packs as {want} (the log and the checkpoint disagree)"
            )
        if str(weight.dtype).removeprefix("torch.") != entry["dtype"]:
            raise ValueError(
                f"compress replay: layer {name!r} has {weight.dtype} weights, the log records "
                f"{entry['dtype']}"
            )
        specs[proj] = spec
    return specs


def replay_experts(name: str, layer: QuantExperts, entry: Any, restoring: bool) -> Any:
    """The compressed wrapper the log ``entry`` describes; zero placeholders when ``restoring``
    (the checkpoint's tensors fill them), else packed afresh.

    Raises:
        ValueError: the entry is malformed or disagrees with the layer (names it); model unchanged.
    """
    specs = _check_entry(name, layer, entry)
    reason = experts_refusal(layer, frozen=False, values=not restoring)
    if reason is not None:
        raise ValueError(f"compress replay: layer {name!r}: {reason}")
    if not restoring:
        return pack_experts(layer)[0]
    raw = innermost(layer)
    dtype = getattr(raw, next(iter(specs))).dtype
    for proj, spec in specs.items():
        device = getattr(raw, proj).device
        tensors = {
            k: torch.zeros(shape, dtype=dt, device=device)
            for k, (shape, dt) in packed_layout(spec).items()
        }
        install_packed(raw, proj, spec, tensors, dtype, layer.projections(raw)[proj])
    return _wrap(layer)
