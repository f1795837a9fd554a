"""Hand-worked tiny inputs for each formula: the numbers in the comments are worked out by hand."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from moelab.analysis import (
    coactivation, drop_profile, dynamic_analysis, expert_capacity, expert_label_mi, expert_load, gate_stats,
    share_tables, simulate_drops, top_tokens,
)
from moelab.analysis.dynamic import rank_table
from moelab.analysis.null import mutual_information, permutation_mi, random_topk_counts
from moelab.analysis.weights import count_inversions, kendall_tau

IDS_TK = np.array([[0, 1], [0, 2], [0, 1]])


def test_load_hand_worked(make_batch):
    dropped = np.array([[[False, False], [False, True], [False, False]]])
    probs = np.array([[[0.25] * 4, [1.0, 0, 0, 0], [0.25] * 4]])
    res = expert_load(make_batch(IDS_TK[None], dropped_LTK=dropped, probs_LTE=probs), [4], 2)
    assert res.routed[0].tolist() == [3, 2, 1, 0]
    assert res.kept[0].tolist() == [3, 2, 0, 0]
    assert res.tokens == [3]
    assert res.max_over_mean[0] == pytest.approx(2.0)  # 3 / (6 / 4)
    assert res.dead_experts == [[3]]
    assert res.dropped_share[0] == pytest.approx(1 / 6)
    assert res.router_entropy[0] == pytest.approx(2 * np.log(4) / 3)  # two uniform tokens, one certain
    assert res.null_router_entropy[0] == pytest.approx(np.log(4))


def test_coactivation_and_transitions_hand_worked(make_batch):
    ids = np.stack([IDS_TK, np.array([[2, 0], [2, 1], [3, 0]])])
    res = coactivation(make_batch(ids), [4, 4], 2)
    p = res.p_j_given_i[0]
    assert p[0, 1] == pytest.approx(2 / 3) and p[0, 2] == pytest.approx(1 / 3) and p[1, 0] == 1.0
    assert np.isnan(p[3]).all()  # expert 3 never chosen at layer 0
    assert res.uniform_p[0] == pytest.approx(1 / 3)  # (k - 1) / (E - 1), the uniform-routing reference
    assert res.transitions[0][0, 2] == 2 and res.transitions[0][0, 3] == 1 and res.transitions[0].sum() == 3
    assert res.transition_p[0][0] == pytest.approx([0, 0, 2 / 3, 1 / 3])
    assert res.transition_mi[0] == pytest.approx(0.0)  # layer 0's top-1 is always 0: nothing to share
    ids[0, 2] = [1, 0]  # now layer 0's top-1 (0, 0, 1) determines layer 1's (2, 2, 3)
    h = -(2 / 3 * np.log(2 / 3) + 1 / 3 * np.log(1 / 3))
    assert coactivation(make_batch(ids), [4, 4], 2).transition_mi[0] == pytest.approx(h)


def test_gate_balances_and_entropy(make_batch):
    prob = np.array([[[0.6, 0.3], [0.5, 0.25]]])
    probs = np.array([[[0.6, 0.3, 0.1, 0.0], [0.25, 0.25, 0.25, 0.25]]])
    res = gate_stats(make_batch(np.array([[[0, 1], [2, 3]]]), prob_LTK=prob, probs_LTE=probs), [4], 2)
    assert res.inner_balance_median == pytest.approx([2.0])
    assert res.outer_balance_median == pytest.approx([0.825])
    h0 = -(0.6 * np.log(0.6) + 0.3 * np.log(0.3) + 0.1 * np.log(0.1))
    assert res.gate_entropy_mean == pytest.approx([(h0 + np.log(4)) / 2])
    assert res.null_outer_balance == [0.5]


def test_rank_table_and_top1_norm():
    c = rank_table(np.array([[0.5, 0.3, 0.2]]), np.array([[1.0, 3.0, 2.0]]))
    assert c.tolist() == [[0, 0, 1], [1, 0, 0], [0, 1, 0]]  # score ranks 0,1,2 vs norm ranks 2,0,1
    batch = {"layer": np.zeros(2, np.int16), "rank": np.zeros(2, np.int8),
             "probs": np.array([[0.7, 0.3], [0.2, 0.8]], np.float32),
             "expert_norms": np.array([[2.0, 1.0], [3.0, 1.0]], np.float32),
             "expert_density": np.array([[0.5, 0.7], [0.3, 0.5]], np.float32)}
    res = dynamic_analysis(batch, [2])
    assert res.top1_is_largest_norm == [0.5] and res.null_top1_is_largest_norm == [0.5]
    assert res.density[0] == pytest.approx([0.4, 0.6]) and res.mean_density == pytest.approx([0.5])
    assert res.mean_cosine is None  # no expert_cos column: that part is absent, not zero


def test_capacity_formulas():
    assert expert_capacity(12, 4, 2, 1.0) == 6       # floor(2 * 12 / 4)
    assert expert_capacity(11, 4, 2, 1.0) == 6       # floor(5.5) = 5, odd -> 6
    assert expert_capacity(10, 4, 2, 1.25) == 6      # floor(6.25)
    assert expert_capacity(2, 4, 2, 1.0) == 4        # at least 4
    assert expert_capacity(0, 32, 2, 1.25, formula="group", group_size=4096) == 160
    assert expert_capacity(0, 6, 2, 1.0, formula="group", group_size=8) == 4  # round(1.33) = 1 -> 4
    assert expert_capacity(0, 4, 2, 1.0, formula="group", group_size=10, min_capacity=0) == 2  # 2.5 -> 2


def test_simulate_drops_per_batch_uses_each_batch_capacity():
    ids = np.zeros((12, 1), np.int64)  # every token wants expert 0; E = 2, cf 1: capacity max(floor(N/2), 4)
    one = simulate_drops(ids, np.ones((12, 1)), 2, 1.0)
    assert one.sum() == 6  # capacity 6 over 12 tokens: the last 6 drop
    two = simulate_drops(ids, np.ones((12, 1)), 2, 1.0, batch_T=np.repeat([0, 1], 6))
    assert two.sum() == 4 and two[4:6].all() and two[10:12].all()  # capacity 4 per batch of 6


def test_drop_profile_by_position_and_turn(make_batch):
    ids = np.zeros((1, 4, 1), np.int64)
    dropped = np.array([[[False], [False], [True], [True]]])
    batch = make_batch(ids, dropped_LTK=dropped, turn_T=[0, 0, 1, 1])
    res = drop_profile(batch, [2], 1, bucket_size=2)
    assert res.share_B.tolist() == [0.0, 1.0] and res.overall == 0.5
    assert res.turns.tolist() == [0, 1] and res.share_by_turn.tolist() == [0.0, 1.0]
    sim = drop_profile(batch, [2], 1, bucket_size=2, simulate=dict(capacity_factor=0.5, batch_seqs=1,
                                                                   min_capacity=3))
    assert sim.share_B.tolist() == [0.0, 0.5]  # capacity 3: only the fourth token drops


def test_mutual_information_and_permutation_null():
    assert mutual_information(np.array([[10, 0], [0, 10]])) == pytest.approx(np.log(2))
    assert mutual_information(np.array([[5, 5], [5, 5]])) == pytest.approx(0.0)
    null = permutation_mi(np.array([[10, 0], [0, 10]]), 50, seed=0)
    assert null.mean() < 0.2 and (null >= 0).all()
    np.testing.assert_array_equal(null, permutation_mi(np.array([[10, 0], [0, 10]]), 50, seed=0))  # seeded


def test_expert_label_mi_from_tables(make_batch):
    ids = np.array([[[0, 1], [0, 1], [2, 3], [2, 3]]])
    batch = make_batch(ids, domain_T=["a", "a", "b", "b"])
    res = expert_label_mi(share_tables(batch, "domain", [4], 2, ranks="top1"), n_permutations=8)
    assert res.mi == pytest.approx([np.log(2)]) and res.normalised == pytest.approx([1.0])


def test_top_tokens_by_count_and_lift(make_batch):
    ids = np.array([[[0], [0], [0], [1], [1], [1], [1], [1]]])
    tables = share_tables(make_batch(ids, tokens_T=[7, 7, 8, 8, 8, 9, 9, 9]), "token", [2], 1)
    res = top_tokens(tables, n=2, min_count=1)
    assert res.by_count[0][1].tolist() == [9, 8] and res.counts[0][1].tolist() == [3, 2]
    assert res.by_lift[0][0][0] == 7  # all of token 7 went to expert 0: lift (2/3) / (2/8) = 8/3
    assert res.lift[0][0][0] == pytest.approx(8 / 3)


def test_random_topk_counts_is_uniform_and_distinct():
    counts = random_topk_counts(np.array([1000, 1]), 4, 2, seed=0)
    assert counts.sum(axis=1).tolist() == [2000, 2]
    assert counts[1].max() == 1  # a token's k experts are distinct
    assert np.abs(counts[0] / 1000 - 0.5).max() < 0.06


@pytest.mark.parametrize("E,k", [(5, 3), (6, 2), (4, 1), (4, 4), (7, 6)])
def test_uniform_sets_draw_every_k_subset_equally_often(E, k):
    from collections import Counter
    from itertools import combinations

    from scipy.stats import chisquare

    from moelab.analysis.null import uniform_sets

    picks = uniform_sets(60_000, E, k, np.random.default_rng(E * 10 + k))
    subsets = [tuple(sorted(r)) for r in picks.tolist()]
    assert all(len(set(s)) == k and 0 <= s[0] and s[-1] < E for s in subsets)
    drawn = Counter(subsets)
    seen = np.array([drawn[c] for c in combinations(range(E), k)])
    assert seen.sum() == len(subsets)  # every draw is one of the C(E, k) subsets
    assert len(seen) == 1 or chisquare(seen).pvalue > 1e-3


def test_kendall_tau_and_inversions():
    assert kendall_tau(np.arange(5)) == 1.0 and kendall_tau(np.arange(5)[::-1]) == -1.0
    assert kendall_tau(np.array([1, 0, 2])) == pytest.approx(1 / 3)  # one discordant pair of three
    rng = np.random.default_rng(0)
    for n in (1, 2, 3, 7, 16, 33, 100):
        a = rng.integers(0, 10, n)
        brute = sum(a[i] > a[j] for i, j in itertools.combinations(range(n), 2))
        assert count_inversions(a) == brute


def test_stable_top_is_the_stable_argsort():
    from moelab.analysis.specialization import stable_top

    rng = np.random.default_rng(0)
    for trial in range(300):  # few distinct values: ties at the n-th place in most columns
        G, E, n = int(rng.integers(1, 60)), int(rng.integers(1, 5)), int(rng.integers(1, 12))
        v = rng.integers(0, 4, (G, E)).astype(float)
        if trial % 3 == 0:
            v[rng.random((G, E)) < 0.3] = -np.inf  # lifts of tokens under min_count
        if trial % 7 == 0:
            v[rng.random((G, E)) < 0.2] = np.inf
        if trial % 11 == 0:
            v[0, 0] = np.nan
        want = np.argsort(-v, axis=0, kind="stable")[:n].T
        assert np.array_equal(stable_top(v, n), want), trial
