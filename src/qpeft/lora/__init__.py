"""LoRA layers, adapters, their registry and init methods."""

from .adapter import LoRAAdapter
from .experts import ExpertsLoRAAdapter, LoRAExperts
from .layer import LoRALinear, LoRAModule
from .registry import lora_class_for, register_lora, register_lora_matcher

__all__ = [
    "ExpertsLoRAAdapter",
    "LoRAAdapter",
    "LoRAExperts",
    "LoRALinear",
    "LoRAModule",
    "lora_class_for",
    "register_lora",
    "register_lora_matcher",
]
