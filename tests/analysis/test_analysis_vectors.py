"""The analyses against independently computed values in shared/reference/vectors.json."""

from __future__ import annotations

import numpy as np
import pytest

from moelab.analysis.dynamic import DynamicAccumulator, angular_similarity
from moelab.analysis.drops import expert_capacity, simulate_drops
from moelab.analysis.early import early_routing, jensen_shannon, top1_agreement, topk_overlap
from moelab.analysis.gates import cross_layer_mi_T, gate_stats
from moelab.analysis.specialization import share_tables, std_score, vocab_specialisation
from moelab.analysis.weights import cosine_matrix


def test_vocab_specialisation(vectors, make_batch):
    v = vectors["analysis"]["vocab_specialisation"]
    batch = make_batch(np.asarray(v["expert_ids_TK"])[None], tokens_T=v["tokens"])
    tables = share_tables(batch, "token", [v["E"]], v["k"])
    res = vocab_specialisation(tables, min_count=1)
    got = dict(zip(res.tokens[0].tolist(), res.per_token[0].tolist()))
    assert got == pytest.approx({int(t): p for t, p in v["expected_per_token"].items()})
    assert res.mean[0] == pytest.approx(v["expected_mean"])
    assert res.rescaled[0] == pytest.approx(v["expected_mean_rescaled"])


def test_openmoe_std_score(vectors, make_batch):
    v, s = vectors["analysis"]["vocab_specialisation"], vectors["analysis"]["openmoe_std_score"]
    batch = make_batch(np.asarray(v["expert_ids_TK"])[None], tokens_T=v["tokens"])
    tables = share_tables(batch, "token", [v["E"]], v["k"])
    row = list(tables.groups[0]).index(9)
    np.testing.assert_allclose(tables.share(0)[row], s["expected_E_i"])
    res = std_score(tables, min_count=1)
    assert res.std[0][list(res.groups[0]).index(9)] == pytest.approx(s["expected_std"])


def test_jensen_shannon(vectors):
    v = vectors["analysis"]["jensen_shannon"]
    assert jensen_shannon(np.array([v["p"]]), np.array([v["q"]]))[0] == pytest.approx(v["expected_nats"])


def test_checkpoint_agreement(vectors, make_batch):
    v = vectors["analysis"]["checkpoint_agreement"]
    ids_t, ids_f = np.asarray(v["ids_t"]), np.asarray(v["ids_final"])
    assert topk_overlap(ids_t, ids_f) == pytest.approx(v["expected_topk_overlap"])
    assert top1_agreement(ids_t, ids_f) == pytest.approx(v["expected_top1_agreement"])
    E = int(max(ids_t.max(), ids_f.max())) + 1
    res = early_routing([[make_batch(ids_t[None])], [make_batch(ids_f[None])]], num_experts=[E],
                        top_k=ids_t.shape[1], min_count=1)
    assert res.topk_overlap[0, 0] == pytest.approx(v["expected_topk_overlap"])
    assert res.top1_agreement[0, 0] == pytest.approx(v["expected_top1_agreement"])


def test_angular_similarity(vectors):
    v = vectors["analysis"]["angular_similarity"]
    cos = cosine_matrix(np.array([v["u"], v["v"]]))[0, 1]
    assert cos == pytest.approx(v["expected_cosine"])
    assert angular_similarity(cos) == pytest.approx(v["expected_angular"])
    acc = DynamicAccumulator([2])  # the same through the trace path: one expert pair, one token
    acc.update({"layer": np.array([0]), "rank": np.array([0]), "expert_cos": np.array([[cos]], np.float32)})
    assert acc.result().mean_angular[0] == pytest.approx(v["expected_angular"], rel=1e-6)


def test_cross_layer_mi(vectors, make_batch):
    v = vectors["analysis"]["cross_layer_mi"]
    gi, gj = np.array([v["gate_layer_i"]]), np.array([v["gate_layer_j"]])
    assert cross_layer_mi_T(gi, gj)[0] == pytest.approx(v["expected_mi_nats"])
    probs_LTE = np.stack([gi, gj])
    ids_LTK = np.argsort(-probs_LTE, axis=2)[:, :, :2]
    res = gate_stats(make_batch(ids_LTK, probs_LTE=probs_LTE), [gi.shape[1]] * 2, 2)
    assert res.cross_layer_mi[0, 1] == pytest.approx(v["expected_mi_nats"])


def naive_drops(ids_TK, probs_TK, E, cap, group_size, policy):
    """The drop rule as a plain loop over queued choices: the oracle for the vectorised one."""
    T, K = ids_TK.shape
    dropped = np.zeros((T, K), bool)
    for g0 in range(0, T, group_size):
        choices = [(k, t) for k in range(K) for t in range(g0, min(g0 + group_size, T))]
        if policy == "score":
            choices.sort(key=lambda kt: -probs_TK[kt[1], kt[0]])  # stable: ties keep (rank, token)
        used = [0] * E
        for k, t in choices:
            e = ids_TK[t, k]
            dropped[t, k] = used[e] >= cap
            used[e] += not dropped[t, k]
    return dropped


def test_routing_dropped_cases(vectors):
    assert len(vectors["routing"]) >= 6
    for case in vectors["routing"]:
        ids = np.asarray(case["expected"]["expert_ids_TK"])
        probs = np.asarray(case["expected"]["weights_raw_TK"])
        G = case["group_size"] or case["T"]
        kw = dict(formula=case["capacity_formula"], policy=case["drop_policy"], group_size=G)
        got = simulate_drops(ids, probs, case["E"], case["capacity_factor"], **kw)
        np.testing.assert_array_equal(got, np.asarray(case["expected"]["dropped_TK"]), err_msg=str(case["T"]))
        assert got.sum() == case["expected"]["n_dropped"]
        cap = expert_capacity(case["T"], case["E"], case["k"], case["capacity_factor"],
                              formula=case["capacity_formula"], group_size=G)
        assert [cap] * len(case["capacity_per_group"]) == case["capacity_per_group"]
        np.testing.assert_array_equal(naive_drops(ids, probs, case["E"], cap, G, case["drop_policy"]), got)


@pytest.mark.parametrize("policy", ["openmoe", "score"])
@pytest.mark.parametrize("formula", ["topk", "group"])
def test_simulate_drops_matches_naive_loop(policy, formula):
    rng = np.random.default_rng(7)
    for trial in range(20):
        T, E, K = int(rng.integers(1, 60)), int(rng.integers(2, 9)), int(rng.integers(1, 5))
        K = min(K, E)
        ids = np.argsort(rng.random((T, E)), axis=1)[:, :K]
        probs = np.round(rng.random((T, K)), 1)  # coarse: plenty of ties to order
        cf, G = float(rng.choice([0.5, 1.0, 1.25])), int(rng.integers(3, 20))
        got = simulate_drops(ids, probs, E, cf, formula=formula, policy=policy, group_size=G)
        cap = expert_capacity(T, E, K, cf, formula=formula, group_size=G)
        want = naive_drops(ids, probs, E, cap, G if formula == "group" else T, policy)
        np.testing.assert_array_equal(got, want, err_msg=f"trial {trial}")


def test_simulate_drops_past_16_bit_buckets_matches_naive_loop():
    """70,400 (group, expert) buckets: the queue order leaves the 16-bit radix sort for the general one."""
    rng = np.random.default_rng(3)
    T, E, K, G = 1100, 64, 2, 1
    ids = np.argsort(rng.random((T, E)), axis=1)[:, :K]
    ids[:, 1] = ids[:, 0]  # a token's two ranks on one expert of capacity 1: the second must drop
    probs = rng.random((T, K))
    got = simulate_drops(ids, probs, E, 1.0, formula="group", group_size=G, min_capacity=1)
    cap = expert_capacity(T, E, K, 1.0, formula="group", group_size=G, min_capacity=1)
    assert cap == 1 and got[:, 1].all() and not got[:, 0].any()
    np.testing.assert_array_equal(got, naive_drops(ids, probs, E, cap, G, "openmoe"))
