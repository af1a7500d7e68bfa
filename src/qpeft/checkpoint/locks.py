"""One writer per path, readers beside it: ``fcntl.flock`` on ``.<name>.lock`` in the parent.

Writers take the lock exclusively, readers shared; both wait at most :data:`LOCK_TIMEOUT` seconds.
The lock file is removed by whoever releases it last (while holding it exclusively); a process that
locked a file that was removed meanwhile sees another inode at the path and locks again, so two
holders never lock different files. Where a reader cannot create the lock file (a read-only
folder), no writer can write either, and it reads without one. Without ``fcntl`` (not POSIX) there
is no locking.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

__all__ = ["LOCK_TIMEOUT", "lock_file", "locked"]

#: Seconds a save or read waits for another save of the same path before giving up.
LOCK_TIMEOUT = 60.0
_POLL = 0.005


def lock_file(path: Path) -> Path:
    """The lock file of ``path``: ``.<name>.lock`` beside it."""
    return path.parent / f".{path.name}.lock"


def _open(lock: Path, shared: bool) -> int | None:
    try:
        return os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        if not shared:
            raise PermissionError(
                f"cannot write into {lock.parent} ({err.strerror}); nothing was written"
            ) from None
    try:
        return os.open(lock, os.O_RDONLY)
    except OSError:
        return None  # a read-only place without a lock file: nobody writes there


def _same_file(fd: int, lock: Path) -> bool:
    try:
        st, now = os.fstat(fd), os.stat(lock)
    except FileNotFoundError:
        return False
    return (st.st_dev, st.st_ino) == (now.st_dev, now.st_ino)


def _acquire(lock: Path, shared: bool, timeout: float, path: Path) -> int | None:
    deadline = time.monotonic() + timeout
    mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
    while True:
        fd = _open(lock, shared)
        if fd is None:
            return None
        while True:
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise TimeoutError(
                        f"another save of {path} is in progress (waited {timeout:g} s for {lock})"
                    ) from None
                time.sleep(_POLL)
        if _same_file(fd, lock):
            return fd
        os.close(fd)  # removed by its last holder meanwhile: lock the new one


def _release(fd: int, lock: Path) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # nobody else holds or waits in flock
        if _same_file(fd, lock):
            os.unlink(lock)
    except OSError:
        pass  # others hold it (they remove it), or a read-only folder
    finally:
        os.close(fd)


@contextlib.contextmanager
def locked(path: Path, shared: bool, timeout: float | None = None) -> Iterator[None]:
    """Hold the lock of ``path`` (shared for readers, exclusive for writers) inside the block.

    Args:
        path: the directory that is read or written; its parent must exist.
        shared: True for a reader (many at once), False for a writer (alone).
        timeout: seconds to wait; None: :data:`LOCK_TIMEOUT`.

    Raises:
        TimeoutError: another save of ``path`` held it for longer ("another save ... in progress").
        PermissionError: a writer cannot create the lock file (a read-only folder).
    """
    if fcntl is None:  # pragma: no cover
        yield
        return
    lock = lock_file(path)
    fd = _acquire(lock, shared, LOCK_TIMEOUT if timeout is None else timeout, path)
    try:
        yield
    finally:
        if fd is not None:
            _release(fd, lock)
