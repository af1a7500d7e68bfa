"""qpeft: quantization-aware parameter-efficient fine-tuning (LoRA) for PyTorch models.

The public API is flat: everything a user needs is importable from ``qpeft``.
"""

from .checkpoint import (
    export_hf_checkpoint,
    export_hf_peft,
    grouped_experts_layers,
    import_hf_peft,
    load_adapters,
    restore,
    save,
    save_adapters,
)
from .core.modes import state
from .core.patterns import matches_pattern
from .lora import (
    ExpertsLoRAAdapter,
    LoRAAdapter,
    LoRAExperts,
    LoRALinear,
    LoRAModule,
    register_lora,
    register_lora_matcher,
)
from .lora.config import ExportPEFTConfig, PEFTAttributeConfig, PEFTConfig
from .lora.convert import is_peft_model, lora_layers, update_model
from .lora.manage import (
    delete_adapter,
    disable_adapters,
    disabled_adapters,
    enable_adapters,
    freeze_lora_weights,
    unfreeze_lora_weights,
)
from .lora.merge import export, merge_adapters, unmerge_adapters
from .lora.refine import refine_svdquant
from .lora.routing import adapter_routing
from .parallel import (
    LoRAColwiseParallel,
    LoRARowwiseParallel,
    full_state_dict,
    load_full_state_dict,
    lora_tp_plan,
    parallelize_lora,
)
from .quant import (
    PRESETS,
    QuantizeConfig,
    QuantizerAttributeConfig,
    QuantLinear,
    TensorQuantizer,
    apply_ste,
    compress,
    disable_quantizer,
    enable_quantizer,
    fake_quant_fp8,
    fake_quant_int,
    fake_quant_int_blockwise,
    fake_quant_mxfp4,
    fake_quant_nvfp4,
    quantize,
    register_quant,
    register_quant_matcher,
)

__version__ = "0.1.0"

__all__ = [
    # quantization (issue 3)
    "PRESETS",
    "QuantLinear",
    "QuantizeConfig",
    "QuantizerAttributeConfig",
    "TensorQuantizer",
    "apply_ste",
    "compress",
    "disable_quantizer",
    "enable_quantizer",
    "fake_quant_fp8",
    "fake_quant_int",
    "fake_quant_int_blockwise",
    "fake_quant_mxfp4",
    "fake_quant_nvfp4",
    "quantize",
    "refine_svdquant",
    "register_quant",
    "register_quant_matcher",
    # distributed (issue 5)
    "LoRAColwiseParallel",
    "LoRARowwiseParallel",
    "full_state_dict",
    "load_full_state_dict",
    "lora_tp_plan",
    "parallelize_lora",
    # foundation
    "ExportPEFTConfig",
    "ExpertsLoRAAdapter",
    "LoRAAdapter",
    "LoRAExperts",
    "LoRALinear",
    "LoRAModule",
    "PEFTAttributeConfig",
    "PEFTConfig",
    "adapter_routing",
    "delete_adapter",
    "disable_adapters",
    "disabled_adapters",
    "enable_adapters",
    "export",
    "export_hf_checkpoint",
    "export_hf_peft",
    "freeze_lora_weights",
    "grouped_experts_layers",
    "import_hf_peft",
    "is_peft_model",
    "load_adapters",
    "lora_layers",
    "matches_pattern",
    "merge_adapters",
    "register_lora",
    "register_lora_matcher",
    "restore",
    "save",
    "save_adapters",
    "state",
    "unfreeze_lora_weights",
    "unmerge_adapters",
    "update_model",
]
