"""transformers plugin: quantized grouped experts of Hugging Face MoE models (transformers 5.x).

The modules recognised are those the LoRA MoE plugin adapts (:func:`qpeft.lora.plugins.moe.is_hf_experts`):
``gate_up_proj`` (or ``up_proj``) and ``down_proj``, each ``[E, out, in]`` or, with
``is_transposed``, ``[E, in, out]``. Biases and routers are not quantized.
"""

from __future__ import annotations

from torch import nn

from ...lora.plugins.moe import LoRAHFExperts, is_hf_experts
from ..experts import QuantExperts
from ..registry import register_quant_matcher

__all__ = ["QuantHFExperts"]


class QuantHFExperts(QuantExperts):
    """A transformers experts module with ``gate_up_proj_weight_quantizer`` / ``down_proj_weight_quantizer``."""

    @staticmethod
    def projections(raw: nn.Module) -> dict[str, bool]:
        return {name: proj.transposed for name, proj in LoRAHFExperts.projections(raw).items()}


register_quant_matcher(is_hf_experts, QuantHFExperts)
