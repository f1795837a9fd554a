"""The train package's modules import one way (issue 23 item 10): no circle, lazy imports included.
commands.py -> loop.py -> upcycle.py used to come back to commands.py for resolve_checkpoint."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


import moelab.train

sys.path.append(str(Path(__file__).resolve().parents[1]))  # tests/, for the shared import_graph helper
from import_graph import find_cycle, package_graph  # noqa: E402

TRAIN = Path(moelab.train.__file__).parent


def test_the_checker_finds_a_planted_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_train_modules_import_one_way():
    g = package_graph(moelab.train)
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
