"""What a cached artefact is made of, by content: files' bytes, preset contents and the code that made it.

The claims cache keyed on paths and preset names: after a run was retrained with other settings at the
same path, the trace of the old model was served. A key here is a hash of what the result depends on:
a checkpoint's or corpus's files, the preset's resolved contents, and the source of the moelab modules
that compute it: `code_closure` follows the moelab imports of the entry modules (function-level imports
included) to every module they can reach, so a dependency no one listed by hand still rebuilds what it
feeds (a changed analysis rebuilds its reports; a changed docstring in an unrelated module does not).
"""

from __future__ import annotations

import functools
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


def _module_file(name: str) -> Path | None:
    """src/moelab/a/b.py or src/moelab/a/b/__init__.py for "moelab.a.b"; None when neither exists."""
    parts = name.split(".")[1:]
    base = SRC.joinpath(*parts) if parts else SRC
    for f in (base.with_suffix(".py"), base / "__init__.py"):
        if f.is_file():
            return f
    return None


def _moelab_imports(path: Path, name: str) -> set[str]:
    """The moelab modules `path` (module `name`) imports anywhere in its body, relative imports resolved."""
    import ast

    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "moelab"}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")
                up = up[:len(up) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            if base.split(".")[0] != "moelab":
                continue
            out.add(base)
            out |= {f"{base}.{a.name}" for a in node.names}  # `from pkg import module` names a module
    return out


def code_closure(*modules: str) -> str:
    """A hash of the source of `modules` and of every moelab module they import, transitively (parents'
    __init__ files too), each by its path: what a cached artefact made by those modules depends on."""
    h = hashlib.sha256()
    for f in closure_files(*modules):
        h.update(str(f.relative_to(SRC)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def closure_files(*modules: str) -> list[Path]:
    """The source files `code_closure` hashes, sorted (parsed once per process and source folder)."""
    return list(_closure(tuple(sorted(modules)), str(SRC)))


@functools.lru_cache(maxsize=None)
def _closure(modules: tuple[str, ...], src: str) -> tuple[Path, ...]:
    seen: dict[str, Path] = {}
    todo = list(modules)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        f = _module_file(name)
        if f is None:
            continue  # a name imported from a module (a function), not a module
        seen[name] = f
        parents = [".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)]
        todo += parents + sorted(_moelab_imports(f, name))
    return tuple(sorted(set(seen.values())))


def preset_contents(preset: str) -> dict:
    """The preset's resolved table (what its name stood for when the run was made)."""
    from moelab.presets import load_preset_dict

    return load_preset_dict(preset)
