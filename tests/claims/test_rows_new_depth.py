"""rmoe-depth-scan's statistic on planted gaps: a gap that grows per doubling of depth is recovered, and a
constant advantage (GRU better by the same at every depth, different per seed) sits at the null."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from moelab.claims.registry import all_rows
from moelab.claims.rmoe8 import GRU, MODEL
from moelab.claims.rows_depth import (DEPTHS, depth_overrides, depth_run, depth_slope, gap_nats, margin_of,
                                      settled_everywhere)
from moelab.claims.seeds import t_interval
from moelab.claims.verdict import REPRODUCED, Claim, Measure, Precondition, verdict


def test_slope_recovers_a_planted_growth_per_doubling():
    rng = np.random.default_rng(0)
    slope, margin = 0.03, margin_of(4.0, DEPTHS)
    assert slope > 2 * margin
    per_seed = [depth_slope(DEPTHS, -0.05 + slope * np.log2(DEPTHS) + 0.002 * rng.standard_normal(len(DEPTHS)))
                for _ in range(3)]
    mean, lo, hi = t_interval(per_seed)
    assert mean == pytest.approx(slope, abs=0.003)
    assert verdict(Measure(mean, lo, hi, 0.0), Claim("greater", margin))[0] == REPRODUCED


def test_constant_advantage_is_the_null():
    # GRU better by a seed's own amount at every depth: a level, not a trend.
    per_seed = [depth_slope(DEPTHS, np.full(len(DEPTHS), level)) for level in (0.03, 0.08, 0.01)]
    assert per_seed == pytest.approx([0.0, 0.0, 0.0], abs=1e-12)
    rng = np.random.default_rng(1)
    noisy = [depth_slope(DEPTHS, level + 0.004 * rng.standard_normal(len(DEPTHS))) for level in (0.03, 0.08, 0.01)]
    mean, lo, hi = t_interval(noisy)
    assert lo < 0 < hi
    assert verdict(Measure(mean, lo, hi, 0.0), Claim("greater", margin_of(4.0, DEPTHS)))[0] != REPRODUCED


def test_slope_by_hand_and_gap_is_token_weighted():
    # x = 1, 2, 3 (log2 of 2, 4, 8); y = 0, 1, 5: slope = sum((x - 2)(y - 2)) / sum((x - 2)^2) = 5 / 2
    assert depth_slope((2, 4, 8), (0.0, 1.0, 5.0)) == pytest.approx(2.5)
    assert np.isnan(depth_slope((2, 4, 8), (0.0, np.nan, 1.0)))
    # two sequences: 10 and 30 tokens, worse by 1 and 3 nats in total: 4 / 40 per token
    assert gap_nats(np.array([11.0, 33.0]), np.array([10.0, 30.0]), np.array([10.0, 30.0])) == pytest.approx(0.1)


def test_margin_is_half_the_papers_gain_over_the_scan():
    # 1 - 1.116 / 1.128 relative, half of it, at loss 4, spread over log2(8 / 2) = 2 doublings
    assert margin_of(4.0, (2, 4, 8)) == pytest.approx((1 - 1.116 / 1.128) / 2 * 4.0 / 2)


def test_depths_change_only_the_number_of_blocks_and_reuse_the_8_layer_runs():
    assert len(DEPTHS) >= 3 and 8 in DEPTHS
    for d in DEPTHS:
        o = depth_overrides(d)
        assert [x for x in o if x.startswith("model.n_layers=")] == [f"model.n_layers={d}"]
        assert [x for x in o if not x.startswith("model.n_layers=")] == [x for x in MODEL
                                                                          if not x.startswith("model.n_layers=")]

    class Recorder:  # stands in for the workspace: records what would be trained
        def __init__(self):
            self.calls = []

        def run(self, name, preset, overrides=(), seed=0, **_):
            self.calls.append((name, preset, list(overrides), seed))
            return Path(name)

    ws = Recorder()
    depth_run(ws, "gru", 1, 8), depth_run(ws, "gru", 1, 2)
    (n8, p8, o8, s8), (n2, p2, o2, s2) = ws.calls
    assert n8 == "rmoe8-gru-s1" and n2 == "rmoe2-gru-s1" and p8 == p2 == "tiny-rmoe" and s8 == s2 == 1
    assert o8 == [*MODEL, *GRU] and o2 == [*depth_overrides(2), *GRU]


def test_unsettled_at_one_depth_is_not_testable():
    ok, moving = Precondition("settled", "slope 0", True), Precondition("settled", "slope -1", False)
    assert settled_everywhere({2: ok, 4: ok, 8: ok}).met
    p = settled_everywhere({2: ok, 4: moving, 8: ok})
    assert not p.met and "depth 4: slope -1" in p.measured


def test_registered():
    assert all_rows()["rmoe-depth-scan"].paper == "RMoE"
