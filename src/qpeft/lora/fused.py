"""Fused LoRA update: ``y + sum_i s_i * B_i (A_i x)`` as one autograd function with ``addmm``.

Shapes (tokens flattened): ``x: [N, in]``, ``y: [N, out]``, ``A_i: [r_i, in]``, ``B_i: [out, r_i]``.
Several adapters of one layer are concatenated, ``A = [A_1; ...; A_k] : [R, in]`` and
``B = [B_1 | ... | B_k] : [out, R]`` with ``R = sum r_i``, and a scale vector
``s = [s_1 (r_1 times), ..., s_k (r_k times)] : [R]``:

    forward   t = (x A^T) * s             [N, R]   (the only tensor saved besides x, A, B)
              out = addmm(y, t, B^T)       [N, out] (scale and add fused: one pass over the output)
    backward  g_t = (g B) * s              [N, R]
              dB  = g^T t                  [out, R]
              dA  = g_t^T x                [R, in]
              dx  = g_t A                  [N, in]  (added by autograd to the base's dx)
              dy  = g                      (passed through unchanged)

Compared with ``y + B(A(x)) * s`` this saves the separate scale and add passes over ``[N, out]``
and saves only ``t`` (``R`` columns) for backward instead of the intermediate activations of two
``F.linear`` calls. All tensors must share one dtype (the caller checks).

:func:`linear_lora` also owns the base matmul of a plain ``nn.Linear`` (``y = x W^T + bias``), so the
LoRA update is added in place into the fresh base output and, in backward,
``dx = addmm(g W, g_t, A)`` needs no separate ``[N, in]`` add.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["lora_addmm", "linear_lora"]


def _concat(factors):
    """``(A [R, in], B [out, R], per-adapter ranks)`` from ``(A_1, B_1, A_2, B_2, ...)``."""
    a_list, b_list = factors[0::2], factors[1::2]
    a = a_list[0] if len(a_list) == 1 else torch.cat(a_list, 0)
    b = b_list[0] if len(b_list) == 1 else torch.cat(b_list, 1)
    return a, b, [f.shape[0] for f in a_list]


def _low_rank(x2, a, scales, ranks):
    """``t = (x A^T) * s : [N, R]``."""
    t = x2 @ a.t()
    scale = _scale_vector(scales, ranks, t)
    return t.mul_(scale) if scale is not None else t


def _factor_grads(ctx, g, g_t, x2, t, first: int):
    """Gradients of ``(A_1, B_1, ...)`` whose needs start at input position ``first``."""
    need = ctx.needs_input_grad[first:]
    wants_a, wants_b = any(need[0::2]), any(need[1::2])
    n = len(ctx.ranks)
    da = torch.split(g_t.t() @ x2, ctx.ranks, 0) if wants_a else [None] * n
    db = torch.split(g.t() @ t, ctx.ranks, 1) if wants_b else [None] * n
    out = []
    for i in range(n):
        out += [da[i] if need[2 * i] else None, db[i] if need[2 * i + 1] else None]
    return out


def _scaled_grad_t(ctx, g, b):
    """``g_t = (g B) * s : [N, R]``."""
    g_t = g @ b
    scale = _scale_vector(ctx.scales, ctx.ranks, g_t)
    return g_t.mul_(scale) if scale is not None else g_t


class _LoRAAddmm(torch.autograd.Function):
    """``y + t B^T`` for a base output ``y`` computed outside (any base layer)."""

    @staticmethod
    def forward(ctx, x, y, scales, *factors):  # noqa: ANN001, ANN205 - autograd signature
        a, b, ranks = _concat(factors)
        x2 = x.reshape(-1, x.shape[-1])
        t = _low_rank(x2, a, scales, ranks)
        out = torch.addmm(y.reshape(-1, y.shape[-1]), t, b.t())
        ctx.save_for_backward(x2, t, a, b)
        ctx.scales, ctx.ranks, ctx.x_shape = scales, ranks, x.shape
        return out.view(y.shape)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205 - autograd signature
        x2, t, a, b = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        g_t = _scaled_grad_t(ctx, g, b)
        dx = (g_t @ a).view(ctx.x_shape) if ctx.needs_input_grad[0] else None
        dy = grad if ctx.needs_input_grad[1] else None
        return (dx, dy, None, *_factor_grads(ctx, g, g_t, x2, t, 3))


class _LinearLoRA(torch.autograd.Function):
    """``x W^T + bias + t B^T`` for a plain ``nn.Linear`` base, base and LoRA in one node.

    Owning the base matmul lets backward accumulate the LoRA part of ``dx`` into ``g W`` in place
    (``addmm_``) instead of a separate add of two ``[N, in]`` gradients, and the forward add the
    LoRA part into the freshly computed base output in place.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, scales, *factors):  # noqa: ANN001, ANN205
        a, b, ranks = _concat(factors)
        y = F.linear(x, weight, bias)  # exactly what nn.Linear computes
        if not y.is_contiguous():  # the in-place update below needs a flat view
            y = y.contiguous()
        x2 = x.reshape(-1, x.shape[-1])
        t = _low_rank(x2, a, scales, ranks)
        y.view(-1, y.shape[-1]).addmm_(t, b.t())
        ctx.save_for_backward(x2, t, a, b, weight)
        ctx.scales, ctx.ranks, ctx.x_shape = scales, ranks, x.shape
        return y

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        x2, t, a, b, weight = ctx.saved_tensors
        need = ctx.needs_input_grad
        g = grad.reshape(-1, grad.shape[-1])
        g_t = _scaled_grad_t(ctx, g, b)
        dx = (g @ weight).addmm_(g_t, a).view(ctx.x_shape) if need[0] else None
        dw = g.t() @ x2 if need[1] else None
        dbias = g.sum(0) if need[2] else None
        return (dx, dw, dbias, None, *_factor_grads(ctx, g, g_t, x2, t, 4))


def _scale_vector(scales: Sequence[float], ranks: Sequence[int], like: torch.Tensor):
    """``None`` when every scale is 1; a scalar for one scale; else the per-column ``[R]`` vector."""
    if all(s == 1.0 for s in scales):
        return None
    if len(scales) == 1:
        return scales[0]
    return torch.cat([torch.full((r,), float(s), dtype=like.dtype, device=like.device)
                      for s, r in zip(scales, ranks, strict=True)])


def lora_addmm(
    x: torch.Tensor,
    y: torch.Tensor,
    factors: Sequence[tuple[torch.Tensor, torch.Tensor, float]],
) -> torch.Tensor:
    """``y + sum s * (x @ A^T) @ B^T`` over ``factors = [(A, B, s), ...]`` in one fused step.

    Args:
        x: the layer input ``[..., in]``.
        y: the base output ``[..., out]`` (same leading shape and dtype as ``x``).
        factors: non-empty list of ``(A [r, in], B [out, r], scale)`` in the dtype of ``x``.

    Returns:
        A new tensor shaped like ``y``; gradients flow to ``x``, ``y``, every ``A`` and ``B``.
    """
    flat = [f for a, b, _ in factors for f in (a, b)]
    return _LoRAAddmm.apply(x, y, tuple(float(s) for *_, s in factors), *flat)


def linear_lora(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    factors: Sequence[tuple[torch.Tensor, torch.Tensor, float]],
) -> torch.Tensor:
    """``F.linear(x, weight, bias) + sum s * (x @ A^T) @ B^T`` as one autograd node.

    Args:
        x: the layer input ``[..., in]``.
        weight, bias: the ``nn.Linear`` base's ``[out, in]`` weight and ``[out]`` bias (or None).
        factors: non-empty list of ``(A [r, in], B [out, r], scale)`` in the dtype of ``x``.

    Returns:
        ``[..., out]``; gradients flow to ``x``, ``weight``/``bias`` when they require grad, and
        every ``A`` and ``B``.
    """
    flat = [f for a, b, _ in factors for f in (a, b)]
    return _LinearLoRA.apply(x, weight, bias, tuple(float(s) for *_, s in factors), *flat)
