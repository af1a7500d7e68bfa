"""A run's output folder, written all-or-nothing by :func:`qpeft.checkpoint.files.atomic_directory`.

A run writes ``.qpeft-run`` last: ``{"format": "qpeft-run", "entries": [every file and folder the
run wrote, relative]}``. An existing ``--output`` is replaced only when it is such a run's folder
holding nothing the run did not write (or an empty folder); anything else is refused, naming what
is unexpected. An output equal to or inside the model folder (or holding it) is refused too.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from ..checkpoint.files import TMP_MARKER, atomic_directory, read_json, write_json

__all__ = ["RUN_MARKER", "output_directory", "unexpected_in_run", "write_run_marker"]

RUN_MARKER = ".qpeft-run"


def _entries(folder: Path) -> list[str]:
    found = []
    for root, dirs, files in os.walk(folder):
        rel = Path(root).relative_to(folder)
        found += [(rel / n).as_posix() for n in dirs + files]
    return sorted(found)


def write_run_marker(folder: Path) -> None:
    """Write ``folder/.qpeft-run`` listing every entry now under ``folder`` (call it last)."""
    entries = [e for e in _entries(folder) if e not in (TMP_MARKER, RUN_MARKER)]
    write_json(folder / RUN_MARKER, {"format": "qpeft-run", "entries": entries})


def unexpected_in_run(folder: Path) -> list[str]:
    """Entries of ``folder`` that no ``qpeft recover`` run wrote there (all of them without a
    valid ``.qpeft-run`` marker; symbolic links are never a run's)."""
    names = sorted(os.listdir(folder))
    try:
        marker = read_json(folder / RUN_MARKER)
        recorded = set(marker["entries"]) if marker.get("format") == "qpeft-run" else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        recorded = None
    if recorded is None or (folder / RUN_MARKER).is_symlink():
        return names
    return [
        e
        for e in _entries(folder)
        if e != RUN_MARKER and (e not in recorded or (folder / e).is_symlink())
    ]


def _check_away_from_model(output: Path, model: str | os.PathLike) -> None:
    out, src = output.resolve(), Path(model).resolve()
    if out == src or src in out.parents or out in src.parents:
        raise ValueError(
            f"--output {str(output)!r} is the model folder {str(model)!r}, inside it or holding "
            "it; choose another output folder"
        )


@contextlib.contextmanager
def output_directory(output: str | os.PathLike, model: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder that replaces ``output`` when the block exits normally (the run
    marker is written last); on any error or interrupt ``output`` is left as it was.

    Raises:
        ValueError: ``output`` is the model folder, inside it or holds it; empty, ``.``, a root,
            the current directory or a symbolic link.
        FileExistsError: ``output`` is a file, or a folder holding entries no run wrote (names
            them).
        PermissionError: ``output`` or its parent cannot be written.
        TimeoutError: another run writes ``output``.
    """
    _check_away_from_model(Path(output), model)
    with atomic_directory(output, "a qpeft recover run", unexpected_in_run) as tmp:
        yield tmp
        write_run_marker(tmp)
