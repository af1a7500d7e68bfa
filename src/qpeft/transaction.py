"""All-or-nothing model changes for restore and adapter loading.

``apply_atomically(model, change)`` runs ``change`` so that on failure ``model`` is left as it was:

1. if the model can be deep-copied, ``change`` first runs on a copy: every error (a mode that does
   not replay, a missing key, a wrong shape) surfaces there and the real model is never touched;
2. ``change`` then runs on the real model under a structural snapshot: every module's attribute dict
   (children, parameters, buffers, hooks, plain attributes, the mode log) and every parameter's
   ``requires_grad``. If it raises, the snapshot is put back.

Models that cannot be deep-copied (Megatron-Core modules hold process groups) rely on step 2 alone.
Step 2 does not copy tensor data, so a ``change`` must check everything before it writes into
existing tensors; the loaders here validate keys, shapes and dtypes before copying a single value.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from torch import nn

__all__ = ["apply_atomically", "try_deepcopy"]


def try_deepcopy(model: nn.Module) -> nn.Module | None:
    """A deep copy of ``model``, or None when it cannot be copied."""
    try:
        return copy.deepcopy(model)
    except Exception:  # noqa: BLE001 - any failure means "not copyable"; step 2 still protects
        return None


class _Snapshot:
    """Every module's attribute dict (containers copied one level) and every ``requires_grad``."""

    def __init__(self, model: nn.Module) -> None:
        self.modules = [(m, _shallow(m.__dict__)) for m in model.modules()]
        self.flags = [(p, p.requires_grad) for p in model.parameters()]

    def rollback(self) -> None:
        for module, attrs in self.modules:
            module.__dict__.clear()
            module.__dict__.update(_shallow(attrs))
        for param, flag in self.flags:
            param.requires_grad_(flag)


def _shallow(attrs: dict[str, Any]) -> dict[str, Any]:
    return {k: v.copy() if isinstance(v, dict | list | set) else v for k, v in attrs.items()}


def apply_atomically(model: nn.Module, change: Callable[[nn.Module], Any], validate: bool = True) -> Any:
    """Run ``change(model)``; if it raises, ``model`` is left as it was (see module doc).

    Args:
        model: the model to change in place.
        change: a function of the model; it must check everything before writing tensor values.
        validate: run ``change`` on a deep copy first when the model can be copied.

    Returns:
        What ``change(model)`` returns.

    Raises:
        Whatever ``change`` raises, after the model is put back.
    """
    if validate:
        trial = try_deepcopy(model)
        if trial is not None:
            change(trial)
            del trial
    snapshot = _Snapshot(model)
    try:
        return change(model)
    except BaseException:
        snapshot.rollback()
        raise
