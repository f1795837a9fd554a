"""What a cached artefact is made of, by content: files' bytes, preset contents and the code that made it.

The claims cache keyed on paths and preset names: after a run was retrained with other settings at the
same path, the trace of the old model was served. A key here is a hash of what the result depends on:
a checkpoint's or corpus's files, the preset's resolved contents, and the source of the moelab packages
that compute it (a changed analysis rebuilds its reports; a changed docstring elsewhere does not).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

SRC = Path(__file__).resolve().parents[1]  # src/moelab
SKIP_SUFFIXES = (".lock",)


def tree_hash(path: str | Path, skip: tuple[str, ...] = ("claims-settings.json",)) -> str:
    """sha256 over a file, or over a folder's files (relative path and bytes, in sorted order)."""
    path = Path(path)
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        if f.name in skip or f.name.endswith(SKIP_SUFFIXES) or "__pycache__" in f.parts:
            continue
        h.update(str(f.relative_to(path) if f != path else f.name).encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        h.update(b"\0")
    return h.hexdigest()[:20]


def code_version(*packages: str) -> dict[str, str]:
    """The hash of each moelab package's source (.py files) that a cached result depends on."""
    out = {}
    for pkg in packages:
        where = SRC / pkg
        files = [where.with_suffix(".py")] if not where.is_dir() else sorted(where.rglob("*.py"))
        h = hashlib.sha256()
        for f in files:
            h.update(f.name.encode() + b"\0" + f.read_bytes())
        out[pkg] = h.hexdigest()[:16]
    return out


def preset_contents(preset: str) -> dict:
    """The preset's resolved table (what its name stood for when the run was made)."""
    from moelab.presets import load_preset_dict

    return load_preset_dict(preset)
