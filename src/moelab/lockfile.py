"""Exclusive advisory locks on a file (flock): a blocking one for caches that queue their writers, and a
non-blocking one for folders that must hold one writer or refuse the second (a train run folder).

The lock belongs to the open file description, so the kernel releases it when the process dies: a crashed
holder never leaves a stale lock. The file itself stays in place; deleting it on release would let a
third process lock a new file while a second still holds the old, unlinked one.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from pathlib import Path
from typing import Iterator

from moelab.config import MoelabError


@contextlib.contextmanager
def locked(path: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created if absent) for the block, waiting for other holders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def holder(path: str | Path) -> str | None:
    """Who holds the lock on `path` now (what the holder wrote), or None when nobody does. Takes nothing."""
    try:
        f = open(path, "r")
    except FileNotFoundError:
        return None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return f.read().strip() or "another process"
        fcntl.flock(f, fcntl.LOCK_UN)
        return None


class HeldLock:
    """An exclusive lock taken without waiting; `release()` (or process exit) gives it back."""

    def __init__(self, path: str | Path, what: str):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a+")
        try:
            fcntl.flock(self._f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._f.seek(0)
            holder = self._f.read().strip() or "another process"
            self._f.close()
            raise MoelabError(f"{what} is in use by {holder}: wait for it to finish, or choose another "
                              f"folder") from None
        # Who holds it, for the message the next comer gets (written only once the lock is ours).
        self._f.seek(0)
        self._f.truncate()
        self._f.write(f"process {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}")
        self._f.flush()

    def release(self) -> None:
        if not self._f.closed:
            self._f.seek(0)
            self._f.truncate()
            fcntl.flock(self._f, fcntl.LOCK_UN)
            self._f.close()
