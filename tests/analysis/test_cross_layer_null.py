"""The cross-layer MI null keeps each layer's load: independent layers sit at it, a copied layer far above."""

from __future__ import annotations

import numpy as np

from moelab.analysis import gate_stats
from moelab.analysis.gates import binned_mi_T, bin_gates, token_pairs

T, E, K = 3000, 8, 2


def softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def two_layers(make_batch, probs0_TE, probs1_TE):
    probs_LTE = np.stack([probs0_TE, probs1_TE])
    ids_LTK = np.argsort(-probs_LTE, axis=2, kind="stable")[..., :K]
    prob_LTK = np.take_along_axis(probs_LTE, ids_LTK, axis=2)
    g = gate_stats(make_batch(ids_LTK, prob_LTK=prob_LTK, probs_LTE=probs_LTE), [E, E], K)
    return float(g.cross_layer_mi[0, 1]), float(g.cross_layer_null[0, 1])


def skewed(rng):
    # The same experts are favoured at both layers (a skewed load); each token's own part is independent.
    bias_E = np.linspace(3.0, -3.0, E)
    return softmax(bias_E + rng.normal(0, 1.0, (T, E)))


def test_token_pairs_never_pair_a_token_with_itself():
    a, b = token_pairs(50, 50, np.random.default_rng(0))
    assert sorted(a) == list(range(50)) and (a != b).all() and sorted(b) == list(range(50))
    a, b = token_pairs(5, 100, np.random.default_rng(1))
    assert len(a) == 5 and (a != b).all()


def test_independent_layers_with_skewed_load_sit_at_the_null(make_batch):
    rng = np.random.default_rng(0)
    p0, p1 = skewed(rng), skewed(rng)
    mi, null = two_layers(make_batch, p0, p1)
    assert abs(mi - null) < 0.02, (mi, null)
    # The old null (layer j's experts shuffled within each token) breaks the load too, so independent
    # layers looked informative against it: the reason it was replaced.
    perm = np.argsort(rng.random((T, E)), axis=1)
    within = binned_mi_T(bin_gates(p0), bin_gates(np.take_along_axis(p1, perm, axis=1))).mean()
    assert mi - within > 0.1, (mi, within)


def test_a_copied_layer_is_far_above_the_null(make_batch):
    p0 = skewed(np.random.default_rng(1))
    mi, null = two_layers(make_batch, p0, p0.copy())
    # A copy's MI is each token's own bin entropy (the most it can be); with 8 experts the estimator's
    # bias keeps the null high too, so "far" is 10x the independent case's tolerance.
    from moelab.analysis.gates import sample_entropy_T

    assert abs(mi - sample_entropy_T(bin_gates(p0)).mean()) < 1e-9
    assert mi - null > 0.2, (mi, null)


def test_null_is_token_weighted_across_batches_of_unequal_size(make_batch):
    # Two token-complete batches, larger and smaller than the null's subsample, with different gate
    # distributions (like two domains at the ends of a held-out split); independent layers in both, so
    # the token-weighted null must match the token-weighted MI whatever the batch sizes.
    from moelab.analysis.gates import NULL_TOKENS, GateStatsAccumulator

    rng = np.random.default_rng(2)
    sizes, out = (NULL_TOKENS + 4000, 500), []
    for s, (n, scale) in enumerate(zip(sizes, (1.0, 4.0))):
        p_LTE = np.stack([softmax(scale * rng.normal(0, 1.0, (n, E))) for _ in range(2)])
        ids_LTK = np.argsort(-p_LTE, axis=2, kind="stable")[..., :K]
        out.append(make_batch(ids_LTK, prob_LTK=np.take_along_axis(p_LTE, ids_LTK, axis=2), probs_LTE=p_LTE,
                              seq_T=np.full(n, s)))
    acc = GateStatsAccumulator([E, E], K)
    for batch in out:
        acc.update(batch)
    g = acc.result()
    assert abs(g.cross_layer_mi[0, 1] - g.cross_layer_null[0, 1]) < 0.02, (g.cross_layer_mi, g.cross_layer_null)
