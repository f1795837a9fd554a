"""The papers' weight definitions against hand-worked numbers, naive loops and planted weights, each with
the baseline it is printed beside (random init, a matching of noise, exchangeable experts)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy.stats import kendalltau

from moelab.analysis.pca import centred_gram, project, zscore_columns
from moelab.analysis.reorder import (
    joint_reordering, kendall_tau, kendall_tau_null_sd, layer_neurons, match_part, paper_reordering, reorder_null,
)
from moelab.analysis.weights import (
    reorder_pairs_within, rmoe_null, rmoe_similarity, weight_analysis,
)

E, F, D = 6, 24, 16


def random_layer(seed: int, E: int = E, F: int = F, D: int = D) -> dict:
    rng = np.random.default_rng(seed)
    return {"w_up_EFD": rng.standard_normal((E, F, D)), "w_gate_EFD": rng.standard_normal((E, F, D)),
            "w_down_EDF": rng.standard_normal((E, D, F))}


def one_part(a_FD, b_FD) -> dict:
    """A two-expert layer whose three matrices are a and b alike (down stored transposed)."""
    up = np.stack([a_FD, b_FD])
    return {"w_up_EFD": up, "w_gate_EFD": up, "w_down_EDF": np.swapaxes(up, 1, 2)}


# ---- neuron reordering ---------------------------------------------------------------------------------
def test_reordering_by_hand():
    """a's neurons (1, 0), (0, 2); b's (0, 3), (1, 1). Neuron cosines: a0-b0 0, a0-b1 1/sqrt2, a1-b0 1,
    a1-b1 1/sqrt2, so the best matching swaps (1/sqrt2 + 1 beats 1/sqrt2). Flattened: <a, b> = 2, and
    after the swap b = [[1, 1], [0, 3]] gives <a, b'> = 7; |a| = sqrt5, |b| = sqrt11."""
    a, b = np.array([[1.0, 0.0], [0.0, 2.0]]), np.array([[0.0, 3.0], [1.0, 1.0]])
    m = match_part(a, b)
    np.testing.assert_array_equal(m.perm, [1, 0])
    assert m.flat_cos_before == pytest.approx(2 / np.sqrt(55))
    assert m.flat_cos_after == pytest.approx(7 / np.sqrt(55))
    assert m.kendall_tau == -1.0
    paper = paper_reordering(layer_neurons(one_part(a, b)), 0, 1)
    assert {p: r.flat_cos_after for p, r in paper.items()} == pytest.approx({p: 7 / np.sqrt(55) for p in paper})
    # moelab's joint metric on the same neurons: the mean of per-neuron cosines, not the flattened cosine
    joint = joint_reordering(layer_neurons(one_part(a, b)), 0, 1, parts=("up",), null_seed=None)
    assert joint.mean_neuron_cos_before == pytest.approx(0.5 / np.sqrt(2))
    assert joint.mean_neuron_cos_after == pytest.approx((1 + 1 / np.sqrt(2)) / 2)


def test_each_matrix_gets_its_own_matching():
    """Expert 1 holds expert 0's neurons, each matrix shuffled by a different permutation: the paper's
    per-matrix reordering finds all three (cosine 1), one joint matching cannot, and the stored order
    looks unrelated (flattened cosine near 0, the random-init level)."""
    layer = random_layer(0, E=2)
    rng = np.random.default_rng(1)
    perms = {p: rng.permutation(F) for p in ("up", "gate", "down")}
    layer["w_up_EFD"][1] = layer["w_up_EFD"][0][perms["up"]]
    layer["w_gate_EFD"][1] = layer["w_gate_EFD"][0][perms["gate"]]
    layer["w_down_EDF"][1] = layer["w_down_EDF"][0][:, perms["down"]]
    paper = paper_reordering(layer_neurons(layer), 1, 0)
    for p, m in paper.items():
        np.testing.assert_array_equal(m.perm, perms[p])
        assert m.flat_cos_after == pytest.approx(1.0)
        assert abs(m.flat_cos_before) < 4 / np.sqrt(F * D)
    joint = joint_reordering(layer_neurons(layer), 1, 0)
    assert joint.mean_neuron_cos_after < 0.75  # one permutation cannot fit three different ones
    lay = weight_analysis([layer], reorder_pairs=[(0, 1)]).layers[0]  # the same through the layer analysis
    pr = lay.paper_reorder
    assert pr.mean_after == pytest.approx({p: 1.0 for p in perms})
    assert pr.mean_after["up"] > pr.null_after["up"] + 10 * pr.null_after_sd
    assert abs(lay.matrix_cos["up"][0, 1]) < 4 * lay.matrix_null_sd


def test_reordering_of_independent_experts_sits_at_its_null():
    res = weight_analysis([random_layer(2)], reorder_pairs=list(itertools.combinations(range(E), 2)))
    pr = res.layers[0].paper_reorder
    assert len(pr.pairs) == 15
    for p in ("up", "gate", "down"):
        assert abs(pr.mean_before[p]) < 4 / np.sqrt(F * D * 15)  # mean of 15 unrelated cosines
        # a matching of noise (~0.4 here); 15 pairs average to within a few of one pair's spread / sqrt(15)
        assert abs(pr.mean_after[p] - pr.null_after[p]) < 4 * pr.null_after_sd / np.sqrt(15) + 0.01
        assert pr.null_after[p] > 0.2
        assert abs(pr.mean_tau[p]) < 4 * pr.null_tau_sd / np.sqrt(15)
        off = pr.flat_cos_after[p][~np.eye(E, dtype=bool)]
        assert np.isfinite(off).all() and np.allclose(np.diag(pr.flat_cos_after[p]), 1.0)


def test_kendall_tau_matches_scipy_and_its_null_spread():
    rng = np.random.default_rng(3)
    taus = []
    for _ in range(300):
        perm = rng.permutation(12)
        taus.append(kendall_tau(perm))
        assert taus[-1] == pytest.approx(kendalltau(perm, np.arange(12)).statistic)
    assert np.mean(taus) == pytest.approx(0.0, abs=4 * kendall_tau_null_sd(12) / np.sqrt(300))
    assert np.std(taus) == pytest.approx(kendall_tau_null_sd(12), rel=0.15)


def test_reorder_null_and_pair_budget():
    assert reorder_null.__wrapped__(F, D, 0) == reorder_null(F, D, 0)  # a fixed seed: reproducible
    (narrow, sd), (wide, _) = reorder_null(64, 8), reorder_null(64, 512)
    assert 0.2 < narrow < 0.7 and wide < narrow and 0 < sd < 0.05  # longer neurons: noise matches worse
    assert reorder_pairs_within(4, 16) == list(itertools.combinations(range(4), 2))
    assert reorder_pairs_within(8, 4096, budget=4e7) == [(0, 1)]  # too large: one pair
    assert reorder_pairs_within(1, 16) == []


# ---- RMoE's expert similarity ------------------------------------------------------------------------
def test_rmoe_similarity_by_hand_and_by_loop():
    """Units: up (1, 0) and (1, 1)/sqrt2; gate (0, 1) twice; down (1, 0) and (-1, 0). The Gram matrix has
    3 on the diagonal and 1/sqrt2 + 1 - 1 off it: mean (6 + sqrt2) / 4."""
    avg = {"up": np.array([[2.0, 0.0], [1.0, 1.0]]), "gate": np.array([[0.0, 1.0], [0.0, 3.0]]),
           "down": np.array([[1.0, 0.0], [-1.0, 0.0]])}
    assert rmoe_similarity(avg) == pytest.approx((6 + np.sqrt(2)) / 4)
    rng = np.random.default_rng(4)
    avg = {p: rng.standard_normal((5, 7)) for p in ("up", "gate", "down")}
    total = 0.0
    for i in range(5):
        for j in range(5):
            for p in avg:
                a, b = avg[p][i], avg[p][j]
                total += a @ b / np.sqrt((a @ a) * (b @ b))
    assert rmoe_similarity(avg) == pytest.approx(total / 25)


def test_rmoe_random_level_is_three_over_e():
    """Derived in weights.py: P on the diagonal, uncorrelated cosines of variance 1/D off it."""
    E_, D_ = 8, 32
    mean, sd = rmoe_null(E_, D_)
    assert mean == pytest.approx(3 / 8)
    rng = np.random.default_rng(5)
    sims = [rmoe_similarity({p: rng.standard_normal((E_, D_)) for p in ("up", "gate", "down")})
            for _ in range(400)]
    assert np.mean(sims) == pytest.approx(mean, abs=4 * sd / np.sqrt(400))
    assert np.std(sims) == pytest.approx(sd, rel=0.15)
    lay = weight_analysis([random_layer(6)]).layers[0]  # from weights, through the averaged neurons
    assert abs(lay.rmoe_similarity - 3 / E) < 4 * lay.rmoe_null_sd and lay.rmoe_null == pytest.approx(3 / E)
    same = random_layer(7)
    for k in ("w_up_EFD", "w_gate_EFD", "w_down_EDF"):
        same[k][:] = same[k][0]
    assert weight_analysis([same]).layers[0].rmoe_similarity == pytest.approx(3.0)  # identical experts


def test_random_init_spreads_of_the_cosines():
    lays = weight_analysis([random_layer(s, E=8, F=16, D=32) for s in range(20)]).layers
    off = ~np.eye(8, dtype=bool)
    mat = np.concatenate([lay.matrix_cos["up"][off] for lay in lays])
    avg = np.concatenate([lay.averaged_cos["gate"][off] for lay in lays])
    assert np.std(mat) == pytest.approx(lays[0].matrix_null_sd, rel=0.15)
    assert np.std(avg) == pytest.approx(lays[0].averaged_null_sd, rel=0.15)
    offdiag = [lay.gram_mean_offdiag["down"] for lay in lays]
    assert np.std(offdiag) == pytest.approx(lays[0].gram_offdiag_null_sd, rel=0.35)


def test_layers_with_their_own_e_and_a_one_expert_layer():
    res = weight_analysis([random_layer(8, E=4), random_layer(9, E=6), random_layer(10, E=1)],
                          reorder_pairs=[(0, 1), (3, 5)])
    assert [lay.null_r2 for lay in res.layers[:2]] == pytest.approx([1 / 5, 1 / 14])
    assert res.null_r2 == pytest.approx((1 / 5 + 1 / 14) / 2)  # the router null uses each layer's own E
    one = res.layers[2]  # no expert pairs: NaN, not a number that pulls the means
    assert np.isnan(one.rmoe_similarity) and np.isnan(one.null_r2) and one.paper_reorder is None
    assert res.rmoe_null_mean == pytest.approx((3 / 4 + 3 / 6) / 2)
    assert res.rmoe_similarity_mean == pytest.approx(np.mean([lay.rmoe_similarity for lay in res.layers[:2]]))
    assert res.layers[0].paper_reorder.pairs == [(0, 1)] and res.layers[1].paper_reorder.pairs == [(0, 1), (3, 5)]


# ---- PCA and the dense reference ------------------------------------------------------------------------
def test_zscore_and_projection_match_a_naive_covariance_pca():
    x = np.array([[1.0, 2.0, 5.0], [3.0, 2.0, 1.0], [5.0, 2.0, 0.0], [7.0, 2.0, 2.0]])
    z = zscore_columns(x)
    # column 0: mean 4, sd sqrt(20/3); column 1 is constant (0 by convention); column 2: mean 2, sd sqrt(14/3)
    np.testing.assert_allclose(z[:, 0], (x[:, 0] - 4) / np.sqrt(20 / 3))
    np.testing.assert_allclose(z[:, 1], 0.0)
    np.testing.assert_allclose(z[:, 2], (x[:, 2] - 2) / np.sqrt(14 / 3))
    rng = np.random.default_rng(10)
    x = rng.standard_normal((7, 40)) * np.linspace(0.5, 3, 40)
    pr = project(x, 2)
    zz = zscore_columns(x)
    lam, v = np.linalg.eigh(np.cov(zz, rowvar=False))  # the X x X covariance: another route
    lam, v = lam[::-1], v[:, ::-1]
    np.testing.assert_allclose(pr.explained, lam[:2] / lam.sum())
    np.testing.assert_allclose(np.abs(pr.coords), np.abs(zz @ v[:, :2]), atol=1e-9)
    assert pr.null_explained == pytest.approx(1 / 6)
    np.testing.assert_allclose(centred_gram(x.astype(np.float32), chunk=7), zz @ zz.T, rtol=1e-5, atol=1e-4)


def test_pca_separates_planted_groups_and_noise_sits_at_the_null():
    rng = np.random.default_rng(11)
    centre = rng.standard_normal((2, 2000))
    x = np.vstack([centre[0] + 0.1 * rng.standard_normal((4, 2000)), centre[1] + 0.1 * rng.standard_normal((4, 2000))])
    pr = project(x)
    assert pr.explained[0] > 0.8 > 5 * pr.null_explained  # one axis, which group, far above 1/7
    assert np.sign(pr.coords[:4, 0]).tolist() == [np.sign(pr.coords[0, 0])] * 4
    assert (np.sign(pr.coords[4:, 0]) == -np.sign(pr.coords[0, 0])).all()
    noise = project(rng.standard_normal((8, 20000)))
    np.testing.assert_allclose(noise.explained, [1 / 7, 1 / 7], atol=0.02)


def test_dense_reference_row_and_point():
    layer = random_layer(12)
    layer.update(ref_w_up_FD=layer["w_up_EFD"][2], ref_w_gate_FD=layer["w_gate_EFD"][2] * 3.0,
                 ref_w_down_DF=layer["w_down_EDF"][2], ref_name="dense FFN of block 0")
    lay = weight_analysis([layer]).layers[0]
    assert lay.reference == "dense FFN of block 0"
    for p in ("up", "gate", "down"):
        assert lay.matrix_ref_cos[p][2] == pytest.approx(1.0)  # a copy of expert 2 (scale does not matter)
        assert lay.averaged_ref_cos[p][2] == pytest.approx(1.0)
        assert np.abs(np.delete(lay.matrix_ref_cos[p], 2)).max() < 4 / np.sqrt(F * D)
        assert lay.pca[p].coords.shape == (E + 1, 2)
    # z-scoring is per column, so a scaled copy is not the same point; an exact copy is
    np.testing.assert_allclose(lay.pca["up"].coords[-1], lay.pca["up"].coords[2], atol=1e-9)
    narrow = {**random_layer(13), "ref_w_up_FD": np.ones((F // 2, D)), "ref_w_gate_FD": np.ones((F // 2, D)),
              "ref_w_down_DF": np.ones((D, F // 2))}
    lay = weight_analysis([narrow]).layers[0]
    assert lay.reference == "" and lay.matrix_ref_cos == {} and lay.pca["up"].coords.shape == (E, 2)


def test_joint_null_keeps_each_parts_scale():
    """moelab initialises W_down smaller than W_up and W_gate; in the concatenated neuron it then weighs
    less and a matching of noise reaches higher. The joint null draws each part at its own spread, so
    independent random experts sit at it (a unit-variance null would sit clearly below them)."""
    layer = random_layer(14, E=4, F=64, D=16)
    layer["w_down_EDF"] *= 0.05
    n = layer_neurons(layer)
    matches = [joint_reordering(n, a, b) for a, b in itertools.combinations(range(4), 2)]
    after = np.mean([m.mean_neuron_cos_after for m in matches])
    assert after == pytest.approx(matches[0].null_after, abs=0.01)
    unit = joint_reordering({p: n[p] / n[p].std() for p in n}, 0, 1).null_after  # all parts at one scale
    assert unit < after - 0.02
