"""A Closer Look's rows at toy scale through the registry, on the 8-layer linear-router models."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from moelab.claims.registry import all_rows, run_row
from moelab.claims.verdict import VERDICTS
from moelab.claims.workspace import Scale, Workspace


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return Workspace(tmp_path_factory.mktemp("closer"), dataclasses.replace(Scale.smoke(), threads=1),
                     log=lambda _: None)


def sane(result, name):
    m = result.measure
    assert result.row == name and result.paper == "A Closer Look" and result.seeds == 2
    assert math.isfinite(m.value) and m.ci_low <= m.value <= m.ci_high and math.isfinite(m.null)
    assert result.verdict in VERDICTS and "Linear-router" in result.setup


def test_norm_preference(ws):
    r = run_row(all_rows()["closer-norm-preference"], ws)
    sane(r, "closer-norm-preference")
    d = r.details
    table = np.array(d["rank_table"])
    assert table.shape == (16, 16) and np.allclose(table.sum(axis=1), 1.0, atol=1e-3)  # rounded to 4 places
    assert len(d["share_per_layer"]) == 8 and len(d["per_seed_per_layer"]) == 2
    assert r.measure.value == pytest.approx(np.mean(d["share_per_layer"]))
    assert table[0, 0] == pytest.approx(r.measure.value, abs=1e-3)  # top-1 row, largest-norm column
    assert 0 < r.measure.null < 1 and r.test.margin == pytest.approx(1 / 16)


def test_neurons_fine_grained(ws):
    r = run_row(all_rows()["closer-neurons-fine-grained"], ws)
    sane(r, "closer-neurons-fine-grained")
    r2 = np.array(r.details["gate_r2_per_seed_per_layer"])
    assert r2.shape == (2, 8) and ((r2 >= 0) & (r2 <= 1)).all()
    assert r.measure.value == pytest.approx(r2.mean(), abs=1e-3)
    assert r.measure.null > 0 and r.measure.null_sd > 0


def test_diversity_depth(ws):
    r = run_row(all_rows()["closer-diversity-depth"], ws)
    sane(r, "closer-diversity-depth")
    d = r.details
    assert len(d["diversity_per_layer"]) == 8 and np.array(d["per_seed_per_layer"]).shape == (2, 8)
    assert all(0 <= v <= 1 for v in d["diversity_per_layer"])
    assert -1 <= r.measure.value <= 1 and r.measure.null == 0.0
    last = d["last_layer_minus_previous"]
    assert last["value"] == pytest.approx(d["diversity_per_layer"][-1] - d["diversity_per_layer"][-2], abs=1e-9)
