"""LoRA layers, adapters, their registry and init methods."""

from .adapter import LoRAAdapter
from .layer import LoRALinear, LoRAModule
from .registry import lora_class_for, register_lora

__all__ = ["LoRAAdapter", "LoRALinear", "LoRAModule", "lora_class_for", "register_lora"]
