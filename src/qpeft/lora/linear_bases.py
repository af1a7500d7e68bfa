"""Bases whose forward is ``F.linear(x, weight, bias)`` of the raw input, so a LoRA layer may fuse
it.

A LoRA layer over such a base computes ``x W^T + bias + LoRA(x)`` in one autograd node
(:func:`qpeft.lora.fused.linear_lora`). Each registered base type maps to a function returning the
``(weight, bias)`` its forward would use right now, or None when it currently computes something
else (e.g. a quantized layer whose input quantizer is on). Registration is by exact type: a
subclass may override ``forward`` and must register itself.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn.modules import module as _global_hooks

__all__ = ["register_linear_base", "linear_operands"]

Operands = tuple[torch.Tensor, torch.Tensor | None]

_BASES: dict[type, Callable[[nn.Module], Operands | None]] = {
    nn.Linear: lambda base: (base.weight, base.bias),
}


def register_linear_base(base_type: type, operands: Callable[[nn.Module], Operands | None]) -> None:
    """Declare that ``base_type``'s forward is ``F.linear(x, *operands(base))`` (when not None)."""
    _BASES[base_type] = operands


def linear_operands(base: nn.Module, x: torch.Tensor) -> Operands | None:
    """``(weight, bias)`` to fuse for ``base`` on input ``x``, or None to run ``base(x)`` itself.

    None also when the base has forward hooks (they must run), under autocast (whose casts the
    fused in-place update would bypass) or when the weight's dtype differs from ``x``'s.
    """
    get = _BASES.get(type(base))
    if get is None or base._forward_hooks or base._forward_pre_hooks:
        return None
    if _global_hooks._global_forward_hooks or _global_hooks._global_forward_pre_hooks:
        return None
    if torch.is_autocast_enabled(x.device.type):
        return None
    operands = get(base)
    if operands is None or operands[0].dtype != x.dtype:
        return None
    return operands
