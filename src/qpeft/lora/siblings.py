"""One shared ``x @ A^T`` for LoRA layers that read the same input (q/k/v, gate/up).

LoRA layers that are children of one module and have the same ``in_features`` form a
:class:`SiblingGroup` (linked by :func:`link_siblings` after every ``update_model``). Whether two of
them really read the same tensor is only known at run time, so the group learns it: when a layer
is called with the very tensor (same object, same version) the group's previous leader was called
with, it becomes that leader's partner. From then on the leader computes, in one matmul,

    T = x [A_leader; A_p1; A_p2; ...]^T      [N, R_leader + R_p1 + ...]

and hands each partner its column block when the partner is called with the same tensor. One
product over ``x`` (and in backward one ``dA`` product and one ``dx`` product) replaces one per
layer. A partner that does not come (or comes with another tensor) is dropped from the leader's
partners, so a wrong guess costs one wasted block, once.

The sharing computes the same products (column blocks of one GEMM instead of separate GEMMs), but
their rounding may differ by an ulp from the per-layer products, and which layers share is learned
while the model runs. It is therefore off by default: ``qpeft.set_input_sharing(model, True)``
turns it on (a recorded mode, so ``restore`` turns it on again; copies keep what was learned). It
is skipped under ``torch.compile``, across threads and when grad mode changed between the calls.
Measured on the benchmark model (CPU, rank 16): about 0.5% off a training step, nothing
measurable on inference; see ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import copy
import threading
import weakref
from dataclasses import dataclass

import torch
from torch import nn

from ..core.modes import record, register_mode, state
from .layer import LoRAModule

__all__ = ["SiblingGroup", "link_siblings", "set_input_sharing"]


@dataclass
class _Pending:
    """Column blocks computed by a leader for partners still to come."""

    x: torch.Tensor
    version: int
    thread: int
    grad: bool
    leader: int
    blocks: dict[int, tuple[tuple[torch.Tensor, ...], torch.Tensor]]  # member -> (A parts, block)

    def matches(self, x: torch.Tensor) -> bool:
        return (
            self.x is x
            and self.version == x._version
            and self.thread == threading.get_ident()
            and self.grad == torch.is_grad_enabled()
        )


class SiblingGroup:
    """LoRA layers under one parent with one ``in_features``: candidates to share ``x @ A^T``."""

    def __init__(self, members: list[nn.Module], enabled: bool = False) -> None:
        self.members = list(members)
        self.enabled = enabled
        self._reset()

    def _reset(self) -> None:
        self._pending: _Pending | None = None
        self._last: tuple[weakref.ref, int, int] | None = None  # (x, version, leader index)
        self._partners: dict[int, list[int]] = {}

    def __deepcopy__(self, memo: dict) -> SiblingGroup:
        new = SiblingGroup([copy.deepcopy(m, memo) for m in self.members], self.enabled)
        new._partners = copy.deepcopy(self._partners)  # a copy computes exactly as the original
        return new

    def __getstate__(self) -> dict:
        return {"members": self.members, "enabled": self.enabled, "partners": self._partners}

    def __setstate__(self, saved: dict) -> None:
        self.members, self.enabled = saved["members"], saved["enabled"]
        self._reset()
        self._partners = saved["partners"]

    def low_rank(self, member: nn.Module, x: torch.Tensor, parts: tuple[torch.Tensor, ...]):
        """``x2 @ cat(parts)^T : [N, R]`` for ``member``, or None: compute it alone this time.

        ``parts`` are the ``A`` factors (``[r_i, in]``) the member would concatenate.
        """
        if not self.enabled or torch.compiler.is_compiling():
            return None
        index = self._index(member)
        if index is None:
            return None
        served = self._serve(index, x, parts)
        if served is not None or self._learn(index, x):
            return served
        return self._lead(index, x, parts)

    def _index(self, member: nn.Module) -> int | None:
        for i, m in enumerate(self.members):
            if m is member:
                return i
        return None

    def _serve(self, index: int, x: torch.Tensor, parts: tuple[torch.Tensor, ...]):
        pending = self._pending
        if pending is None:
            return None
        if pending.matches(x) and index in pending.blocks:
            want, block = pending.blocks.pop(index)
            if not pending.blocks:
                self._pending = None
            if len(want) == len(parts) and all(p is q for p, q in zip(want, parts, strict=True)):
                return block
            return None
        if not pending.matches(x):  # the partners still pending did not come with this tensor
            left = set(pending.blocks)
            self._partners[pending.leader] = [
                j for j in self._partners.get(pending.leader, []) if j not in left
            ]
            self._pending = None
        return None

    def _learn(self, index: int, x: torch.Tensor) -> bool:
        """Record ``index`` as a partner when the group's last leader read this same tensor."""
        last = self._last
        if last is None or last[0]() is not x or last[1] != x._version or last[2] == index:
            return False
        partners = self._partners.setdefault(last[2], [])
        if index not in partners:
            partners.append(index)
        return True

    def _lead(self, index: int, x: torch.Tensor, parts: tuple[torch.Tensor, ...]):
        self._last = (weakref.ref(x), x._version, index)
        shared = [(j, self.members[j].shareable_a(x)) for j in self._partners.get(index, [])]
        shared = [(j, p) for j, p in shared if p is not None]
        if not shared:
            return None
        all_parts = [*parts, *(a for _, p in shared for a in p)]
        widths = [sum(a.shape[0] for a in parts)] + [sum(a.shape[0] for a in p) for _, p in shared]
        x2 = x.reshape(-1, x.shape[-1])
        blocks = torch.split(torch.mm(x2, torch.cat(all_parts, 0).t()), widths, 1)
        self._pending = _Pending(
            x,
            x._version,
            threading.get_ident(),
            torch.is_grad_enabled(),
            index,
            {j: (p, blk) for (j, p), blk in zip(shared, blocks[1:], strict=True)},
        )
        return blocks[0]


def _sharing_on(model: nn.Module) -> bool:
    """The model's recorded setting (the last ``input_sharing`` mode), default off."""
    for entry in reversed(state(model)):
        if entry["mode"] == "input_sharing":
            return bool(entry["config"]["enabled"])
    return False


def link_siblings(model: nn.Module) -> None:
    """Group the LoRA-layer children of every module of ``model`` by ``in_features``."""
    enabled = _sharing_on(model)
    for parent in model.modules():
        by_in: dict[int, list[nn.Module]] = {}
        for child in parent.children():
            if isinstance(child, LoRAModule):
                child._siblings = None
                features = child.shareable_in_features()
                if features is not None:
                    by_in.setdefault(features, []).append(child)
        for members in by_in.values():
            if len(members) > 1:
                group = SiblingGroup(members, enabled)
                for m in members:
                    m._siblings = group


def set_input_sharing(model: nn.Module, enabled: bool) -> nn.Module:
    """Let LoRA layers that read the same input share one ``x @ A^T`` product (off by default).

    Sibling LoRA layers of one module with the same ``in_features`` (q/k/v, gate/up) learn at run
    time which of them read the very same tensor; then the first computes the low-rank product
    for all of them in one matmul. The results equal the per-layer ones up to rounding (an ulp).
    Recorded in the mode log, so :func:`qpeft.restore` sets it again.

    Args:
        model: a model with LoRA layers (:func:`qpeft.update_model`).
        enabled: turn the sharing on (True) or off (False).

    Returns:
        ``model``.

    Raises:
        TypeError: ``enabled`` is not a bool.
        ValueError: ``model`` has no LoRA layers.
    """
    if not isinstance(enabled, bool):
        raise TypeError(f"set_input_sharing: enabled must be a bool, got {enabled!r}")
    _apply_sharing(model, enabled)
    record(model, "input_sharing", {"enabled": enabled})
    return model


def _apply_sharing(model: nn.Module, enabled: bool) -> None:
    if not any(isinstance(m, LoRAModule) for m in model.modules()):
        raise ValueError(
            "set_input_sharing: model has no LoRA layers; call qpeft.update_model first"
        )
    for module in model.modules():
        group = getattr(module, "_siblings", None)
        if isinstance(group, SiblingGroup):
            group.enabled = enabled
            group._reset()


@register_mode("input_sharing")
def _replay_sharing(model: nn.Module, config: dict) -> None:
    set_input_sharing(model, bool(config["enabled"]))
