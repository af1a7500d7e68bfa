"""Keeping the mode log proportional to the model's structure, not to the number of calls.

Two kinds of entries stop mattering once later calls supersede them:

- toggles (``enable_adapters`` / ``disable_adapters`` set ``enable``; ``freeze_lora_weights`` /
  ``unfreeze_lora_weights`` set ``requires_grad``): a later toggle of the same flag on the same
  ``(layer, adapter)`` pair decides its value, so the pair leaves every earlier toggle of that flag
  (an entry left with no pair goes). No replay reads these flags in between: merges and exports
  record concrete selections, and ``update_model`` only reads its own entry;
- everything about an adapter that ``delete_adapter`` removed: the ``peft`` entries that created or
  updated it, its pairs in toggles, merges and unmerges, its ``refine_svdquant`` entries and earlier
  deletions of the same name. The deletion itself is then not recorded either. (A merged adapter
  cannot be deleted, so no folded update is forgotten; refined weights are tensors, which the
  checkpoint holds.)

The compacted log replays to the same model: same adapters, flags and tensors.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..core.modes import rewrite

__all__ = ["supersede_toggles", "forget_adapter"]

Entry = dict[str, Any]

_FLAG = {
    "enable_adapters": "enable",
    "disable_adapters": "enable",
    "freeze_lora_weights": "grad",
    "unfreeze_lora_weights": "grad",
}
_SELECTIONS = {*_FLAG, "merge_adapters", "unmerge_adapters"}


def _without(entry: Entry, drop: Any) -> Entry | None:
    """``entry`` with the ``(layer, adapter)`` pairs ``drop(layer, adapter)`` removed, or None."""
    selection = {}
    for layer, names in entry["config"]["selection"].items():
        kept = [name for name in names if not drop(layer, name)]
        if kept:
            selection[layer] = kept
    return {**entry, "config": {**entry["config"], "selection": selection}} if selection else None


def supersede_toggles(model: nn.Module, mode: str, selection: dict[str, list[str]]) -> None:
    """Drop the pairs of ``selection`` from earlier toggles of the flag that ``mode`` sets."""
    flag = _FLAG[mode]
    pairs = {(layer, name) for layer, names in selection.items() for name in names}

    def edit(log: list[Entry]) -> list[Entry]:
        out = []
        for entry in log:
            if _FLAG.get(entry.get("mode")) == flag:
                entry = _without(entry, lambda layer, name: (layer, name) in pairs)
            if entry is not None:
                out.append(entry)
        return out

    rewrite(model, edit)


def _about(entry: Entry, name: str) -> bool:
    mode, config = entry.get("mode"), entry.get("config", {})
    if mode in ("peft", "refine_svdquant"):
        return config.get("adapter_name") == name
    return mode == "delete_adapter" and config.get("name") == name


def forget_adapter(model: nn.Module, name: str) -> None:
    """Drop every log entry (and selection pair) about adapter ``name``, which was deleted."""

    def edit(log: list[Entry]) -> list[Entry]:
        out = []
        for entry in log:
            if _about(entry, name):
                continue
            if entry.get("mode") in _SELECTIONS:
                entry = _without(entry, lambda _layer, adapter: adapter == name)
            if entry is not None:
                out.append(entry)
        return out

    rewrite(model, edit)
