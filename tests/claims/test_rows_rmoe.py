"""The RMoE rows at toy scale through the registry: real training, sane results, details of the right shape."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from moelab.claims.registry import all_rows, run_row
from moelab.claims.workspace import Scale, Workspace

ROWS = ("rmoe-beats-linear", "rmoe-np-ablation", "rmoe-detach-ablation", "rmoe-cross-layer-mi")


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    # One thread: the toy models are too small for a second one to pay for its synchronisation.
    return Workspace(tmp_path_factory.mktemp("rmoe"), dataclasses.replace(Scale.smoke(), threads=1),
                     log=lambda _: None)


def sane(result, name):
    m = result.measure
    assert result.row == name and result.paper == "RMoE"
    assert math.isfinite(m.value) and m.ci_low <= m.value <= m.ci_high and m.null == 0.0
    assert result.verdict == "too few seeds" and result.reason  # smoke trains 2 seeds
    assert "8 blocks (MoE every 1), top-2 of 16" in result.setup and "shared" in result.setup
    assert result.seconds > 0 and result.seeds == 2


@pytest.mark.parametrize("name", ROWS[:3])
def test_loss_rows(ws, name):
    result = run_row(all_rows()[name], ws)
    sane(result, name)
    d = result.details
    assert len(d["per_seed"]) == 2 and d["sequences"] > 1 and d["gru_loss"] > 0
    assert result.test.margin > 0 and result.unit == " nats"
    worse = "linear" if name == "rmoe-beats-linear" else name.split("-")[1]
    assert [g["step"] for g in d["train_loss_gap"]] == [1, 3, 4, 6]  # quarters of the 6 toy steps
    assert result.precondition is not None and "slope" in result.precondition.needs  # measured, stored
    assert result.to_json()["precondition"]["needs"] == result.precondition.needs
    per_seed_gap = sum(s[worse] - s["gru"] for s in d["per_seed"]) / 2
    assert per_seed_gap == pytest.approx(result.measure.value, rel=1e-6, abs=1e-9)


def test_cross_layer_mi_row(ws):
    result = run_row(all_rows()["rmoe-cross-layer-mi"], ws)
    sane(result, "rmoe-cross-layer-mi")
    each = result.details["per_router"]
    assert set(each) == {"gru", "linear"}
    assert result.details["excess_gap_nats"]["value"] == pytest.approx(
        each["gru"]["excess"] - each["linear"]["excess"], abs=1e-9)
    seeds = result.details["per_seed"]
    assert len(seeds) == 2
    check = result.details["analysis_seed0"]
    # The paper's binned MI, per seed, from moelab analyze's own cross_layer_mi: seed 0 is the cross-check's.
    assert seeds[0]["gru_mi"] == check["gru"]["mi"] and seeds[0]["linear_mi"] == check["linear"]["mi"]
    assert result.seed_values == pytest.approx([s["gru_mi"] / s["linear_mi"] - 1 for s in seeds])
    assert result.measure.value == pytest.approx(np.mean(result.seed_values)) and result.test.margin == 0.1
    assert set(check["gru"]) == {"mi", "null"} and all(math.isfinite(v) for v in check["linear"].values())
