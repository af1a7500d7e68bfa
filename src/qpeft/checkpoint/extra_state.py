"""Modules' ``_extra_state`` entries in checkpoints.

``nn.Module.get_extra_state`` puts a non-tensor value under ``<module>._extra_state`` in
``state_dict()``. Megatron-Core's ``ColumnParallelLinear`` and ``RowParallelLinear`` define it
for compatibility with Transformer Engine (whose layers keep their FP8 metadata there) and return
None; they ignore whatever ``set_extra_state`` receives, and their load pre-hook fills a missing
entry with None. qpeft does the same: an extra state that is None is not written (safetensors holds
only tensors) and its absence is accepted on load. A tensor extra state is an ordinary tensor
entry; any other value (e.g. Transformer Engine's serialised FP8 state) is refused by name.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["EXTRA_STATE", "is_extra_state_key", "tensor_state"]

EXTRA_STATE = "_extra_state"  # torch's key suffix (nn.modules.module._EXTRA_STATE_KEY_SUFFIX)


def is_extra_state_key(key: str) -> bool:
    """Whether ``key`` is a module's ``_extra_state`` entry."""
    return key == EXTRA_STATE or key.endswith("." + EXTRA_STATE)


def tensor_state(state_dict: dict[str, Any]) -> dict[str, Any]:
    """``state_dict`` without its empty (None) ``_extra_state`` entries.

    Raises:
        TypeError: an ``_extra_state`` entry that is neither None nor a tensor (names the key).
    """
    out = {}
    for key, value in state_dict.items():
        if is_extra_state_key(key) and not isinstance(value, torch.Tensor):
            if value is None:
                continue
            raise TypeError(
                f"state_dict entry {key!r} is a module's extra state of type "
                f"{type(value).__name__}, not None or a tensor; it cannot be saved (Transformer "
                "Engine layers are not supported)"
            )
        out[key] = value
    return out
