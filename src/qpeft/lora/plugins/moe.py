"""transformers plugin: LoRA on the grouped experts of Hugging Face MoE models (transformers 5.x).

transformers 5 stores the experts of Qwen2/3-MoE, Mixtral, GPT-OSS, OLMoE, DeepSeek-V3 and the
other MoE models as one module with 3-D weights, decorated by ``use_experts_implementation``, which
records the layout on each instance:

- ``gate_up_proj: [E, 2I, H]`` (gate and up fused; ``is_concatenated``: ``[gate; up]``, else
  interleaved) or ``up_proj`` when ``has_gate`` is False; ``down_proj: [E, H, I]``;
- ``is_transposed``: the same weights stored ``[E, in, out]`` (GPT-OSS: ``gate_up_proj [E, H,
  2I]``);
- ``has_bias``: ``<p>_bias: [E, out]``; ``_apply_gate`` / ``act_fn`` between the projections.

The module's forward is ``experts(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k])``.
:class:`LoRAHFExperts` replaces it by the same computation with the LoRA terms added to each
projection's output: the rows are laid out as the model's ``_experts_implementation`` does
(``grouped_mm``, the 5.x default, and ``batched_mm``; every other implementation runs the grouped
layout), and the base products are transformers' own grouped/batched linears, so with ``B = 0``
the output is bit-identical to the unwrapped module under ``grouped_mm`` and ``batched_mm``.
A fused ``gate_up_proj`` gets one ``[E, 2I, r]`` B whose rows follow the weight's own order.

Patterns address the experts module by its name (e.g. ``model.layers.0.mlp.experts``) or one of
its projections (``model.layers.0.mlp.experts.down_proj``, see :mod:`qpeft.lora.targets`); an
adapter covers every expert of the projections it adapts.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.integrations.moe import _batched_linear, _grouped_linear

from ...quant.compressed import is_compressed
from ...quant.compressed_experts import projection_shape
from ...quant.layer import QuantModule
from ...quant.plugins.moe import hf_expert_projections, is_hf_experts
from ..experts import LoRAExperts, Projection
from ..moe_rows import Routing
from ..registry import register_lora_matcher

__all__ = ["LoRAHFExperts", "is_hf_experts"]  # is_hf_experts: from qpeft.quant.plugins.moe

# transformers' experts implementation -> the row layout it uses (others: grouped).
_ROW_LAYOUT = {"grouped_mm": "grouped", "batched_mm": "batched"}


class LoRAHFExperts(LoRAExperts):
    """LoRA around a transformers experts module (fused or separate, ``[E, out, in]`` or
    transposed)."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__(base)
        inner = self._inner()
        if getattr(inner, "_is_expert_parallel", False):
            raise ValueError(
                f"{type(inner).__name__}: expert-parallel experts are not supported by LoRA"
            )

    @staticmethod
    def projections(base: nn.Module) -> dict[str, Projection]:
        return {name: Projection(*layout) for name, layout in hf_expert_projections(base).items()}

    @staticmethod
    def num_experts(base: nn.Module) -> int:
        return projection_shape(base, "down_proj")[0]

    def _project(self, name: str, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        inner = self._inner()
        bias = getattr(inner, f"{name}_bias")[routing.expert_ids] if inner.has_bias else None

        def product(weight: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None):
            if routing.kind == "grouped":
                return _grouped_linear(
                    x, weight, routing.offsets, bias=bias, is_transposed=inner.is_transposed
                )
            return _batched_linear(
                x, weight[routing.expert_ids], bias=bias, is_transposed=inner.is_transposed
            )

        if is_compressed(self.base):  # dequantized per call, not saved for backward
            out = self.base.packed_apply(name, product, x, bias)
        else:
            out = product(self.effective_weight(name), x, bias)
        return self.lora_delta(name, x, routing, out)

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """``[T, H]`` tokens, ``[T, k]`` expert indices and weights -> ``[T, H]``."""
        inner = self._inner()
        names = list(self.projections(inner))
        # A quantized experts wrapper (qpeft.quantize) runs Q(W) itself; quantizers set directly
        # on the raw module only act through the LoRA path.
        raw_quantized = not isinstance(self.base, QuantModule) and any(
            self.weight_quantizer(n) is not None for n in names
        )
        if not self.active_adapters() and not raw_quantized:
            return self.base(hidden_states, top_k_index, top_k_weights)
        implementation = getattr(getattr(inner, "config", None), "_experts_implementation", None)
        routing = Routing.build(
            _ROW_LAYOUT.get(implementation, "grouped"),
            top_k_index,
            top_k_weights,
            self.num_experts(inner),
        )
        h = self._project(names[0], routing.rows(hidden_states), routing)
        h = inner._apply_gate(h) if inner.has_gate else inner.act_fn(h)
        out = self._project(names[1], h, routing)
        if getattr(inner, "has_post_expert_norm", False):
            out = inner.post_expert_norm(out)
        return routing.combine(out).to(hidden_states.dtype)


register_lora_matcher(is_hf_experts, LoRAHFExperts)
