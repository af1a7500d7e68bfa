"""What a run's models weigh: the adapter, the student's base, the dense teacher, peak memory."""

from __future__ import annotations

import resource

from torch import nn

from ..lora.convert import lora_layers
from ..quant.compressed import is_compressed

__all__ = ["model_sizes", "peak_rss_mb"]


def peak_rss_mb() -> float:
    """The process's peak resident memory so far (``getrusage`` max RSS), MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def model_sizes(student: nn.Module, teacher: nn.Module) -> dict[str, float]:
    """Sizes in MiB, with the peak resident memory so far.

    Args:
        student: the recovered student (fake-quantized or compressed, with LoRA adapters).
        teacher: the dense model it was quantized from.

    Returns:
        ``adapter_mb`` (the adapters' parameters), ``model_mb`` (the student's other parameters
        and packed buffers), ``dense_mb`` (the teacher's parameters at their dtype) and
        ``peak_rss_mb``.
    """
    adapter = {
        id(p) for layer in lora_layers(student).values() for p in layer.adapters.parameters()
    }
    params = list(student.parameters())
    packed = [b for m in student.modules() if is_compressed(m) for b in m.buffers(recurse=False)]
    adapter_bytes = sum(p.numel() * p.element_size() for p in params if id(p) in adapter)
    model_bytes = sum(
        p.numel() * p.element_size() for p in [*params, *packed] if id(p) not in adapter
    )
    dense_bytes = sum(p.numel() * p.element_size() for p in teacher.parameters())
    return {
        "adapter_mb": adapter_bytes / 2**20,
        "model_mb": model_bytes / 2**20,
        "dense_mb": dense_bytes / 2**20,
        "peak_rss_mb": peak_rss_mb(),
    }
