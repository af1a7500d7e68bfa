"""Write a run's files all-or-nothing: into a hidden temporary folder next to the target, moved into
place at the end; an interrupted or failed run removes the temporary folder and leaves the target
(and any previous run there) as it was.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_directory"]


@contextmanager
def atomic_directory(target: str | Path) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``target`` when the block exits normally.

    Raises:
        ValueError: when ``target`` exists and is not a directory, or its parent cannot be created.
    """
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise ValueError(f"output {str(target)!r} exists and is not a directory")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(
            f"cannot create output folder {str(target.parent)!r}: {err.strerror}"
        ) from None
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, old / "run")
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
