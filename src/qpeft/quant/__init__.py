"""Fake quantization: pure numerics, the TensorQuantizer module and ModelOpt-style configs."""

from .config import (
    DISABLED_NAME_PATTERNS,
    DISABLED_PARENT_CLASSES,
    PRESETS,
    QuantizerAttributeConfig,
)
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
from .quantizer import TensorQuantizer

__all__ = [
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
