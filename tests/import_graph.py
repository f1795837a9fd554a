"""The import graph of one moelab package, read from its source with `ast` (lazy imports included), and a
circle finder over it: shared by the packages' one-way import tests."""

from __future__ import annotations

import ast
from pathlib import Path
from types import ModuleType


def package_imports(path: Path, package: str) -> set[str]:
    """Modules of `package` that `path` imports anywhere (top level or inside a function)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == package:
                out |= {f"{package}.{a.name}" for a in node.names}
            elif node.module.startswith(package + "."):
                out.add(node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith(package + ".")}
    return out


def package_graph(package: ModuleType) -> dict[str, set[str]]:
    """Each module of the package -> the package's modules it imports."""
    folder = Path(package.__file__).parent
    mods = {f"{package.__name__}.{p.stem}": p for p in folder.glob("*.py") if p.stem != "__init__"}
    return {m: package_imports(p, package.__name__) & set(mods) for m, p in mods.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as a path that returns to its start, or None (depth-first, iterative)."""
    done: set[str] = set()
    for root in sorted(graph):
        stack, path = [(root, iter(sorted(graph[root])))], [root]
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                done.add(node)
                stack.pop()
                path.pop()
            elif child in path:
                return path[path.index(child):] + [child]
            elif child not in done and child in graph:
                stack.append((child, iter(sorted(graph[child]))))
                path.append(child)
    return None
