"""Fused LoRA update: ``y + sum_i s_i * B_i (A_i x)`` as one autograd node with ``addmm``.

Shapes (tokens flattened): ``x: [N, in]``, ``y: [N, out]``, ``A: [R, in]``, ``B: [out, R]``.
One adapter passes its own factors and its scale ``s`` as ``alpha``; several adapters of one layer
are concatenated by autograd before the node, ``A = [A_1; ...; A_k]`` and
``B = [s_1 B_1 | ... | s_k B_k]`` (scales folded into the small ``B``, ``alpha = 1``):

    forward   t   = x A^T                      [N, R]   (the only tensor saved besides x, A, B)
              out = y + alpha * t B^T          [N, out] (one addmm: no separate scale or add pass)
    backward  g_b = g B                        [N, R]
              dB  = alpha * g^T t              [out, R]
              dA  = alpha * g_b^T x            [R, in]
              dx  = alpha * g_b A              [N, in]  (accumulated into the base's dx)
              dy  = g                          (passed through unchanged)

Every ``alpha`` rides on a GEMM's own scaling (``addmm``'s ``alpha``): no pass over any tensor is
spent on scales. All tensors share one dtype
(the caller checks).

:func:`linear_lora` also owns the base matmul of a plain ``nn.Linear`` (``y = x W^T + bias``), so
the
LoRA update is added in place into the fresh base output and, in backward,
``dx = addmm(g W, g_b, A)`` needs no separate ``[N, in]`` add. Without autograd (inference, or no
input requiring grad) both run the same arithmetic directly, with no autograd node at all.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["lora_addmm", "linear_lora", "concat_factors"]

Factors = Sequence[tuple[torch.Tensor, torch.Tensor, float]]


def concat_factors(factors: Factors) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(A [R, in], B [out, R], alpha)`` for ``factors = [(A_i, B_i, s_i), ...]``.

    One adapter keeps its factors and passes its scale as ``alpha``; several are concatenated with
    each ``B_i`` scaled by ``s_i`` (small tensors; autograd routes the gradients back).
    """
    if len(factors) == 1:
        a, b, s = factors[0]
        return a, b, float(s)
    return torch.cat([f[0] for f in factors], 0), *_concat_b(factors)


def _concat_b(factors: Factors) -> tuple[torch.Tensor, float]:
    if len(factors) == 1:
        return factors[0][1], float(factors[0][2])
    return torch.cat([f[1] if f[2] == 1.0 else f[1] * float(f[2]) for f in factors], 1), 1.0


def _needs_graph(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _scaled_mm(m1: torch.Tensor, m2: torch.Tensor, alpha: float) -> torch.Tensor:
    """``alpha * m1 @ m2`` with the scale inside the GEMM (no separate pass)."""
    if alpha == 1.0:
        return torch.mm(m1, m2)
    return torch.addmm(m1.new_zeros(()), m1, m2, beta=0, alpha=alpha)


def _factor_grads(need_a: bool, need_b: bool, g, g_b, x2, t, alpha: float):
    """``dA = alpha * g_b^T x`` and ``dB = alpha * g^T t``."""
    da = _scaled_mm(g_b.t(), x2, alpha) if need_a else None
    db = _scaled_mm(g.t(), t, alpha) if need_b else None
    return da, db


class _LoRAAddmm(torch.autograd.Function):
    """``y + alpha * (x A^T) B^T`` for a base output ``y`` computed outside (any base layer)."""

    @staticmethod
    def forward(ctx, x, y, a, b, alpha):  # noqa: ANN001, ANN205 - autograd signature
        x2 = x.reshape(-1, x.shape[-1])
        t = torch.mm(x2, a.t())
        out = torch.addmm(y.reshape(-1, y.shape[-1]), t, b.t(), alpha=alpha)
        ctx.save_for_backward(x2, t, a, b)
        ctx.alpha, ctx.x_shape = alpha, x.shape
        return out.view(y.shape)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205 - autograd signature
        x2, t, a, b = ctx.saved_tensors
        need_x, need_y, need_a, need_b, _ = ctx.needs_input_grad
        g = grad.reshape(-1, grad.shape[-1])
        g_b = torch.mm(g, b) if need_x or need_a else None
        dx = _scaled_mm(g_b, a, ctx.alpha).view(ctx.x_shape) if need_x else None
        da, db = _factor_grads(need_a, need_b, g, g_b, x2, t, ctx.alpha)
        return dx, (grad if need_y else None), da, db, None


class _LinearLoRA(torch.autograd.Function):
    """``x W^T + bias + alpha * (x A^T) B^T`` for a plain ``nn.Linear`` base, in one node.

    Owning the base matmul lets backward accumulate the LoRA part of ``dx`` into ``g W`` in place
    (``addmm_``) instead of a separate add of two ``[N, in]`` gradients, and the forward add the
    LoRA part into the freshly computed base output in place.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, a, b, alpha):  # noqa: ANN001, ANN205
        return _linear_lora_values(x, weight, bias, a, b, alpha, ctx)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        x2, t, a, b, *saved = ctx.saved_tensors
        weight = saved[0] if saved else ctx.lazy.dequantize()
        need_x, need_w, need_bias, need_a, need_b, _ = ctx.needs_input_grad
        g = grad.reshape(-1, grad.shape[-1])
        g_b = torch.mm(g, b) if need_x or need_a else None
        dx = (
            torch.mm(g, weight).addmm_(g_b, a, alpha=ctx.alpha).view(ctx.x_shape)
            if need_x
            else None
        )
        dw = torch.mm(g.t(), x2) if need_w else None
        dbias = g.sum(0) if need_bias else None
        da, db = _factor_grads(need_a, need_b, g, g_b, x2, t, ctx.alpha)
        return dx, dw, dbias, da, db, None


def _linear_lora_values(x, weight, bias, a, b, alpha: float, ctx=None) -> torch.Tensor:
    """The forward arithmetic of :class:`_LinearLoRA`; saves for backward when given ``ctx``.

    A lazy ``weight`` (not a tensor: a compressed layer's packed weight) is dequantized here and
    again in backward, never saved.
    """
    lazy = None if isinstance(weight, torch.Tensor) else weight
    if lazy is not None:
        weight = lazy.dequantize()
    y = F.linear(x, weight, bias)  # exactly what nn.Linear computes
    if not y.is_contiguous():  # the in-place update below needs a flat view
        y = y.contiguous()
    x2 = x.reshape(-1, x.shape[-1])
    t = torch.mm(x2, a.t())
    y.view(-1, y.shape[-1]).addmm_(t, b.t(), alpha=alpha)
    if ctx is not None:
        ctx.save_for_backward(x2, t, a, b, *([] if lazy is not None else [weight]))
        ctx.alpha, ctx.x_shape, ctx.lazy = alpha, x.shape, lazy
    return y


def lora_addmm(x: torch.Tensor, y: torch.Tensor, factors: Factors) -> torch.Tensor:
    """``y + sum s * (x @ A^T) @ B^T`` over ``factors = [(A, B, s), ...]`` in one fused step.

    Args:
        x: the layer input ``[..., in]``.
        y: the base output ``[..., out]`` (same leading shape and dtype as ``x``).
        factors: non-empty list of ``(A [r, in], B [out, r], scale)`` in the dtype of ``x``.

    Returns:
        A new tensor shaped like ``y``; gradients flow to ``x``, ``y``, every ``A`` and ``B``.
    """
    a, b, alpha = concat_factors(factors)
    if _needs_graph(x, y, a, b):
        return _LoRAAddmm.apply(x, y, a, b, alpha)
    t = torch.mm(x.reshape(-1, x.shape[-1]), a.t())
    return torch.addmm(y.reshape(-1, y.shape[-1]), t, b.t(), alpha=alpha).view(y.shape)


def linear_lora(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, factors: Factors
) -> torch.Tensor:
    """``F.linear(x, weight, bias) + sum s * (x @ A^T) @ B^T`` as one autograd node.

    Args:
        x: the layer input ``[..., in]``.
        weight, bias: the ``nn.Linear`` base's ``[out, in]`` weight and ``[out]`` bias (or None);
            ``weight`` may be lazy, an object whose ``dequantize()`` gives it (compressed layers).
        factors: non-empty list of ``(A [r, in], B [out, r], scale)`` in the dtype of ``x``.

    Returns:
        ``[..., out]``; gradients flow to ``x``, ``weight``/``bias`` when they require grad, and
        every ``A`` and ``B``.
    """
    a, b, alpha = concat_factors(factors)
    dense = weight if isinstance(weight, torch.Tensor) else None
    if _needs_graph(x, dense, bias, a, b):
        return _LinearLoRA.apply(x, weight, bias, a, b, alpha)
    return _linear_lora_values(x, weight, bias, a, b, alpha)
