"""qpeft: quantization-aware parameter-efficient fine-tuning (LoRA) for PyTorch models.

The public API is flat: everything a user needs is importable from ``qpeft``.
"""

from .adapters import (
    delete_adapter,
    disable_adapters,
    disabled_adapters,
    enable_adapters,
    freeze_lora_weights,
    unfreeze_lora_weights,
)
from .config import ExportPEFTConfig, PEFTAttributeConfig, PEFTConfig
from .lora import (
    ExpertsLoRAAdapter,
    LoRAAdapter,
    LoRAExperts,
    LoRALinear,
    LoRAModule,
    register_lora,
    register_lora_matcher,
)
from .modes import state
from .patterns import matches_pattern
from .peft import is_peft_model, lora_layers, update_model

__version__ = "0.1.0"

__all__ = [
    "ExportPEFTConfig",
    "ExpertsLoRAAdapter",
    "LoRAAdapter",
    "LoRAExperts",
    "LoRALinear",
    "LoRAModule",
    "PEFTAttributeConfig",
    "PEFTConfig",
    "delete_adapter",
    "disable_adapters",
    "disabled_adapters",
    "enable_adapters",
    "freeze_lora_weights",
    "is_peft_model",
    "lora_layers",
    "matches_pattern",
    "register_lora",
    "register_lora_matcher",
    "state",
    "unfreeze_lora_weights",
    "update_model",
]
