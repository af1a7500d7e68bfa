"""The student's LoRA sidecar and its sizes (the quantized layers themselves: :mod:`.layers`).

``attach``: one ``update_model`` call per block; ``sizes``: adapter and model bytes and the peak
resident memory.
"""

from __future__ import annotations

import resource
from collections.abc import Callable
from typing import Any

from torch import nn

from ..lora.convert import lora_layers, update_model
from ..quant.compressed import is_compressed

__all__ = [
    "ADAPTER",
    "attach",
    "peak_rss_mb",
    "sizes",
]

ADAPTER = "default"


def attach(
    model: nn.Module, names: list[str], attrs: dict[str, Any], tick: Callable[[int], Any]
) -> None:
    """One ``update_model`` call per transformer block (``tick`` gets the layers done), one
    adapter ``ADAPTER`` with attributes ``attrs`` on every layer of ``names``."""
    groups: dict[str, list[str]] = {}
    for name in names:
        parts = name.split(".")
        block = next((i for i, part in enumerate(parts) if part.isdigit()), len(parts) - 1)
        groups.setdefault(".".join(parts[: block + 1]), []).append(name)
    for group in groups.values():
        chosen = set(group)
        update_model(
            model,
            {"adapter_name": ADAPTER, "adapter_cfg": {lambda n, chosen=chosen: n in chosen: attrs}},
        )
        tick(len(group))


def peak_rss_mb() -> float:
    """The process's peak resident memory so far (``getrusage`` max RSS), MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def sizes(model: nn.Module) -> dict[str, float]:
    """Adapter and model (frozen and packed tensors) sizes in MiB, and the peak memory."""
    adapter = {id(p) for layer in lora_layers(model).values() for p in layer.adapters.parameters()}
    params = list(model.parameters())
    packed = [b for m in model.modules() if is_compressed(m) for b in m.buffers(recurse=False)]
    adapter_bytes = sum(p.numel() * p.element_size() for p in params if id(p) in adapter)
    model_bytes = sum(
        p.numel() * p.element_size() for p in [*params, *packed] if id(p) not in adapter
    )
    return {
        "adapter_mb": adapter_bytes / 2**20,
        "model_mb": model_bytes / 2**20,
        "peak_rss_mb": peak_rss_mb(),
    }
