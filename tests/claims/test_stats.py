"""The rows' own statistics on planted input: a known gap / correlation, and "nothing"."""

import numpy as np
import pytest
from scipy.stats import spearmanr

from moelab.claims.stats import excess_gap, pooled_rho, spearman_rows
from moelab.claims.verdict import Measure


def test_excess_gap_planted_and_nothing():
    tok = Measure(0.45, 0.43, 0.47, null=0.15, null_sd=0.0)
    pos = Measure(0.11, 0.10, 0.12, null=0.10, null_sd=0.0)
    g = excess_gap(tok, pos, scale=0.5)
    assert g.value == pytest.approx((0.30 - 0.01) / 0.5) and g.null == 0.0
    assert g.ci_low == pytest.approx(0.58 - np.hypot(0.02, 0.01) / 0.5)
    assert g.ci_high == pytest.approx(0.58 + np.hypot(0.02, 0.01) / 0.5)
    nothing = excess_gap(Measure(0.2, 0.18, 0.22, 0.2, 0.001), Measure(0.1, 0.09, 0.11, 0.1, 0.001))
    assert nothing.value == 0.0 and nothing.ci_low < 0 < nothing.ci_high


def test_excess_gap_matches_independent_draws():
    # Reference: percentiles of the difference of two independent normals whose 95% intervals are given.
    rng = np.random.default_rng(0)
    a = rng.normal(0.5, 0.03, 400_000)
    b = rng.normal(0.2, 0.04, 400_000)
    lo_a, hi_a = np.percentile(a, [2.5, 97.5])
    lo_b, hi_b = np.percentile(b, [2.5, 97.5])
    g = excess_gap(Measure(0.5, lo_a, hi_a, 0.0), Measure(0.2, lo_b, hi_b, 0.0))
    lo, hi = np.percentile(a - b, [2.5, 97.5])
    assert g.ci_low == pytest.approx(lo, abs=2e-3) and g.ci_high == pytest.approx(hi, abs=2e-3)


def test_spearman_rows_matches_scipy_with_ties():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 4, (5, 8)).astype(float)
    y = rng.normal(size=(5, 8))
    want = [spearmanr(a, b).statistic for a, b in zip(x, y)]
    assert np.allclose(spearman_rows(x, y), want)
    assert np.isnan(spearman_rows(np.ones((1, 8)), y[:1]))[0]


def planted(effect_per_expert, noise, ratio=False, N=3, S=120, L=2, E=8, seed=0):
    rng = np.random.default_rng(seed)
    score_E = np.arange(E, dtype=float) + 1
    count = rng.poisson(20, (N, S, L, E)).astype(float) + 1
    num = count * score_E if ratio else rng.poisson(score_E * 5, (N, S, L, E)).astype(float)
    eff_cnt = np.full((N, S, L, E), 30.0)
    eff_sum = eff_cnt * (effect_per_expert(score_E) + rng.normal(0, noise, (N, S, L, E)))
    return num, count if ratio else None, eff_sum, eff_cnt


def test_pooled_rho_planted_correlation():
    num, den, es, ec = planted(lambda s: 0.01 * s, noise=0.05)
    v, lo, hi, rho_NL = pooled_rho(num, den, es, ec, n_boot=200)
    assert rho_NL.shape == (3, 2) and v > 0.9 and lo > 0.5
    num, den, es, ec = planted(lambda s: -0.01 * s, noise=0.05, ratio=True)  # a ratio score, reversed
    v, lo, hi, _ = pooled_rho(num, den, es, ec, n_boot=200)
    assert v < -0.9 and hi < -0.5


def test_pooled_rho_nothing():
    # No expert has an effect: the ranks of the (noise) effects are unrelated to the score.
    num, den, es, ec = planted(lambda s: 0.0 * s, noise=0.05)
    v, lo, hi, _ = pooled_rho(num, den, es, ec, n_boot=200)
    assert lo < 0 < hi and hi - lo > 0.2
