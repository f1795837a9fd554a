"""olmoe-layer-specialisation and olmoe-coactivation on planted traces: a depth-growing token rule and a
planted expert pair are found; skewed load alone (no token rule, independent choices) sits at the null."""

from __future__ import annotations

import numpy as np
import pytest

from moelab.analysis.suite import analyze_all, to_json_dict
from moelab.analysis.synthetic import _rows, skewed_load
from moelab.claims.registry import all_rows
from moelab.claims.rows_layers import (TREND_MARGIN, depth_spearman, excess_by_layer, pair_excess_by_layer,
                                       routing_learned, strongest_pair_excess)
from moelab.claims.seeds import t_interval

S, P, L, E, K, VOCAB = 96, 32, 6, 8, 2, 60


def planted(seed: int, token_share_L: np.ndarray, pair: tuple[int, int] | None = None) -> dict:
    """Skewed-load routing; in layer l a share token_share_L[l] of tokens goes to experts fixed by the token
    ID; with `pair` (a, b), every token whose top-1 is expert a takes expert b second."""
    rng = np.random.default_rng(seed)
    tokens_SP = rng.integers(0, VOCAB, (S, P))
    logits = np.log(skewed_load(E)) + rng.gumbel(size=(S, P, L, E))
    for l, share in enumerate(token_share_L):
        by_token = rng.random((S, P)) < share
        first = (tokens_SP * 7 + l) % E
        for r in range(K):
            hit = np.zeros((S, P, E), bool)
            np.put_along_axis(hit, ((first + r) % E)[..., None], True, axis=2)
            logits[:, :, l] += np.where(by_token[..., None] & hit, 20.0 - r, 0.0)
    if pair:
        a, b = pair
        top = logits.argmax(axis=3)
        second = np.sort(logits, axis=3)[..., -2]
        logits[..., b] = np.where(top == a, second + 1e-3 + (logits[..., a] - second) / 2, logits[..., b])
    probs = np.exp(logits - logits.max(axis=3, keepdims=True))
    probs /= probs.sum(axis=3, keepdims=True)
    ids = np.argsort(-probs, axis=3, kind="stable")[..., :K]
    prob = np.take_along_axis(probs, ids, axis=3)
    return _rows(0, tokens_SP, np.arange(S) % 2, ("web", "code"), ids, prob, np.zeros(ids.shape, bool), probs,
                 False, rng)


def analyses(batch: dict) -> dict:
    r = analyze_all([batch], num_experts=[E] * L, top_k=K, analyses=("specialisation", "coactivation"),
                    min_count=4, vocab_min_count=10, n_permutations=8)
    return to_json_dict(r)


@pytest.fixture(scope="module")
def grown():
    return [analyses(planted(s, np.linspace(0.0, 0.9, L))) for s in range(3)]


@pytest.fixture(scope="module")
def flat():
    return [analyses(planted(10 + s, np.zeros(L))) for s in range(3)]


def test_vocab_trend_found_when_planted(grown):
    trends = [depth_spearman(excess_by_layer(a["vocab"])) for a in grown]
    mean, lo, hi = t_interval(trends)
    assert lo > TREND_MARGIN and mean > 0.9
    assert routing_learned([np.nanmean(excess_by_layer(a["vocab"])) for a in grown]).met


def test_skewed_load_alone_has_no_specialisation_and_no_pair(flat):
    v = np.array([excess_by_layer(a["vocab"]) for a in flat])
    assert np.abs(v).max() < 0.05  # the shuffled-token null keeps the skewed load: no excess
    assert not routing_learned(v.mean(axis=1).tolist()).met
    excess = [strongest_pair_excess(a["coactivation"], min_tokens=100) for a in flat]
    strongest = [np.nanmean([e["value"] for e in a["coactivation"]["strongest"]]) for a in flat]
    uniform = flat[0]["coactivation"]["uniform_p"][0]
    assert min(strongest) > 2 * uniform  # skewed load alone makes popular pairs look co-activated ...
    assert 0 <= np.mean(excess) < uniform / 2  # ... and the load-matched null removes it (a max: noise >= 0)


def test_planted_pair_is_strong_coactivation():
    # Two rarely chosen experts (load 0.05 each): their pair stands out of what the load alone gives.
    batch = planted(20, np.zeros(L), pair=(6, 7))
    a = analyses(batch)
    ids_TK = batch["expert"][batch["layer"] == 0].reshape(-1, K)
    with6 = (ids_TK == 6).any(axis=1)
    assert (ids_TK[ids_TK[:, 0] == 6, 1] == 7).all()  # by construction
    p = np.array(a["coactivation"]["p_j_given_i"][0])
    assert p[6, 7] == pytest.approx((ids_TK[with6] == 7).any(axis=1).mean())  # P(7 | 6) counted by hand
    assert strongest_pair_excess(a["coactivation"], min_tokens=100) > a["coactivation"]["uniform_p"][0]  # beyond the bound
    # the pair's experts are chosen by a few hundred tokens: a floor above that leaves them out
    rare = int(np.diag(np.array(a["coactivation"]["counts"][0]))[[6, 7]].max())
    assert 100 <= rare and pair_excess_by_layer(a["coactivation"], min_tokens=rare + 1)[0] < 0.1


def test_depth_spearman_by_hand():
    assert depth_spearman([0.1, 0.2, 0.15, 0.4]) == pytest.approx(0.8)  # ranks 1 3 2 4: 1 - 6*2/(4*15)
    assert np.isnan(depth_spearman([0.2, 0.2, 0.2])) and np.isnan(depth_spearman([0.1, np.nan]))


def test_registered():
    rows = all_rows()
    assert rows["olmoe-layer-specialisation"].paper == rows["olmoe-coactivation"].paper == "OLMoE"
