"""What the row tests share: one torch thread while rows train, and the smoke workspace of the tiny-moe rows."""

import dataclasses
import math
import sys
from pathlib import Path

import pytest
import torch

from moelab.claims.verdict import VERDICTS
from moelab.claims.workspace import Scale, Workspace

# The helpers beside the tests (runner_loader, byo_models): --import-mode=importlib puts no test folder on
# sys.path, so a module importing them worked only after test_byo.py had inserted it (run alone, it failed).
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="module")
def one_torch_thread():
    # On a shared machine a second torch thread mostly spins (20x the CPU time for these toy models).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ws(tmp_path_factory, one_torch_thread):
    # One folder for the session: the tiny-moe row modules share the smoke runs and traces through the cache.
    return Workspace(tmp_path_factory.getbasetemp() / "claims-smoke-rows", dataclasses.replace(Scale.smoke(), threads=1),
                     log=lambda m: None)


def _sane_tiny_moe_row(r, name, paper):
    assert r.row == name and r.paper == paper and r.verdict in VERDICTS and r.seconds > 0
    m = r.measure
    assert all(math.isfinite(v) for v in (m.value, m.ci_low, m.ci_high, m.null))
    assert m.ci_low <= m.value <= m.ci_high
    assert "tiny-moe" in r.setup and r.claim and r.paper_number and r.measured and r.note


@pytest.fixture
def sane():
    """The checks every routing row on the base tiny-moe runs must pass (OpenMoE's and OLMoE's)."""
    return _sane_tiny_moe_row
