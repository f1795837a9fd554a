"""lockfile: one holder at a time across processes, the holder named, released when the holder dies."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import moelab
from moelab.config import MoelabError
from moelab.lockfile import HeldLock, holder, locked

SRC = str(Path(moelab.__file__).parents[1])


def other_process(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {SRC!r}); {code}"],
                          capture_output=True, text=True, timeout=120)


def test_a_held_lock_refuses_another_process_and_names_the_holder(tmp_path):
    path = tmp_path / "x.lock"
    lock = HeldLock(path, "folder X")
    assert holder(path).startswith("process ")
    got = other_process(f"from moelab.lockfile import HeldLock; HeldLock({str(path)!r}, 'folder X')")
    assert got.returncode != 0 and f"folder X is in use by {holder(path)}" in got.stderr
    lock.release()
    assert holder(path) is None
    assert other_process(f"from moelab.lockfile import HeldLock; HeldLock({str(path)!r}, 'x')").returncode == 0


def test_a_dead_holder_leaves_no_stale_lock(tmp_path):
    path = tmp_path / "x.lock"
    got = other_process(f"from moelab.lockfile import HeldLock; l = HeldLock({str(path)!r}, 'x'); import os; os._exit(0)")
    assert got.returncode == 0 and path.exists()
    assert holder(path) is None  # the kernel released it with the process
    HeldLock(path, "x").release()


def test_the_blocking_lock_excludes_the_non_blocking_one(tmp_path):
    path = tmp_path / "cache.lock"
    with locked(path):
        with pytest.raises(MoelabError, match="cache is in use"):
            HeldLock(path, "cache")
    HeldLock(path, "cache").release()
