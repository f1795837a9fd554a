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


def test_many_targets_share_one_stream_of_flips_and_get_each_one_s_own_p():
    """sign_flip_p_many equals sign_flip_p column by column with the same seed (the same patterns), in the
    random and the enumerated regimes; a zero column has p = 1, a column with NaN is tested without it. A
    planted effect is found and a null column is not."""
    from moelab.intervene.stats import sign_flip_p_many

    rng = np.random.default_rng(3)
    for S, n_perm in ((40, 3000), (8, 2000)):  # 2^40 > 3000: random; 2^8 <= 2000: every pattern
        V = rng.normal(0.0, 1.0, (S, 7))
        V[:, 1] += 3.0  # a planted effect
        V[:, 2] = 0.0
        V[3, 4] = np.nan
        many = sign_flip_p_many(V, n_perm=n_perm, seed=5)
        alone = [sign_flip_p(V[:, m], n_perm=n_perm, seed=5) for m in range(7)]
        assert many.tolist() == alone
        assert many[2] == 1.0 and many[1] < 0.01
    assert sign_flip_p(np.array([0.3, -0.1, 0.7, 0.2]), n_perm=2000) == _exact_sign_flip([0.3, -0.1, 0.7, 0.2])


def test_an_ablation_family_is_tested_in_one_pass_with_each_target_s_p(monkeypatch):
    """ablation_results' p for each target is sign_flip_p of that target's per-sequence sums (the test
    effect_summary would run), now drawn once for the family."""
    from types import SimpleNamespace

    from moelab.intervene import study

    rng = np.random.default_rng(0)
    seq_N = np.repeat(np.arange(30), 5)
    tokens = SimpleNamespace(seq=seq_N, num_seqs=30, domain=np.zeros(150, int), lang=np.zeros(150, int))
    deltas_MN = rng.normal(0.0, 1.0, (4, 150))
    deltas_MN[0] += 0.8
    rows = study.ablation_results(tokens, deltas_MN, [(0, (e,)) for e in range(4)],
                                  {"domain": ["d"], "lang": ["l"]}, n_boot=50, seed=2, flips=2500)
    for row, d in zip(rows, deltas_MN):
        sums, counts = seq_totals(seq_N, d, 30)
        assert row["all"]["p"] == sign_flip_p(sums[counts > 0], n_perm=2500, seed=2)
    assert rows[0]["all"]["p"] < 0.01 and rows[0]["all"]["p_holm"] <= 4 * rows[0]["all"]["p"]
