"""Name patterns: fnmatch wildcards, callables and lists of them, resolved in order.

A pattern map is an ordered ``{pattern: attributes}`` dict. For a module name every matching entry
is
merged in order, key by key, using only the keys the entry set explicitly, so
``{"*": {"rank": 8}, "*attn*": {"scale": 2}}`` gives attention layers rank 8 *and* scale 2.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from fnmatch import fnmatchcase
from typing import Any

from pydantic import BaseModel

__all__ = ["matches_pattern", "merge_matching", "merge_matching_any"]


def matches_pattern(name: str, patterns: Any, allow_callable: bool = True) -> bool:
    """Whether ``name`` matches ``patterns``.

    Args:
        name: a module (or quantizer, or adapter) name such as
        ``"model.layers.0.self_attn.q_proj"``.
        patterns: None (matches everything), an fnmatch wildcard string (``*`` crosses dots), a
            callable ``name -> bool``, or an iterable of those (matches if any element does; an
            empty
            one matches nothing).
        allow_callable: if False, a callable pattern is a TypeError.

    Raises:
        TypeError: for a pattern of another type, or a callable when ``allow_callable`` is False.
    """
    if patterns is None:
        return True
    if isinstance(patterns, str):
        return fnmatchcase(name, patterns)
    if callable(patterns):
        if not allow_callable:
            raise TypeError(
                f"callable pattern {patterns!r} is not allowed here; use a wildcard string"
            )
        return bool(patterns(name))
    if isinstance(patterns, Iterable):
        return any(matches_pattern(name, p, allow_callable) for p in patterns)
    raise TypeError(f"unsupported pattern type {type(patterns).__name__}: {patterns!r}")


def _explicit(attrs: Any) -> dict[str, Any]:
    if isinstance(attrs, BaseModel):
        return {key: getattr(attrs, key) for key in attrs.model_fields_set}
    if isinstance(attrs, Mapping):
        return dict(attrs)
    raise TypeError(f"pattern attributes must be a dict or a config, got {type(attrs).__name__}")


def merge_matching(name: str, pattern_map: Mapping[Any, Any]) -> dict[str, Any] | None:
    """Merge, in order and key by key, the explicitly set attributes of every entry matching
    ``name``.

    Returns None when no entry matches. Callable patterns are called with ``name``.
    """
    return merge_matching_any((name,), pattern_map)


def merge_matching_any(
    names: Sequence[str], pattern_map: Mapping[Any, Any]
) -> dict[str, Any] | None:
    """As :func:`merge_matching`, for the entries matching *any* of ``names`` (still in map order).

    Used for a grouped-experts projection, addressed either by its layer ``L`` or as ``L.p``.
    """
    merged: dict[str, Any] | None = None
    for pattern, attrs in pattern_map.items():
        if any(matches_pattern(name, pattern) for name in names):
            merged = {**(merged or {}), **_explicit(attrs)}
    return merged
