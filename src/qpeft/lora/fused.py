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
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["lora_addmm"]


class _LoRAAddmm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, scales, *factors):  # noqa: ANN001, ANN205 - autograd signature
        a_list, b_list = factors[0::2], factors[1::2]
        a = a_list[0] if len(a_list) == 1 else torch.cat(a_list, 0)
        b = b_list[0] if len(b_list) == 1 else torch.cat(b_list, 1)
        x2 = x.reshape(-1, x.shape[-1])
        t = x2 @ a.t()
        scale = _scale_vector(scales, a_list, t)
        if scale is not None:
            t.mul_(scale)
        out = torch.addmm(y.reshape(-1, y.shape[-1]), t, b.t())
        ctx.save_for_backward(x2, t, a, b)
        ctx.scales, ctx.ranks, ctx.x_shape = scales, [f.shape[0] for f in a_list], x.shape
        return out.view(y.shape)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205 - autograd signature
        x2, t, a, b = ctx.saved_tensors
        need = ctx.needs_input_grad
        g = grad.reshape(-1, grad.shape[-1])
        g_t = g @ b
        scale = _scale_vector(ctx.scales, ctx.ranks, g_t)
        if scale is not None:
            g_t.mul_(scale)
        dx = (g_t @ a).view(ctx.x_shape) if need[0] else None
        wants_a, wants_b = any(need[3::2]), any(need[4::2])
        da = torch.split(g_t.t() @ x2, ctx.ranks, 0) if wants_a else [None] * len(ctx.ranks)
        db = torch.split(g.t() @ t, ctx.ranks, 1) if wants_b else [None] * len(ctx.ranks)
        factor_grads = []
        for i in range(len(ctx.ranks)):
            factor_grads += [da[i] if need[3 + 2 * i] else None, db[i] if need[4 + 2 * i] else None]
        return (dx, grad if need[1] else None, None, *factor_grads)


def _scale_vector(scales: Sequence[float], ranks_or_factors: Sequence, like: torch.Tensor):
    """``None`` when every scale is 1; a scalar for one scale; else the per-column ``[R]`` vector."""
    if all(s == 1.0 for s in scales):
        return None
    if len(scales) == 1:
        return scales[0]
    ranks = [r if isinstance(r, int) else r.shape[0] for r in ranks_or_factors]
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
