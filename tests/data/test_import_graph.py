"""The data package's modules depend on each other one way: no import circle, lazy imports included."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import moelab.data

DATA = Path(moelab.data.__file__).parent


def data_imports(path: Path) -> set[str]:
    """Modules of moelab.data that `path` imports anywhere (top level or inside a function)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "moelab.data":
                out |= {f"moelab.data.{a.name}" for a in node.names}
            elif node.module.startswith("moelab.data."):
                out.add(node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("moelab.data.")}
    return out


def graph() -> dict[str, set[str]]:
    mods = {f"moelab.data.{p.stem}": p for p in DATA.glob("*.py") if p.stem != "__init__"}
    return {m: data_imports(p) & set(mods) for m, p in mods.items()}


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m, path):
        state[m] = 1
        for n in sorted(g[m]):
            if state.get(n) == 1:
                return path[path.index(n):] + [m, n] if n in path else [m, n]
            if n not in state:
                found = visit(n, path + [m])
                if found:
                    return found
        state[m] = 2
        return None

    for m in sorted(g):
        if m not in state:
            found = visit(m, [])
            if found:
                return found
    return None


def test_the_checker_finds_a_planted_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) is not None
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_data_modules_import_one_way():
    g = graph()
    assert "moelab.data.document" in g["moelab.data.installed"]
    assert "moelab.data.batch" in g["moelab.data.ul2"]
    assert find_cycle(g) is None, f"import circle: {' -> '.join(find_cycle(g))}"


@pytest.mark.parametrize("order", [("installed", "sources"), ("sources", "installed"),
                                   ("objectives", "ul2"), ("ul2", "objectives")])
def test_fresh_interpreter_imports_in_either_order(order):
    code = "; ".join(f"import moelab.data.{m}" for m in order)
    src = str(DATA.parent.parent)
    done = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {src!r}); {code}"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
