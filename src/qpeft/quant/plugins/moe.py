"""transformers plugin: quantized grouped experts of Hugging Face MoE models (transformers 5.x).

transformers 5 stores the experts of Qwen2/3-MoE, Mixtral, GPT-OSS, OLMoE, DeepSeek-V3 and the
other MoE models as one module decorated by ``use_experts_implementation``: ``gate_up_proj`` (or
``up_proj`` when ``has_gate`` is False) and ``down_proj``, each ``[E, out, in]`` or, with
``is_transposed``, ``[E, in, out]``. :func:`is_hf_experts` recognises them and
:func:`hf_expert_projections` reads their layout (the LoRA plugin uses both). Biases and routers
are not quantized.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..compressed_experts import (
    CompressedExperts,
    packed_projections,
    projection_shape,
    register_compressed_experts,
)
from ..experts import QuantExperts
from ..registry import register_quant_matcher

__all__ = ["QuantHFExperts", "CompressedHFExperts", "is_hf_experts", "hf_expert_projections"]


def is_hf_experts(module: nn.Module) -> bool:
    """Whether ``module`` is a transformers ``@use_experts_implementation`` experts module."""
    down = getattr(module, "down_proj", None)
    return (
        hasattr(module, "has_gate")
        and hasattr(module, "is_transposed")
        and (
            (isinstance(down, nn.Parameter) and down.dim() == 3)
            or "down_proj" in packed_projections(module)
        )
    )


def hf_expert_projections(module: nn.Module) -> dict[str, tuple[int, int, bool]]:
    """``{parameter name: (in_features, out_features, stored transposed)}`` of an experts module."""
    names = ("gate_up_proj" if module.has_gate else "up_proj", "down_proj")
    found = {}
    for name in names:
        shape = projection_shape(module, name)  # packed (qpeft.compress) or not
        transposed = bool(module.is_transposed)
        in_f, out_f = (shape[1], shape[2]) if transposed else (shape[2], shape[1])
        found[name] = (in_f, out_f, transposed)
    return found


class QuantHFExperts(QuantExperts):
    """A transformers experts module with ``gate_up_proj_weight_quantizer`` /
    ``down_proj_weight_quantizer``."""

    @staticmethod
    def projections(raw: nn.Module) -> dict[str, bool]:
        return {name: layout[2] for name, layout in hf_expert_projections(raw).items()}


class CompressedHFExperts(CompressedExperts, QuantHFExperts):
    """A compressed :class:`QuantHFExperts` (:func:`qpeft.compress`): packed projections."""

    def __init__(self, base: nn.Module, **quantizers: Any) -> None:
        self._init_compressed(base, quantizers)


register_quant_matcher(is_hf_experts, QuantHFExperts)
register_compressed_experts(QuantHFExperts, CompressedHFExperts)
