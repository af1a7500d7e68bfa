"""What each writer writes, so that it replaces only a directory it wrote.

A kind of directory is a key file (a JSON manifest or config saying what the directory is) plus a
fixed set of other files. :func:`own_files` builds the ``unexpected(dir)`` function that
:func:`qpeft.checkpoint.files.atomic_directory` asks before it replaces a directory: every entry
that is not one of the kind's regular files, or a key file that says another kind.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

from .files import Unexpected, read_json

__all__ = ["own_files", "manifest_says"]


def own_files(
    key_file: str, key_problem: Callable[[Any], str | None], others: Collection[str]
) -> Unexpected:
    """``unexpected(dir)`` for a kind made of ``key_file`` and ``others``.

    Args:
        key_file: the JSON file identifying the kind; a directory without it is not of the kind.
        key_problem: given the parsed key file, None if it is of this kind, else what it is.
        others: the other file names the kind holds.

    Returns:
        A function listing the unexpected entries of an existing, non-empty directory: every entry
        when the key file is missing; else the key file with what it is instead (when it names
        another kind) and every entry that is not a regular file of the kind.
    """
    own = {key_file, *others}

    def unexpected(path: Path) -> list[str]:
        names = sorted(os.listdir(path))
        regular = {n for n in names if (path / n).is_file() and not (path / n).is_symlink()}
        if key_file not in regular:
            return names
        foreign = [n for n in names if n not in own or n not in regular]
        try:
            problem = key_problem(read_json(path / key_file))
        except (OSError, ValueError) as err:
            problem = f"unreadable: {err}"
        return ([f"{key_file} ({problem})"] if problem else []) + foreign

    return unexpected


def manifest_says(kind: str) -> Callable[[Any], str | None]:
    """A ``key_problem`` for a ``qpeft.json`` manifest whose ``format`` must be ``kind``."""

    def problem(manifest: Any) -> str | None:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        return None if found == kind else f"a {found!r} manifest, not {kind!r}"

    return problem
