"""Initialisation of new adapters: ``kaiming_zeros`` and ``svdquant``.

``kaiming_zeros``: ``A`` from ``lora_a_init`` (default ``kaiming_uniform_(a=sqrt(5))``), ``B`` from
``lora_b_init`` (default ``zeros_``), so a new adapter leaves the layer's output bit-identical.

``svdquant``: with ``W: [out, in]`` and its fake-quantized value ``Q(W)``, the residual
``R = W - Q(W)`` (fp32) is approximated by a rank-r truncated SVD ``R ~ U S V^T``, split as
``B = U sqrt(S/scale)``, ``A = sqrt(S/scale) V^T`` so that ``scale * B @ A ~ R`` and the layer
computes about ``W x`` at init. A randomized SVD (oversampling + power iterations) is used when r is
small against the layer, an exact one otherwise; ranks above ``min(out, in)`` pad with zeros.
Residuals may carry leading batch dimensions (one matrix per expert).

Each layer kind says how it fills a new adapter (:meth:`qpeft.LoRAModule.init_adapter`); the pieces
here are the ones they share.
"""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING, Any

import torch

from ..core.modes import is_restoring
from .config import PEFTAttributeConfig, resolve_initializer

if TYPE_CHECKING:
    from .layer import LoRAModule

__all__ = ["init_adapter", "init_factors", "truncated_svd", "svd_factors", "svdquant_factors"]

# Randomized SVD settings, measured on quantization residuals of MiniLM-sized layers
# (benchmarks/quant_minilm.py): 4 power iterations keep ||R - U S V^T|| within 0.7% of the
# Eckart-Young optimum at ranks 16-64 (2 iterations miss 1% from rank 32 on); the sketch is used
# only while (rank + OVERSAMPLE) * SKETCH_FACTOR <= min(out, in), beyond which LAPACK's exact SVD
# is about as fast.
OVERSAMPLE = 16
POWER_ITERS = 4
SKETCH_FACTOR = 5


@torch.no_grad()
def init_adapter(adapter: Any, layer: LoRAModule, layer_name: str) -> None:
    """Fill a new adapter's factors in place as its layer kind does (``layer.init_adapter``).

    Inside :func:`qpeft.core.modes.restoring` nothing is computed (the factors stay zero): the saved
    values are loaded right after, so recomputing, e.g., svdquant's SVD would be wasted work.

    Raises:
        ValueError: for ``svdquant`` when the layer's weight is not finite (names the layer).
    """
    if not is_restoring():
        layer.init_adapter(adapter, layer_name)


def _default_a(tensor: torch.Tensor) -> None:
    torch.nn.init.kaiming_uniform_(tensor, a=math.sqrt(5))


@torch.no_grad()
def init_factors(a: torch.Tensor, b: torch.Tensor, config: PEFTAttributeConfig) -> None:
    """``kaiming_zeros``: fill ``A`` and ``B`` with their initializers (defaults: Kaiming, zeros).

    Factors with a leading expert axis (``[E, r, in]``, ``[E, out, r]``) are initialised one
    expert's slice at a time, as a 2-D factor would be (the fan of a 3-D tensor would count the
    expert axis); a one-off loop at creation time only.
    """
    for factor, name, default in (
        (a, config.lora_a_init, _default_a),
        (b, config.lora_b_init, torch.nn.init.zeros_),
    ):
        fn = resolve_initializer(name) if name is not None else default
        for matrix in factor.reshape(-1, *factor.shape[-2:]):
            fn(matrix)


def truncated_svd(
    matrix: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank-``rank`` truncated SVD ``(U [m, k], S [k], Vh [k, n])`` with ``k = min(rank, m, n)``.

    ``matrix`` may carry leading batch dimensions (``[..., m, n]``, e.g. one matrix per expert);
    the factors then do too. Randomized (``OVERSAMPLE`` extra columns, ``POWER_ITERS`` power
    iterations) when the sketch is small against the matrix; exact otherwise.
    """
    m, n = matrix.shape[-2:]
    k = min(rank, m, n)
    if (k + OVERSAMPLE) * SKETCH_FACTOR <= min(m, n):
        u, s, v = torch.svd_lowrank(matrix, q=k + OVERSAMPLE, niter=POWER_ITERS)
        return u[..., :k], s[..., :k], v[..., :k].transpose(-2, -1)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u[..., :k], s[..., :k], vh[..., :k, :]


def svd_factors(
    residual: torch.Tensor, rank: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 factors ``A: [..., rank, in]``, ``B: [..., out, rank]``: ``s * B @ A = SVD_rank(R)``.

    ``B = U sqrt(S/scale)``, ``A = sqrt(S/scale) V^T``; components beyond ``min(out, in)`` are zero.
    ``residual`` is ``[..., out, in]`` (leading dimensions: one matrix per expert).
    """
    u, s, vh = truncated_svd(residual.float(), rank)
    root = (s / scale).sqrt()
    k = s.shape[-1]
    *lead, out_f, in_f = residual.shape
    a = residual.new_zeros(*lead, rank, in_f, dtype=torch.float32)
    b = residual.new_zeros(*lead, out_f, rank, dtype=torch.float32)
    a[..., :k, :] = root.unsqueeze(-1) * vh
    b[..., :k] = u * root.unsqueeze(-2)
    return a, b


def svdquant_factors(
    residual: torch.Tensor | None, rank: int, scale: float, layer_name: str, what: str = ""
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """svdquant's factors for ``residual = W - Q(W)`` (``[..., out, in]``), or None to keep zeros.

    Args:
        residual: the quantization residual, or None when the layer has no enabled weight
            quantizer (a warning then says svdquant falls back to zero factors).
        rank, scale: the adapter's.
        layer_name: for messages; ``what`` adds e.g. ``" projection 'down_proj'"``.

    Raises:
        ValueError: the residual is not finite (names the layer).
    """
    if residual is None:
        warnings.warn(
            f"svdquant init: layer {layer_name!r}{what} has no enabled weight quantizer (run "
            "qpeft.quantize before update_model); falling back to zero-initialised A and B",
            stacklevel=8,  # the caller of update_model (plain layers)
        )
        return None
    if not torch.isfinite(residual).all():
        raise ValueError(f"svdquant init: layer {layer_name!r}{what} has non-finite weights")
    return svd_factors(residual, rank, scale)
