"""Initialisation of new adapters: ``kaiming_zeros`` and ``svdquant``.

``kaiming_zeros``: ``A`` from ``lora_a_init`` (default ``kaiming_uniform_(a=sqrt(5))``), ``B`` from
``lora_b_init`` (default ``zeros_``), so a new adapter leaves the layer's output bit-identical.

``svdquant``: with ``W: [out, in]`` and its fake-quantized value ``Q(W)``, the residual
``R = W - Q(W)`` (fp32) is approximated by a rank-r truncated SVD ``R ~ U S V^T``, split as
``B = U sqrt(S/scale)``, ``A = sqrt(S/scale) V^T`` so that ``scale * B @ A ~ R`` and the layer
computes about ``W x`` at init. A randomized SVD (oversampling + power iterations) is used when r is
small against the layer, an exact one otherwise; ranks above ``min(out, in)`` pad with zeros.
"""

from __future__ import annotations

import math
import warnings

import torch

from ..core.modes import is_restoring
from .adapter import LoRAAdapter
from .config import resolve_initializer
from .layer import LoRAModule

__all__ = ["init_adapter", "truncated_svd", "quantization_residual", "svd_factors"]

# Randomized SVD settings, measured on quantization residuals of MiniLM-sized layers
# (benchmarks/quant_minilm.py): 4 power iterations keep ||R - U S V^T|| within 0.7% of the
# Eckart-Young optimum at ranks 16-64 (2 iterations miss 1% from rank 32 on); the sketch is used
# only while (rank + OVERSAMPLE) * SKETCH_FACTOR <= min(out, in), beyond which LAPACK's exact SVD
# is about as fast.
OVERSAMPLE = 16
POWER_ITERS = 4
SKETCH_FACTOR = 5


@torch.no_grad()
def init_adapter(adapter: LoRAAdapter, layer: LoRAModule, layer_name: str) -> None:
    """Fill a new adapter's factors in place according to its ``lora_init_method``.

    Inside :func:`qpeft.core.modes.restoring` nothing is computed (the factors stay zero): the saved
    values are loaded right after, so recomputing, e.g., svdquant's SVD would be wasted work.

    Raises:
        ValueError: for ``svdquant`` when the layer's weight is not finite (names the layer).
    """
    if is_restoring():
        return
    own_init = getattr(layer, "init_new_adapter", None)
    if own_init is not None:  # layers with their own factor layout (e.g. grouped experts)
        own_init(adapter, layer_name)
        return
    config = adapter.config
    if config.lora_init_method == "svdquant":
        _init_svdquant(adapter, layer, layer_name)
        return
    if config.lora_a_init is None:
        torch.nn.init.kaiming_uniform_(adapter.lora_a, a=math.sqrt(5))
    else:
        resolve_initializer(config.lora_a_init)(adapter.lora_a)
    if config.lora_b_init is None:
        torch.nn.init.zeros_(adapter.lora_b)
    else:
        resolve_initializer(config.lora_b_init)(adapter.lora_b)


def quantization_residual(layer: LoRAModule) -> torch.Tensor | None:
    """``W - Q(W)`` in fp32, ``[out, in]`` layout, or None without an (enabled) weight quantizer."""
    quantizer = getattr(layer.base, "weight_quantizer", None)
    if quantizer is None or not getattr(quantizer, "is_enabled", True):
        return None
    weight = layer.base_weight.detach()
    residual = weight.float() - quantizer(weight).float()
    return layer.to_out_in(residual)


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


def warn_svdquant_fallback(layer_name: str, reason: str, stacklevel: int = 5) -> None:
    """The one warning every LoRA layer gives when svdquant has no quantizer to work from."""
    warnings.warn(
        f"svdquant init: layer {layer_name!r} {reason}; falling back to zero-initialised A and B",
        stacklevel=stacklevel,
    )


def _init_svdquant(adapter: LoRAAdapter, layer: LoRAModule, layer_name: str) -> None:
    residual = quantization_residual(layer)
    if residual is None:
        warn_svdquant_fallback(
            layer_name, "has no enabled weight quantizer (run qpeft.quantize before update_model)"
        )
        adapter.lora_a.zero_()
        adapter.lora_b.zero_()
        return
    if not torch.isfinite(residual).all():
        raise ValueError(f"svdquant init: layer {layer_name!r} has non-finite weights")
    a, b = svd_factors(residual, adapter.rank, adapter.scale)
    adapter.lora_a.copy_(a)
    adapter.lora_b.copy_(b)


def svd_factors(
    residual: torch.Tensor, rank: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 factors ``A: [rank, in]``, ``B: [out, rank]`` with ``scale * B @ A =
    SVD_rank(residual)``.

    ``B = U sqrt(S/scale)``, ``A = sqrt(S/scale) V^T``; components beyond ``min(out, in)`` are zero.
    """
    u, s, vh = truncated_svd(residual.float(), rank)
    root = (s / scale).sqrt()
    k = s.numel()
    a = residual.new_zeros(rank, residual.shape[1], dtype=torch.float32)
    b = residual.new_zeros(residual.shape[0], rank, dtype=torch.float32)
    a[:k] = root[:, None] * vh
    b[:, :k] = u * root[None, :]
    return a, b
