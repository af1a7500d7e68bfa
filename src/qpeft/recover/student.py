"""The student's LoRA sidecar: ``attach`` makes one ``update_model`` call per transformer block
(the quantized layers themselves: :mod:`.layers`; sizes: :mod:`.sizes`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from ..lora.convert import update_model

__all__ = [
    "ADAPTER",
    "attach",
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
