"""qpeft: quantization-aware parameter-efficient fine-tuning (LoRA) for PyTorch models."""

__version__ = "0.1.0"
