"""Checks on output paths before any work starts, so a bad --out costs one line, not a traceback
after minutes of work (or a half-written file)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from moelab.config import MoelabError


def check_writable_dir(path: str | Path, flag: str = "--out") -> None:
    """Refuse a folder that cannot be created or written: one under a regular file, or without permission."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise MoelabError(f"{flag} {path} is a file, not a folder")
    _check_parents(path, flag)


def check_out_file(path: str | Path, flag: str = "--out") -> None:
    """Refuse a file path that is a folder, or whose folder cannot be created or written."""
    path = Path(path)
    if path.is_dir():
        raise MoelabError(f"{flag} {path} is a folder: give a file name")
    _check_parents(path.parent if str(path.parent) else Path("."), flag, path)


def _check_parents(folder: Path, flag: str, target: Path | None = None) -> None:
    target = target or folder
    for parent in [folder, *folder.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise MoelabError(f"{flag} {target}: {parent} is a file, not a folder")
            if not _can_write_in(parent):
                raise MoelabError(f"{flag} {target}: {parent} is not writable")
            return


def _can_write_in(folder: Path) -> bool:
    """Try it: permission bits say nothing to root, nor about read-only or virtual file systems."""
    if not os.access(folder, os.W_OK | os.X_OK):
        return False
    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False
