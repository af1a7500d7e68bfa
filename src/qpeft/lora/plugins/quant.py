"""qpeft.quant plugin: a weight-only ``QuantLinear`` is ``F.linear(x, Qw(W), bias)``, fusable with
LoRA."""

from ...core.wrapping import innermost
from ...quant.layer import QuantLinear
from ..linear_bases import register_linear_base


def _operands(layer: QuantLinear):
    if layer.input_quantizer.is_enabled:
        return None  # the base sees Qin(x) while the adapters see x: not one matmul input
    return layer.quantized_weight(), innermost(layer).bias


register_linear_base(QuantLinear, _operands)
