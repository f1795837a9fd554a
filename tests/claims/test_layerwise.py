"""The RMoE / Closer Look row statistics on planted inputs whose answers are known, "nothing" included."""

from __future__ import annotations

import numpy as np
import pytest

from moelab.claims.heldout import two_level_bootstrap
from moelab.claims.layerwise import (
    bootstrap_stat, cross_layer_excess_T, depth_trend, diversity_LT, mantel_r2, per_sequence, top1_largest_norm,
)

T, E = 2000, 8


def softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def skewed(rng, n=T):
    return softmax(np.linspace(3.0, -3.0, E) + rng.normal(0, 1.0, (n, E)))


def test_per_sequence_sums_hand_worked():
    assert per_sequence(np.array([1.0, 2, 3, 4]), np.array([5, 5, 9, 9]), np.array([5, 9])).tolist() == [3, 7]


def test_cross_layer_excess_is_zero_for_independent_layers_and_large_for_copies():
    rng = np.random.default_rng(0)
    indep = cross_layer_excess_T(np.stack([skewed(rng), skewed(rng), skewed(rng)]), rng)
    assert abs(indep.mean()) < 0.02
    p = skewed(rng)
    copied = cross_layer_excess_T(np.stack([p, p.copy()]), rng)
    assert copied.mean() > 0.2


def test_top1_largest_norm_null_keeps_the_load():
    rng = np.random.default_rng(1)
    probs_LTE = np.stack([skewed(rng)])
    # Norms favour the same experts as the router but independently of it: the share is far above 1/E,
    # and exactly what the load-keeping null expects.
    norms_LTE = np.stack([skewed(rng)])
    same_LT, null_L = top1_largest_norm(probs_LTE, norms_LTE)
    assert same_LT.mean() > 2 / E
    assert abs(same_LT.mean() - null_L[0]) < 3 * np.sqrt(null_L[0] / T)
    same_LT, null_L = top1_largest_norm(probs_LTE, 2 * probs_LTE)
    assert same_LT.all() and null_L[0] < 0.6  # the skew alone would give about half
    uniform = np.stack([np.eye(E)[np.arange(T) % E]])  # even top-1 load: the null is 1/E
    assert top1_largest_norm(uniform, norms_LTE)[1][0] == pytest.approx(1 / E)


def test_diversity_and_depth_trend():
    assert diversity_LT(np.ones((1, 3, 6)))[0] == pytest.approx(np.zeros(3), abs=1e-6)
    assert diversity_LT(np.zeros((1, 3, 6)))[0] == pytest.approx(np.full(3, 0.5))
    assert depth_trend(np.array([0.1, 0.2, 0.3, 0.4, 0.0])) == pytest.approx(1.0)  # last layer excluded
    assert depth_trend(np.array([0.4, 0.3, 0.2, 0.1, 0.9])) == pytest.approx(-1.0)
    assert np.isnan(depth_trend(np.full(6, 0.3)))


def test_bootstrap_stat_of_a_mean_is_the_two_level_bootstrap():
    rng = np.random.default_rng(2)
    counts_S = rng.integers(5, 20, 30).astype(float)
    sums_NS = rng.normal(1.0, 0.5, (3, 30)) * counts_S
    ref = two_level_bootstrap(sums_NS, counts_S, n_boot=300, seed=4)
    got = bootstrap_stat(sums_NS[:, None, :], counts_S, lambda d: float(d[0]), n_boot=300, seed=4)
    assert got == pytest.approx(ref)


def test_depth_trend_interval_covers_nothing_and_finds_a_trend():
    rng = np.random.default_rng(3)
    counts_S = np.full(40, 10.0)
    flat = rng.normal(0.5, 0.05, (2, 6, 40)) * counts_S
    v, lo, hi = bootstrap_stat(flat, counts_S, depth_trend, n_boot=200)
    assert lo < 0 < hi
    rising = (np.linspace(0.3, 0.6, 6)[None, :, None] + rng.normal(0, 0.05, (2, 6, 40))) * counts_S
    rising[:, -1] = 0.2 * counts_S
    v, lo, hi = bootstrap_stat(rising, counts_S, depth_trend, n_boot=200)
    assert v == pytest.approx(1.0) and lo > 0.5


def test_mantel_r2_planted():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(16, 10))
    a = np.corrcoef(x)
    r2, null, sd = mantel_r2(a, a.copy(), rng)
    assert r2 == pytest.approx(1.0) and null < 0.1 and r2 > null + 10 * sd
    b = np.corrcoef(rng.normal(size=(16, 10)))  # unrelated experts: nothing to find
    r2, null, sd = mantel_r2(a, b, rng)
    assert abs(r2 - null) < 4 * sd
