"""Fused groups at export: the per-tensor scales an engine shares, shared in the written codes.

vLLM and TensorRT-LLM run q/k/v and gate/up (the groups of :mod:`qpeft.quant.fused_scales`) as
one GEMM with one per-tensor scale: the group's largest FP8 weight scale (requantizing the other
shards), the largest NVFP4 global scale, the largest static input scale. A model quantized
without ``tie_fused_scales=True`` would be served with other numerics than it was trained with;
:func:`tie_exports` gives every member of such a group the group's largest per-tensor amax and
requantizes its weight with it (from the master weight, or from ``Q(W)`` for a compressed layer),
on copies: the model is not changed. The figures it reports, per group: the weight elements whose
value changes, and the largest change of the members' outputs ``F.linear(Qin(x), Q(W))`` on the
probe input ``x = torch.randn(16, in_features, generator=torch.Generator().manual_seed(0))``
(fp32, on CPU).
"""

from __future__ import annotations

import copy
from dataclasses import replace

import torch
import torch.nn.functional as F

from ..quant.fused_scales import fused_groups
from ..quant.numerics import E2M1_MAX, E4M3_MAX
from ..quant.packing import pack, unpack
from .deploy_layers import LayerExport

__all__ = ["PROBE_ROWS", "probe_input", "tie_exports"]

PROBE_ROWS = 16


def probe_input(in_features: int) -> torch.Tensor:
    """The probe input of the reported output change."""
    return torch.randn(PROBE_ROWS, in_features, generator=torch.Generator().manual_seed(0))


def _weight_scale(e: LayerExport) -> torch.Tensor | None:
    """The per-tensor scale of a weight (nvfp4's global one), or None if it has none."""
    spec = e.spec
    if spec.fmt == "nvfp4":
        return e.packed["scale_2"].detach().float().cpu().reshape(())
    if spec.fmt in ("int", "fp8") and spec.block_sizes is None and spec.axis is None:
        return e.packed["scale"].detach().float().cpu().reshape(())
    return None


def _scale_of(fmt: str, num_bits: int, amax: torch.Tensor) -> torch.Tensor:
    """The scale :func:`qpeft.quant.packing.pack` derives from a per-tensor amax."""
    if fmt == "nvfp4":
        return amax / torch.tensor(E2M1_MAX * E4M3_MAX)
    if fmt == "fp8":
        return torch.reciprocal(amax) * E4M3_MAX
    return torch.tensor(2.0 ** (num_bits - 1) - 1.0) / amax


def _amax_for(e: LayerExport, scale: torch.Tensor) -> torch.Tensor:
    """An amax whose scale is exactly ``scale`` (for a compressed layer, which keeps none)."""
    fmt, bits = e.spec.fmt, e.spec.num_bits
    bound = E2M1_MAX * E4M3_MAX if fmt == "nvfp4" else E4M3_MAX if fmt == "fp8" else 2**bits / 2 - 1
    guess = scale * bound if fmt == "nvfp4" else torch.tensor(bound) / scale
    up = down = guess
    for _ in range(4):
        for a in (up, down):
            if torch.equal(_scale_of(fmt, bits, a), scale):
                return a
        up = torch.nextafter(up, torch.tensor(float("inf")))
        down = torch.nextafter(down, torch.tensor(0.0))
    return guess


def _tie_weights(members: list[LayerExport]) -> list[LayerExport]:
    scales = [_weight_scale(e) for e in members]
    kinds = {(e.spec.fmt, e.spec.num_bits) for e in members}
    if any(s is None for s in scales) or len(kinds) > 1 or len({float(s) for s in scales}) == 1:
        return members
    nvfp4 = members[0].spec.fmt == "nvfp4"  # larger amax: larger g, smaller int/fp8 scale
    top = max(range(len(members)), key=lambda i: float(scales[i]) * (1 if nvfp4 else -1))
    if all(e.weight_amax is not None and e.weight_amax.numel() == 1 for e in members):
        amax = torch.stack([e.weight_amax.detach().float().cpu().reshape(()) for e in members])
        amax = amax.max()
    else:
        amax = _amax_for(members[top], scales[top])
    out = []
    for e, s in zip(members, scales, strict=True):
        if torch.equal(s, scales[top]):
            out.append(e)
            continue
        w = e.source if e.source is not None else unpack(e.packed, e.spec, torch.float32)
        packed, spec = pack(w, e.spec, amax.to(w.device))
        out.append(replace(e, packed=packed, spec=spec))
    return out


def _static_amax(q) -> torch.Tensor | None:
    if q is None or q.dynamic or q.amax is None or q.amax.numel() != 1:
        return None
    if q.fmt not in ("int", "fp8", "nvfp4"):
        return None
    return q.amax.detach().float().cpu().reshape(())


def _tie_inputs(members: list[LayerExport]) -> list[LayerExport]:
    amaxes = [_static_amax(e.input_quantizer) for e in members]
    if any(a is None for a in amaxes) or len({float(a) for a in amaxes}) == 1:
        return members
    top = torch.stack(amaxes).max()
    out = []
    for e, a in zip(members, amaxes, strict=True):
        if torch.equal(a, top):
            out.append(e)
            continue
        q = copy.deepcopy(e.input_quantizer)
        q.amax = top.to(e.input_quantizer.amax.device).reshape(e.input_quantizer.amax.shape)
        out.append(replace(e, input_quantizer=q))
    return out


@torch.no_grad()
def _figures(old: list[LayerExport], new: list[LayerExport]) -> tuple[int, int, float]:
    """``(changed weight elements, elements, largest output change)`` of one group."""
    changed = total = 0
    delta = 0.0
    for a, b in zip(old, new, strict=True):
        wa = unpack({k: v.cpu() for k, v in a.packed.items()}, a.spec, torch.float32)
        wb = unpack({k: v.cpu() for k, v in b.packed.items()}, b.spec, torch.float32)
        changed += int((wa != wb).sum())
        total += wa.numel()
        x = probe_input(wa.shape[-1])
        ya = F.linear(_quantized_input(a, x), wa)
        yb = F.linear(_quantized_input(b, x), wb)
        delta = max(delta, float((ya - yb).abs().max()))
    return changed, total, delta


def _quantized_input(e: LayerExport, x: torch.Tensor) -> torch.Tensor:
    if e.input_quantizer is None:
        return x
    return copy.deepcopy(e.input_quantizer).cpu()(x)


def tie_exports(layers: dict[str, LayerExport]) -> tuple[dict[str, LayerExport], list[str]]:
    """``(layers with every fused group's per-tensor scales shared, one line per changed group)``.

    A line reads ``[q, k, v]: N of M weight elements change (P%), largest output change D on
    the probe input``; no line means every group already shared its scales (nothing changed).
    """
    out = dict(layers)
    lines = []
    for group in fused_groups(layers):
        old = [layers[n] for n in group]
        new = _tie_inputs(_tie_weights(old))
        if all(a is b for a, b in zip(old, new, strict=True)):
            continue
        out.update(zip(group, new, strict=True))
        changed, total, delta = _figures(old, new)
        lines.append(
            f"[{', '.join(group)}]: {changed} of {total} weight elements change "
            f"({changed / total:.2%}), largest output change {delta:.3e} on the probe input"
        )
    return out, lines
