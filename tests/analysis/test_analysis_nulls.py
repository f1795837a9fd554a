"""Nulls that keep the margins, the queue-only drop baseline and bootstrap intervals, on planted traces
whose answer is known: skewed load that depends on nothing sits at every null; token-, position- and
late-shift routing sit far outside."""

from __future__ import annotations

import numpy as np
import pytest

from moelab.analysis import analyze_all, early_routing
from moelab.analysis.coactivation import coactivation_counts
from moelab.analysis.resample import (
    draw_sets, estimate, fit_load_weights, fold_of, permuted_tables, replicate_weights,
)
from moelab.analysis.synthetic import planted_batches, skewed_load

E, K, L = 8, 2, 2
ARGS = dict(num_seqs=48, seq_len=128, num_layers=L, num_experts=E, top_k=K, vocab=40, seqs_per_batch=8)
SPEC = ("std_token", "std_position", "vocab", "domain_specialisation:domain", "mi:domain")


def run(rule, seed=1, **kw):
    batches = list(planted_batches(rule=rule, seed=seed, **ARGS))
    return analyze_all(batches, num_experts=[E] * L, top_k=K, min_count=20, n_permutations=32,
                       analyses=("load", "specialisation", "coactivation"), **kw)


@pytest.fixture(scope="module")
def by_rule():
    return {rule: run(rule) for rule in ("skewed", "token", "position")}


def at_null(est, width=4.0):
    return abs(est.value - est.null_mean) <= width * est.null_sd + 1e-12


def test_skewed_load_that_depends_on_nothing_sits_at_every_null(by_rule):
    r = by_rule["skewed"]
    for name in SPEC:
        for est in r[name].estimates + [r[name].overall]:
            assert at_null(est), (name, est)
    assert at_null(r["coactivation"].strongest_overall)
    # ... where the uniform-routing references would have called it specialised
    assert r["std_token"].overall.value > 3 * np.nanmean(r["std_token"].uniform_mean)
    assert r["vocab"].overall.value > 0.3 + np.nanmean(r["vocab"].uniform_rescaled)
    assert r["coactivation"].strongest_overall.value > 2 * r["coactivation"].uniform_p[0]


def test_token_and_position_routing_sit_far_outside_their_nulls(by_rule):
    tok, pos = by_rule["token"], by_rule["position"]
    for est in (tok["std_token"].overall, tok["vocab"].overall, pos["std_position"].overall):
        assert est.z > 20 and est.p == pytest.approx(1 / 33)  # no permutation reaches it
        assert est.ci_low > est.null_mean + 10 * est.null_sd
    assert at_null(tok["std_position"].overall) and at_null(pos["vocab"].overall)


def test_intervals_contain_the_value_and_match_the_spread_over_fresh_traces():
    values, half_widths = [], []
    for seed in range(8):
        est = run("skewed", seed=seed, n_bootstrap=48)["vocab"].overall
        assert est.ci_low <= est.value <= est.ci_high and est.n_bootstrap == 48
        values.append(est.value)
        half_widths.append((est.ci_high - est.ci_low) / 2)
    # a 95% half-width is ~1.96 sd: the bootstrap's sd against the sd over independent traces
    ratio = np.mean(half_widths) / 1.96 / np.std(values, ddof=1)
    assert 0.5 < ratio < 2.0


def test_early_routing_nulls_are_unrelated_checkpoints_with_their_own_load():
    final = list(planted_batches(rule="skewed", seed=1, **ARGS))
    other = [dict(b, expert=o["expert"]) for b, o in zip(final, planted_batches(rule="skewed", seed=2, **ARGS))]
    res = early_routing([other, final, final], num_experts=[E] * L, top_k=K, min_count=20, steps=[1, 2])
    for name in ("top1", "overlap", "jsd"):
        assert at_null(res.first[name]), name
    assert res.first["top1"].value > 1.5 * res.uniform_top1[0]  # uniform routing is not the chance level here
    assert (res.top1_agreement[1] == 1.0).all() and (res.jsd[1] < 0.1 * res.null_jsd[1]).all()


def test_iid_routing_drop_rise_is_all_queue_and_a_late_shift_is_not():
    def queue(rule):
        batches = planted_batches(rule=rule, seed=1, capacity_factor=1.0, **dict(ARGS, num_seqs=64))
        return analyze_all(batches, num_experts=[E] * L, top_k=K, pos_bucket=16, analyses=("drops",),
                           queue=dict(capacity_factor=1.0, batch_seqs=ARGS["seqs_per_batch"]))["queue:trained"]

    for rule in ("uniform", "skewed"):
        q = queue(rule)
        assert q.observed_rise.value > 0.01  # the queue alone drops late tokens more ...
        assert q.excess.ci_low <= 0 <= q.excess.ci_high  # ... and explains all of it
        assert 0.7 < q.explained < 1.3
    late = queue("late")
    assert late.excess.ci_low > 0.03 and late.explained < 0.6


def test_permuted_tables_keep_group_sizes_and_load():
    rng = np.random.default_rng(0)
    pool = draw_sets(np.log(skewed_load(E)), K, 500, rng)
    n_G = np.array([200, 100, 150, 50])
    used, n_used, tables = permuted_tables(n_G, pool, True, E, 5, seed=3)
    assert (n_used == n_G).all()
    load = np.bincount(pool.reshape(-1), minlength=E)
    for t in tables:  # every token once: rows are the group sizes, columns the pool's load
        assert (t.sum(axis=1) == K * n_G).all() and (t.sum(axis=0) == load).all()
    assert not all((t == tables[0]).all() for t in tables[1:])
    used, n_used, tables = permuted_tables(np.array([400, 300]), pool, True, E, 2, seed=3, max_tokens=250)
    assert len(used) == 1 and n_used[0] == 250 and tables[0].sum() == 250 * K  # one big group, capped


def test_fitted_load_weights_reproduce_the_load():
    rng = np.random.default_rng(1)
    load = skewed_load(E) * K  # inclusion rates sum to k
    sets = draw_sets(fit_load_weights(load, K, rng), K, 1 << 16, rng)
    assert (sets[:, 0] != sets[:, 1]).all()
    assert np.bincount(sets.reshape(-1), minlength=E) / len(sets) == pytest.approx(load, abs=0.01)
    p = coactivation_counts(sets, E)
    assert np.diag(p).sum() == K * len(sets)


def test_estimate_hand_worked():
    est = estimate(0.5, np.array([0.4, 0.5, 0.6, 0.7]), np.array([0.1, 0.2, 0.3, 0.6]))
    assert est.null_mean == pytest.approx(0.3) and est.null_sd == pytest.approx(np.std([0.1, 0.2, 0.3, 0.6], ddof=1))
    assert est.p == pytest.approx(2 / 5)  # (1 + one null draw >= 0.5) / (1 + 4)
    assert est.bias == pytest.approx(0.05)
    assert est.ci_low == pytest.approx(np.percentile([0.4, 0.5, 0.6, 0.7], 2.5) - 0.05)
    nothing = estimate(float("nan"), np.array([1.0]), np.array([1.0]))
    assert np.isnan(nothing.ci_low) and np.isnan(nothing.p)


def test_folds_depend_on_the_sequence_only():
    seq = np.repeat(np.arange(1000), 3)
    f = fold_of(seq, 32)
    assert (f.reshape(-1, 3) == f[::3, None]).all() and set(np.unique(f)) == set(range(32))
    assert np.bincount(f[::3], minlength=32).min() > 10  # no empty fold at 1000 sequences
    w = replicate_weights(32, 10, seed=0)
    assert w.shape == (10, 32) and (w.sum(axis=1) == 32).all()


def test_folds_by_runs_equal_the_hash_of_every_row():
    from moelab.analysis.resample import mix64

    rng = np.random.default_rng(4)
    for seq in (np.repeat([7, 3, 3, 9, 7], [500, 1, 300, 1000, 200]),  # runs, a value back after another
                rng.integers(0, 50, 3000), np.arange(100), np.repeat([5], 65), np.zeros(0, np.int64)):
        for folds, seed in ((32, 0), (5, 11)):
            want = (mix64(seq, seed) % np.uint64(folds)).astype(np.int64)
            got = fold_of(seq.astype(np.int32), folds, seed)
            assert got.dtype == np.int64 and np.array_equal(got, want)


def test_permutation_mi_matches_shuffling_the_labels_by_hand():
    from moelab.analysis.null import mutual_information, permutation_mi

    rng = np.random.default_rng(5)
    labels = rng.integers(0, 3, size=600)
    experts = np.where(rng.random(600) < 0.3, labels, rng.integers(0, 4, size=600))  # some dependence
    table = np.bincount(labels * 4 + experts, minlength=12).reshape(3, 4)
    fast = permutation_mi(table, 400, seed=1)
    slow = np.array([mutual_information(np.bincount(rng.permutation(labels) * 4 + experts, minlength=12).reshape(3, 4))
                     for _ in range(400)])
    assert fast.mean() == pytest.approx(slow.mean(), rel=0.1) and fast.std() == pytest.approx(slow.std(), rel=0.2)
    assert mutual_information(table) > fast.max()


def test_gate_and_output_numbers_carry_intervals():
    batches = list(planted_batches(rule="token", seed=3, all_experts=True, **dict(ARGS, num_seqs=16)))
    res = analyze_all(batches, num_experts=[E] * L, top_k=K, analyses=("gates", "dynamic"), n_bootstrap=32)
    g, d = res["gates"], res["dynamic"]
    for est in (g.cross_layer_overall, g.entropy_overall, d.top1_overall, d.angular_overall):
        assert est.n_bootstrap == 32 and est.ci_low <= est.value <= est.ci_high
    off = ~np.eye(L, dtype=bool)
    assert g.cross_layer_overall.value == pytest.approx(np.asarray(g.cross_layer_mi)[off].mean())
    assert d.top1_overall.value == pytest.approx(np.mean(d.top1_is_largest_norm))


def test_intervals_from_a_sample_of_token_ids_match_the_full_split():
    from moelab.analysis.common import consume
    from moelab.analysis.specialization import ShareAccumulator, vocab_specialisation
    from moelab.analysis.suite import token_fold_sample

    batches = list(planted_batches(rule="skewed", seed=4, **dict(ARGS, vocab=400, num_seqs=96)))
    w = replicate_weights(32, 64, seed=0)
    widths = {}
    for sample in (1, 4):
        acc = ShareAccumulator("token", [E] * L, K, fold_sample=sample)
        consume(batches, [acc])
        tables = acc.result()
        assert sample == 1 or 0.1 < np.mean(tables.sampled[0]) < 0.45  # about a quarter of the IDs
        est = vocab_specialisation(tables, min_count=10, weights_RF=w).overall
        widths[sample] = est.ci_high - est.ci_low
        assert est.ci_low <= est.value <= est.ci_high
    assert 0.6 < widths[4] / widths[1] < 1.6
    assert token_fold_sample(10**6) == 1 and token_fold_sample(100_000_000) == 16


def test_dense_and_sparse_counting_agree(monkeypatch):
    from moelab.analysis import tables as S
    from moelab.analysis.common import consume

    batches = list(planted_batches(rule="skewed", seed=6, **dict(ARGS, vocab=300, num_seqs=16)))

    def tables(sample):
        acc = S.ShareAccumulator("token", [E] * L, K, fold_sample=sample)
        consume(batches, [acc])
        t = acc.result()
        w = replicate_weights(32, 8, seed=0)
        keep = t.tokens(1) >= 3
        return t.counts, [r for r in t.replicate_tables(1, w, keep)]

    dense = tables(2)
    monkeypatch.setattr(S, "DENSE_BUDGET", 1)  # everything through the sparse counter
    sparse = tables(2)
    assert all((a == b).all() for a, b in zip(dense[0], sparse[0]))
    assert all(np.allclose(a, b) for a, b in zip(dense[1], sparse[1])) and len(dense[1]) == 8


def test_replicates_by_matrix_product_equal_the_bincount_loop_bit_for_bit(monkeypatch):
    """The bootstrap's dense path (per-fold table times the weights) against the per-replicate bincount
    it replaces: whole-number weights give the same floats exactly; other weights take the loop."""
    from moelab.analysis import tables as S
    from moelab.analysis.common import consume

    batches = list(planted_batches(rule="skewed", seed=3, **dict(ARGS, num_seqs=48)))
    acc = S.ShareAccumulator("pos", [E] * L, K)
    consume(batches, [acc])
    t = acc.result()
    keep = t.tokens(1) >= 1
    keep[::3] = False  # a kept subset, so the group index is not the identity
    for w in (replicate_weights(32, 70, seed=1), replicate_weights(32, 70, seed=1) * 0.5):
        fast = list(t.replicate_tables(1, w, keep))
        monkeypatch.setattr(S, "REPLICATE_DENSE_CELLS", 0)
        slow = list(t.replicate_tables(1, w, keep))
        monkeypatch.setattr(S, "REPLICATE_DENSE_CELLS", 40 * E)  # a few replicates per product: chunked
        chunked = list(t.replicate_tables(1, w, keep))
        monkeypatch.undo()
        assert len(fast) == len(slow) == len(chunked) == 70
        assert all(np.array_equal(a, b) and np.array_equal(a, c) for a, b, c in zip(fast, slow, chunked))
    # a hand-made case: two folds, weights (2, 0) and (1, 3)
    t2 = S.ShareTables(group="pos", ranks="all", num_experts=[2], top_k=1, groups=[np.array([0, 1])],
                       counts=[np.array([[3, 1], [0, 2]])])
    t2.folds, t2.sampled = 2, [np.ones(2, bool)]
    t2.fold_entries = [(np.array([0, 1, 1, 0]), np.array([0, 0, 1, 0]), np.array([0, 0, 1, 1]),
                        np.array([2, 1, 2, 1]))]  # fold, group, expert, count
    reps = list(t2.replicate_tables(0, np.array([[2.0, 0.0], [1.0, 3.0]]), np.ones(2, bool)))
    assert np.array_equal(reps[0], [[4, 2], [0, 0]]) and np.array_equal(reps[1], [[5, 1], [0, 6]])


def test_compact_unique_is_numpys_unique():
    from moelab.analysis.tables import compact_unique

    rng = np.random.default_rng(0)
    for v in (rng.integers(0, 50, 999), rng.integers(0, 1 << 40, 500), np.zeros(0, np.int64),
              np.array([7, 7, 7]), rng.integers(0, 3000, 10).astype(np.int32)):
        want, got = np.unique(v, return_inverse=True), compact_unique(v)
        assert all(np.array_equal(a, b) and a.dtype == b.dtype for a, b in zip(want, got))


def test_add_counts_is_a_bincount_on_both_paths():
    from moelab.analysis.tables import add_counts

    rng = np.random.default_rng(1)
    for dtype in (np.int32, np.int64):
        for cells in (rng.integers(0, 300, 5000), rng.integers(0, 1 << 22, 300), np.array([5, 5, 9]),
                      np.zeros(0, np.int64)):  # compact (bincount), sparse (np.add.at), repeats, empty
            flat = np.full(1 << 22, 3, dtype)
            add_counts(flat, cells)
            want = np.full(1 << 22, 3, np.int64) + np.bincount(cells, minlength=1 << 22)
            assert flat.dtype == dtype and np.array_equal(flat, want)


def test_queue_baseline_by_turn():
    def with_turns(batch):  # four turns of 32 positions per sequence
        return dict(batch, turn=(batch["pos"] // 32).astype(np.int16))

    def by_turn(rule):
        batches = [with_turns(b) for b in planted_batches(rule=rule, seed=2, capacity_factor=1.0,
                                                          **dict(ARGS, num_seqs=64))]
        return analyze_all(batches, num_experts=[E] * L, top_k=K, pos_bucket=16, analyses=("drops",),
                           queue=dict(capacity_factor=1.0, batch_seqs=ARGS["seqs_per_batch"]))["queue:trained"]

    uniform, late = by_turn("uniform"), by_turn("late")
    assert len(uniform.share_by_turn) == len(uniform.queue_share_by_turn) == 4
    assert np.abs(uniform.share_by_turn - uniform.queue_share_by_turn).max() < 0.01  # the queue explains every turn
    assert late.share_by_turn[3] > late.queue_share_by_turn[3] + 0.03  # the late shift lands in the last turn


def test_smallest_k_is_argpartitions_set_row_for_row():
    from moelab.analysis.resample import smallest_k

    rng = np.random.default_rng(0)
    for trial in range(300):  # odd trials: few distinct values, so ties at the k-th value in most rows
        N, E = int(rng.integers(0, 50)), int(rng.integers(1, 12))
        k = int(rng.integers(1, E + 1))
        v = (rng.integers(0, 4, (N, E)) if trial % 2 else rng.random((N, E))).astype(np.float32)
        want = np.sort(np.argpartition(v, k - 1, axis=1)[:, :k], axis=1) if N else np.zeros((0, k), np.int64)
        got = smallest_k(v, k)
        assert got.shape == (N, k) and np.array_equal(np.sort(got, axis=1), want), trial
