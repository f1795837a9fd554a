"""Intervals, tests and rank correlation against hand-worked answers and planted effects."""

import itertools

import numpy as np
from scipy import stats as sps

from moelab.intervene.stats import bootstrap_mean, holm, seq_totals, sign_flip_p, spearman


def test_holm_matches_the_hand_worked_step_down():
    p = np.array([0.01, 0.04, 0.03, 0.005])
    # sorted: 0.005*4=0.02, 0.01*3=0.03, 0.03*2=0.06, 0.04*1=0.04 -> monotone 0.06
    np.testing.assert_allclose(holm(p), [0.03, 0.06, 0.06, 0.02])
    assert holm(np.array([0.9, 0.8]))[0] == 1.0


def test_bootstrap_interval_covers_a_planted_mean_and_is_a_point_for_constant_data():
    rng = np.random.default_rng(0)
    seq = np.repeat(np.arange(200), 30)
    vals = 0.5 + rng.normal(0, 1, 200)[seq] + rng.normal(0, 1, len(seq))
    mean, lo, hi = bootstrap_mean(*seq_totals(seq, vals, 200), n_boot=500)
    assert lo < 0.5 < hi and lo < mean < hi and hi - lo < 0.6
    assert bootstrap_mean(*seq_totals(seq, np.full(len(seq), 2.0), 200)) == (2.0, 2.0, 2.0)


def test_sign_flip_finds_a_planted_shift_and_not_noise():
    rng = np.random.default_rng(1)
    assert sign_flip_p(rng.normal(0.5, 1, 100)) < 0.01
    assert sign_flip_p(rng.normal(0.0, 1, 100)) > 0.05
    assert sign_flip_p(np.zeros(50)) == 1.0
    tiny = np.array([1.0, 2.0, 3.0])  # all 8 sign patterns: |mean| >= 2 only for all + or all -
    exact = 2 / 8
    assert abs(sign_flip_p(tiny, n_perm=20000) - exact) < 0.02


def test_spearman_matches_scipy_with_ties():
    rng = np.random.default_rng(2)
    for a, b in itertools.islice(((rng.integers(0, 4, 12), rng.normal(size=12)) for _ in range(5)), 5):
        assert abs(spearman(a, b) - sps.spearmanr(a, b).statistic) < 1e-12
    assert np.isnan(spearman(np.ones(5), np.arange(5)))
