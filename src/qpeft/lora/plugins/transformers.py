"""transformers plugin: LoRA for GPT-2's ``Conv1D``."""

from transformers.pytorch_utils import Conv1D

from ..layer import LoRAConv1D
from ..registry import register_lora

register_lora(Conv1D, LoRAConv1D)
