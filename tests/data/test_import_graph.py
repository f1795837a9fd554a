"""The data package's modules depend on each other one way: no import circle, lazy imports included."""

import subprocess
import sys
from pathlib import Path

import pytest

import moelab.data

sys.path.append(str(Path(__file__).resolve().parents[1]))  # tests/, for the shared import_graph helper
from import_graph import find_cycle, package_graph  # noqa: E402

DATA = Path(moelab.data.__file__).parent


def test_the_checker_finds_a_planted_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) is not None
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_data_modules_import_one_way():
    g = package_graph(moelab.data)
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
