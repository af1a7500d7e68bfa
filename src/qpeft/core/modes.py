"""The mode log: every call that changes a model appends ``{"mode": name, "config": {...}}``.

The log lives on the model object (so ``copy.deepcopy`` carries it) and is plain JSON: callers
record concrete, resolved settings (per-layer attributes, not callable patterns). ``replay`` re-runs
the log on a freshly built model through the registered replay function of each mode, which is how
``restore`` rebuilds a model's structure before loading its tensors.

Inside :func:`restoring` a replay only has to rebuild structure and flags: every tensor value is
loaded right after, so replay functions (and the adapter initialisers) skip computing tensor values
(svdquant's SVDs, merge arithmetic) that would be overwritten anyway.
"""

from __future__ import annotations

import copy
import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn

__all__ = [
    "record",
    "state",
    "swap_module",
    "register_mode",
    "replay",
    "restoring",
    "is_restoring",
    "rewrite",
    "known_modes",
    "unknown_mode_message",
]

_LOG_ATTR = "_qpeft_modes"
_REPLAY: dict[str, Callable[[nn.Module, dict[str, Any]], Any]] = {}
_restoring = threading.local()


@contextmanager
def restoring() -> Iterator[None]:
    """Context in which tensor values are about to be loaded: replays rebuild structure only."""
    depth = getattr(_restoring, "depth", 0)
    _restoring.depth = depth + 1
    try:
        yield
    finally:
        _restoring.depth = depth


def is_restoring() -> bool:
    """Whether the current thread is inside :func:`restoring` (tensor values will be
    overwritten)."""
    return getattr(_restoring, "depth", 0) > 0


def register_mode(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator registering ``fn(model, config)`` as the replay function of mode ``name``."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        _REPLAY[name] = fn
        return fn

    return decorate


def record(model: nn.Module, mode: str, config: dict[str, Any]) -> None:
    """Append ``(mode, config)`` to the model's log.

    Raises:
        TypeError: if ``config`` is not plain JSON (a callable or tensor slipped in).
    """
    try:
        entry = json.loads(json.dumps({"mode": mode, "config": config}))
    except TypeError as err:
        raise TypeError(f"mode {mode!r}: config is not JSON-serializable ({err})") from None
    if _LOG_ATTR not in model.__dict__:
        model.__dict__[_LOG_ATTR] = []
    model.__dict__[_LOG_ATTR].append(entry)


def rewrite(model: nn.Module, edit: Callable[[list[dict[str, Any]]], list[dict[str, Any]]]) -> None:
    """Replace the model's log by ``edit(a copy of it)``: compaction of history that no longer
    shapes the model (the log is a new list, so a rolled-back transaction puts the old one back)."""
    model.__dict__[_LOG_ATTR] = edit(state(model))


def swap_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` at path ``name`` of ``model``; return the model's root afterwards.

    That is ``model`` itself, unless ``name`` is ``""``: ``model`` is then the very layer being
    replaced (a bare ``nn.Linear`` passed as the model), ``new`` becomes the root, and the mode log
    moves from ``model`` to ``new``. Every mode function returns this root: the model to use.
    """
    if name:
        model.set_submodule(name, new)
        return model
    log = model.__dict__.pop(_LOG_ATTR, None)
    if log is not None:
        new.__dict__[_LOG_ATTR] = log
    return new


def state(model: nn.Module) -> list[dict[str, Any]]:
    """A copy of the model's mode log: a list of ``{"mode": str, "config": dict}`` entries."""
    return copy.deepcopy(model.__dict__.get(_LOG_ATTR, []))


def known_modes() -> list[str]:
    """Names of every mode that has a replay function."""
    return sorted(_REPLAY)


#: Modes older qpeft versions recorded and this one no longer has: name -> why.
REMOVED_MODES = {
    "input_sharing": "qpeft.set_input_sharing was removed (its measured speed-up was noise); "
    "delete this entry from the log to load the checkpoint, which then computes the same values",
}


def unknown_mode_message(mode: Any) -> str:
    """Why ``mode`` cannot be replayed: removed (and why) or unknown (with the known modes)."""
    if mode in REMOVED_MODES:
        return f"mode {mode!r} cannot be replayed: {REMOVED_MODES[mode]}"
    return f"cannot replay unknown mode {mode!r}; known: {known_modes()}"


def replay(model: nn.Module, log: list[dict[str, Any]]) -> nn.Module:
    """Re-apply every entry of ``log`` to ``model`` in order (each re-records itself).

    Returns:
        The model's root afterwards: ``model``, or the wrapper now around it when ``model`` is
        itself a layer that a mode wraps (see :func:`swap_module`). A replay function returns the
        root it leaves (None: unchanged).

    Raises:
        ValueError: for an entry of an unknown mode (checked before anything is applied).
    """
    unknown = [
        e.get("mode") if isinstance(e, dict) else e
        for e in log
        if not isinstance(e, dict) or e.get("mode") not in _REPLAY
    ]
    if unknown:
        raise ValueError(unknown_mode_message(unknown[0]))
    for entry in log:
        root = _REPLAY[entry["mode"]](model, entry["config"])
        model = model if root is None else root
    return model
