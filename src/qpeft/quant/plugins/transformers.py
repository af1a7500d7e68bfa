"""transformers plugin: quantized GPT-2 ``Conv1D``."""

from transformers.pytorch_utils import Conv1D

from ..layer import QuantConv1D
from ..registry import register_quant

register_quant(Conv1D, QuantConv1D)
