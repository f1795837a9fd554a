"""Planted routing with known answers: each score finds the planted structure and sits at its null
when there is none."""

from __future__ import annotations

import numpy as np
import pytest

from moelab.analysis import analyze_all, expert_load
from moelab.analysis.synthetic import planted_batches

E, K, L = 8, 2, 2


def run(rule, **kw):
    batches = list(planted_batches(num_seqs=32, seq_len=128, num_layers=L, num_experts=E, top_k=K, rule=rule,
                                   vocab=40, seqs_per_batch=8, seed=1, **kw))
    return analyze_all(batches, num_experts=[E] * L, top_k=K, min_count=20, n_permutations=32,
                       analyses=("load", "specialisation", "coactivation"))


@pytest.fixture(scope="module")
def by_rule():
    return {rule: run(rule) for rule in ("token", "position", "uniform", "domain")}


def test_routing_by_token_is_vocabulary_specialised(by_rule):
    r = by_rule["token"]
    assert r["vocab"].rescaled == pytest.approx([1.0] * L)
    assert r["std_token"].mean == pytest.approx(r["std_token"].deterministic)  # top-2 always the same pair
    for mean, null in zip(r["std_position"].mean, r["std_position"].null_mean):
        assert abs(mean - null) < 0.25 * null  # position carries no information: at chance
    assert r["std_position"].mean[0] < 0.2 * r["std_token"].mean[0]


def test_routing_by_position_is_position_specialised(by_rule):
    r = by_rule["position"]
    assert r["std_position"].mean == pytest.approx(r["std_position"].deterministic)
    for mean, null in zip(r["vocab"].mean, r["vocab"].null_mean):
        assert abs(mean - null) < 0.05
    for mean, null in zip(r["std_token"].mean, r["std_token"].null_mean):
        assert abs(mean - null) < 0.25 * null


def test_uniform_routing_sits_at_every_null(by_rule):
    r = by_rule["uniform"]
    mi = r["mi:domain"]
    for value, mean, std in zip(mi.mi, mi.null_mean, mi.null_std):
        assert abs(value - mean) < 4 * std  # within the permutation null's spread
    for name in ("std_token", "std_position"):
        for mean, null in zip(r[name].mean, r[name].null_mean):
            assert abs(mean - null) < 0.25 * null
    for mean, null in zip(r["vocab"].mean, r["vocab"].null_mean):
        assert abs(mean - null) < 0.05
    load = r["load"]
    assert load.dead_experts == [[], []]
    assert all(1.0 <= m < 1.2 for m in load.max_over_mean)
    coact = r["coactivation"]
    off = ~np.eye(E, dtype=bool)
    assert np.abs(coact.p_j_given_i[0][off] - coact.null_p[0][off]).max() < 0.06
    assert np.abs(coact.null_p[0][off] - coact.uniform_p[0]).max() < 0.06  # balanced load: the two agree


def test_routing_by_domain_shows_in_mutual_information(by_rule):
    mi = by_rule["domain"]["mi:domain"]
    assert mi.normalised == pytest.approx([1.0] * L)  # two domains, two distinct top-1 experts
    assert mi.mi == pytest.approx([np.log(2)] * L)
    assert all(m > n + 10 * s for m, n, s in zip(mi.mi, mi.null_mean, mi.null_std))
    dom = by_rule["domain"]["domain_specialisation:domain"]
    assert dom.max_share[0] == pytest.approx([1.0, 1.0])  # every token of a domain has its expert
    assert dom.uniform[0] == K / E


def test_dead_expert_is_detected():
    batches = planted_batches(num_seqs=8, seq_len=64, num_layers=L, num_experts=E, top_k=K, rule="uniform",
                              dead_expert=3, seed=2)
    load = expert_load(batches, [E] * L, K)
    assert load.dead_experts == [[3], [3]]
    assert load.max_over_mean[0] > load.null_max_over_mean[0]
    assert load.router_entropy[0] < load.null_router_entropy[0]
