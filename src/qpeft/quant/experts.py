r"""Quantized grouped experts: one weight quantizer per 3-D projection weight, scales per expert.

An experts module keeps every expert's weight of projection ``p`` in one tensor
``W_p: [E, out, in]`` (or transposed, ``[E, in, out]``). Its quantized wrapper holds one
``<p>_weight_quantizer`` per projection, which fake-quantizes the whole tensor as ``E`` separate
``[out, in]`` matrices::

    Q(W_p)[e] == Q2(W_p[e])        bit for bit, for every expert e

where ``Q2`` is the ordinary 2-D quantizer with the same attributes on ``W_p[e]`` alone (its own
amax): ``axis=0`` gives one amax per output row of each expert (``_amax: [E, out, 1]``), a
per-tensor amax (fp8, int, the nvfp4 global amax) one per expert (``[E, 1, 1]``), and blocks run
along ``in``. A transposed weight is quantized as ``W_p[e].T``
(:class:`TransposedExpertsTensorQuantizer`),
like transformers' ``Conv1D``.

The forward is the experts module's own forward (whatever experts implementation the model uses),
run with the fake-quantized tensors in place of its parameters (:func:`torch.func.functional_call`,
which swaps them for the call only). A frozen weight's ``Q(W_p)`` is cached; a trainable one is
quantized every forward with a straight-through gradient, as for ``nn.Linear``.

Experts get no input quantizers: the input of the second projection lives inside the module's
forward (after the gate activation), where no hook reaches it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..core.wrapping import innermost
from .layer import QuantModule, TransposedTensorQuantizer
from .quantizer import TensorQuantizer

__all__ = ["ExpertsTensorQuantizer", "TransposedExpertsTensorQuantizer", "QuantExperts"]


class ExpertsTensorQuantizer(TensorQuantizer):
    """Quantizes ``x: [E, rows, cols]`` as ``E`` independent ``[rows, cols]`` matrices.

    ``axis`` is an axis of one matrix (0 or 1, or -2 / -1); the amax keeps the expert dim.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """As :class:`TensorQuantizer`; raises ValueError for an axis a 2-D matrix does not have."""
        super().__init__(*args, **kwargs)
        if self.axis is not None and self.axis not in (-2, -1, 0, 1):
            raise ValueError(
                f"axis: an expert's weight is 2-D, so axis must be 0 or 1, got {self.axis}"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Fake-quantize every expert's matrix; contiguous (block padding is sliced off) for the
        kernels."""
        return super().forward(x).contiguous()

    def _amax_of(self, xa: torch.Tensor) -> torch.Tensor:
        if xa.dim() != 3:
            raise ValueError(
                f"{self._label()}: expected a 3-D [experts, rows, cols] tensor, got "
                f"{tuple(xa.shape)}"
            )
        if self.axis is None or self.fmt == "nvfp4":
            return xa.amax(dim=(1, 2), keepdim=True)  # [E, 1, 1]
        kept = 1 + self.axis % 2  # the matrix axis as a dim of [E, rows, cols]
        return xa.amax(dim=3 - kept, keepdim=True)  # [E, rows, 1] or [E, 1, cols]


class TransposedExpertsTensorQuantizer(TransposedTensorQuantizer, ExpertsTensorQuantizer):
    """Per-expert quantizer for weights stored ``[E, in, out]``: quantizes every ``W[e].T``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``Q(x^T)^T`` per expert, contiguous like the stored weight; ``x`` itself when
        disabled."""
        return super().forward(x).contiguous()


class QuantExperts(QuantModule):
    """Base class of quantized grouped-experts layers; subclasses name the projections."""

    @staticmethod
    def projections(raw: nn.Module) -> dict[str, bool]:
        """``{parameter name: stored transposed ([E, in, out])}`` of the raw experts module."""
        raise NotImplementedError

    @classmethod
    def quantizer_classes(cls, raw: nn.Module) -> dict[str, type[TensorQuantizer]]:
        """``<projection>_weight_quantizer`` for every projection."""
        return {
            f"{name}_weight_quantizer": TransposedExpertsTensorQuantizer
            if transposed
            else ExpertsTensorQuantizer
            for name, transposed in cls.projections(raw).items()
        }

    def weights(self) -> dict[str, torch.Tensor]:
        """``{"<p>_weight_quantizer": W_p}``: the 3-D parameters of the experts module."""
        inner = innermost(self)
        return {
            f"{name}_weight_quantizer": getattr(inner, name) for name in self.projections(inner)
        }

    def quantized_weights(self) -> dict[str, torch.Tensor]:
        """``{projection: Q(W_p)}`` in the stored layout (cached while the weights are frozen)."""
        return {
            name: self.quantized(f"{name}_weight_quantizer")
            for name in self.projections(innermost(self))
        }

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The experts module's own forward with every ``W_p`` replaced by ``Q(W_p)``."""
        inner = innermost(self)
        return torch.func.functional_call(inner, self.quantized_weights(), args, kwargs)
