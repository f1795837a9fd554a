"""The train package's modules import one way (issue 23 item 10): no circle, lazy imports included.
commands.py -> loop.py -> upcycle.py used to come back to commands.py for resolve_checkpoint."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import moelab.train

TRAIN = Path(moelab.train.__file__).parent


def train_imports(path: Path) -> set[str]:
    """Modules of moelab.train that `path` imports anywhere (top level or inside a function)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "moelab.train":
                out |= {f"moelab.train.{a.name}" for a in node.names}
            elif node.module.startswith("moelab.train."):
                out.add(node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("moelab.train.")}
    return out


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


def graph() -> dict[str, set[str]]:
    mods = {f"moelab.train.{p.stem}": p for p in TRAIN.glob("*.py") if p.stem != "__init__"}
    return {m: train_imports(p) & set(mods) for m, p in mods.items()}


def test_the_checker_finds_a_planted_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_train_modules_import_one_way():
    g = graph()
    assert "moelab.train.upcycle" in g["moelab.train.loop"] and "moelab.train.loop" in g["moelab.train.commands"]
    cycle = find_cycle(g)
    assert cycle is None, f"import circle: {' -> '.join(cycle)}"


def test_old_import_paths_still_work_and_the_parser_stays_light():
    """Other verbs import resolve_checkpoint / check_same_tokenizer from train.commands; building the CLI
    parser must still not import torch."""
    src = str(TRAIN.parent.parent)
    code = ("import sys; sys.path.insert(0, %r); import moelab.train.commands as c; "
            "assert 'torch' not in sys.modules, 'torch imported'; "
            "from moelab.train.commands import resolve_checkpoint, check_same_tokenizer; "
            "from moelab.train.rundir import resolve_checkpoint as r; "
            "from moelab.train.checkpoint import check_same_tokenizer as t; "
            "assert resolve_checkpoint is r and check_same_tokenizer is t" % src)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
