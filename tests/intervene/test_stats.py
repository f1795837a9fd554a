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


def _exact_sign_flip(values):
    """Every sign pattern, by a plain loop: the share whose |sum| reaches the observed one."""
    obs = abs(sum(values))
    pats = list(itertools.product((-1.0, 1.0), repeat=len(values)))
    return sum(abs(sum(s * v for s, v in zip(p, values))) >= obs * (1 - 1e-12) for p in pats) / len(pats)


def test_few_sequences_get_the_exact_test():
    vals = np.array([0.3, -0.1, 0.7, 0.2, 0.05, 0.4, -0.2, 0.9])
    assert sign_flip_p(vals, n_perm=2000) == _exact_sign_flip(vals)  # 256 patterns <= 2000: enumerated
    assert sign_flip_p(np.zeros(4), n_perm=2000) == 1.0


def test_flips_sized_for_the_family_lift_the_holm_floor():
    from moelab.intervene.stats import flips_for_family

    # 200 ablations, each a strong planted effect over 60 sequences: with 2000 flips the smallest Holm p
    # would be 200/2001 = 0.0999 and nothing could be significant.
    n = flips_for_family(200)
    assert n >= 20 * 200 / 0.05 and 200 / (n + 1) <= 0.05 / 20
    rng = np.random.default_rng(3)
    p = np.array([sign_flip_p(rng.normal(1.0, 0.3, 60), n_perm=n, seed=m) for m in range(200)])
    assert holm(p).max() < 0.05
    noise = np.array([sign_flip_p(rng.normal(0.0, 1.0, 60), n_perm=n, seed=m) for m in range(200)])
    assert holm(noise).min() > 0.05  # the 'nothing' case stays non-significant
