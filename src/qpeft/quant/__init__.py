"""Fake quantization: numerics, TensorQuantizer, ModelOpt-style configs, quantized layers,
quantize()."""

from .api import QuantizeConfig, quantize
from .compress import compress
from .compressed import CompressedConv1D, CompressedLinear, PackedConv1D, PackedLinear
from .config import QuantizerAttributeConfig
from .layer import QuantConv1D, QuantDense, QuantLinear, QuantModule, TransposedTensorQuantizer
from .numerics import (
    apply_ste,
    e2m1_magnitude,
    fake_quant_fp8,
    fake_quant_int,
    fake_quant_int_blockwise,
    fake_quant_mxfp4,
    fake_quant_nvfp4,
    nvfp4_block_scale,
    pow2,
)
from .presets import DISABLED_NAME_PATTERNS, DISABLED_PARENT_CLASSES, PRESETS
from .quantizer import TensorQuantizer
from .registry import quant_class_for, register_quant, register_quant_matcher
from .targets import quantized_layers
from .toggle import disable_quantizer, enable_quantizer, model_quantizers

__all__ = [
    "CompressedConv1D",
    "CompressedLinear",
    "PackedConv1D",
    "PackedLinear",
    "compress",
    "QuantConv1D",
    "QuantDense",
    "QuantLinear",
    "QuantModule",
    "QuantizeConfig",
    "TransposedTensorQuantizer",
    "disable_quantizer",
    "enable_quantizer",
    "model_quantizers",
    "quant_class_for",
    "quantize",
    "quantized_layers",
    "register_quant",
    "register_quant_matcher",
    "DISABLED_NAME_PATTERNS",
    "DISABLED_PARENT_CLASSES",
    "PRESETS",
    "QuantizerAttributeConfig",
    "TensorQuantizer",
    "apply_ste",
    "e2m1_magnitude",
    "fake_quant_fp8",
    "fake_quant_int",
    "fake_quant_int_blockwise",
    "fake_quant_mxfp4",
    "fake_quant_nvfp4",
    "nvfp4_block_scale",
    "pow2",
]
