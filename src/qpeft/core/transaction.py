"""All-or-nothing model changes for restore and adapter loading.

``apply_atomically(model, change)`` runs ``change`` so that on failure ``model`` is left as it was:

1. if the model can be deep-copied, ``change(copy, dry_run=True)`` first runs on a *structural*
   copy: the same modules and attributes, but every parameter and buffer is an uninitialised CPU
   tensor of the same shape and dtype (no data is copied, so this is cheap). Every error (a mode
   that does not replay, a missing key, a wrong shape) surfaces there and the real model is never
   touched. A dry run must therefore not depend on tensor values, and may skip copying values;
2. ``change(model, dry_run=False)`` then runs on the real model under a structural snapshot:
   every module's attribute dict (children, parameters, buffers, hooks, plain attributes, the mode
   log) and every parameter's ``requires_grad``. If it raises, the snapshot is put back.

Models that cannot be deep-copied (Megatron-Core modules hold process groups) rely on step 2 alone.
Step 2 does not copy tensor data, so a ``change`` must check everything before it writes into
existing tensors; the loaders here validate keys, shapes and dtypes before copying a single value
(only a key that no module accepts is found after the copy; on such models it is reported, with
the structure rolled back but the values already copied into matching tensors kept).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["apply_atomically", "structural_copy"]


def _blank(t: torch.Tensor) -> torch.Tensor:
    # on the CPU even for accelerator models, and never written: no copy, next to no memory
    blank = torch.empty(t.shape, dtype=t.dtype, device="cpu")
    return (
        nn.Parameter(blank, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else blank
    )


def structural_copy(model: nn.Module) -> nn.Module | None:
    """A deep copy of ``model`` with uninitialised tensors (tying kept), or None if not copyable."""
    memo = {id(t): _blank(t) for t in [*model.parameters(), *model.buffers()]}
    try:
        return copy.deepcopy(model, memo)
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


def apply_atomically(
    model: nn.Module, change: Callable[[nn.Module, bool], Any], validate: bool = True
) -> Any:
    """Run ``change(model, False)``; if it raises, ``model`` is left as it was (see module doc).

    Args:
        model: the model to change in place.
        change: ``change(target, dry_run)``; it must check everything before writing tensor values.
        validate: first run ``change(copy, True)`` on a structural copy when the model can be
        copied.

    Returns:
        What ``change(model, False)`` returns.

    Raises:
        Whatever ``change`` raises, after the model is put back.
    """
    if validate:
        trial = structural_copy(model)
        if trial is not None:
            change(trial, True)
            del trial
    snapshot = _Snapshot(model)
    try:
        return change(model, False)
    except BaseException:
        snapshot.rollback()
        raise
