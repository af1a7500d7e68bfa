"""qpeft.quant plugin: a weight-only ``QuantLinear`` is ``F.linear(x, Qw(W), bias)``, fusable with
LoRA; a compressed one too, with its packed raw layer as a lazy weight that the fused node
dequantizes in forward and again in backward (no dense weight is cached or saved)."""

from ...core.wrapping import innermost
from ...quant.compressed import CompressedLinear, PackedConv1D, PackedLinear
from ...quant.layer import QuantLinear
from ..layer import LoRAConv1D, LoRALinear
from ..linear_bases import register_linear_base
from ..registry import register_lora


def _operands(layer: QuantLinear):
    if layer.input_quantizer.is_enabled:
        return None  # the base sees Qin(x) while the adapters see x: not one matmul input
    return layer.quantized_weight(), innermost(layer).bias


def _compressed_operands(layer: CompressedLinear):
    if layer.input_quantizer.is_enabled:
        return None
    packed = innermost(layer)
    return packed, packed.bias  # linear_lora dequantizes it per call


register_linear_base(QuantLinear, _operands)
register_linear_base(CompressedLinear, _compressed_operands)
register_lora(PackedLinear, LoRALinear)
register_lora(PackedConv1D, LoRAConv1D)
