"""Static weight analyses on planted weights: copies, permuted copies, a router built from the gates, noise."""

from __future__ import annotations

import math
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from moelab.analysis.pca import pca_explained_variance
from moelab.analysis.reorder import joint_reordering, layer_neurons
import moelab.analysis.weights as weights
from moelab.analysis.weights import averaged_neurons, gram_mean, matrix_similarity, weight_analysis

E, F, D = 6, 32, 16


def random_layer(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {"w_up_EFD": rng.standard_normal((E, F, D)), "w_gate_EFD": rng.standard_normal((E, F, D)),
            "w_down_EDF": rng.standard_normal((E, D, F)), "w_router_ED": rng.standard_normal((E, D))}


def test_matrix_similarity_of_copies_and_negations():
    w = random_layer(0)["w_up_EFD"]
    w[1], w[2] = w[0], -w[0]
    sim = matrix_similarity(w)
    assert sim[0, 1] == pytest.approx(1.0) and sim[0, 2] == pytest.approx(-1.0)
    assert abs(sim[3, 4]) < 0.2  # independent Gaussian matrices: ~0, the random-init null


def test_joint_reordering_recovers_a_permuted_copy():
    layer = random_layer(1)
    perm = np.random.default_rng(5).permutation(F)
    layer["w_up_EFD"][1] = layer["w_up_EFD"][0][perm]
    layer["w_gate_EFD"][1] = layer["w_gate_EFD"][0][perm]
    layer["w_down_EDF"][1] = layer["w_down_EDF"][0][:, perm]  # neuron i of down is column i
    match = joint_reordering(layer_neurons(layer), 1, 0)
    np.testing.assert_array_equal(match.perm, perm)  # neuron f of expert 1 is neuron perm[f] of expert 0
    assert match.mean_neuron_cos_after == pytest.approx(1.0)
    assert match.mean_neuron_cos_before < 0.3
    assert 0.0 < match.null_after < 0.6  # a best matching of noise is positive, far from 1
    same = joint_reordering(layer_neurons(layer), 0, 0, null_seed=None)
    assert same.kendall_tau == 1.0 and same.null_after is None


def test_router_regression_finds_router_built_from_gates():
    layer = random_layer(2)
    layer["w_router_ED"] = averaged_neurons(layer["w_up_EFD"], layer["w_gate_EFD"], layer["w_down_EDF"])["gate"]
    res = weight_analysis([layer, random_layer(3)], reorder_pairs=[(0, 1)])
    assert res.layers[0].router_r2["gate"] == pytest.approx(1.0)
    assert res.layers[1].router_r2["gate"] < 0.6  # random layer: chance, 1 / (pairs - 1) on average
    assert res.router_r2_mean["gate"] == pytest.approx((1.0 + res.layers[1].router_r2["gate"]) / 2)
    assert res.null_r2 == pytest.approx(1 / 14)  # 15 expert pairs
    assert set(res.layers[0].joint_reorder) == {"0-1"} and res.layers[0].paper_reorder.pairs == [(0, 1)]
    assert res.to_dict()["layers"][0]["matrix_cos"]["up"][0][0] == pytest.approx(1.0)


def test_torch_inputs_gram_mean_and_pca():
    layer = {k: torch.tensor(v, dtype=torch.float32) for k, v in random_layer(4).items()}
    res = weight_analysis([layer])
    assert res.layers[0].averaged_cos["down"].shape == (E, E)
    same = np.ones((E, D))
    assert gram_mean(same) == pytest.approx(1.0)
    assert gram_mean(np.eye(E, D)) == pytest.approx(1 / E)  # orthogonal experts: only the diagonal
    rank1 = np.outer(np.arange(1.0, 9.0), np.random.default_rng(0).standard_normal(20))
    ev = pca_explained_variance(rank1, 3)
    assert ev[0] == pytest.approx(1.0) and ev[1:] == pytest.approx([0.0, 0.0], abs=1e-12)


def test_a_layer_is_analysed_one_part_at_a_time_in_float64(monkeypatch):
    """analyse_layer holds one part of the layer in float64 at a time (with the matched experts' rows of the
    others): all three with their copies took 2.7-3.3x the layer's float32 size, 4-5 GiB for an OLMoE layer.
    The reorderings still match the rows they did."""
    import gc
    import weakref

    import moelab.analysis.weights as aw

    rng = np.random.default_rng(0)  # float32, as checkpoints give them: float64 is the analysis' own copy
    layer = {k: rng.standard_normal(shape, dtype=np.float32) for k, shape in (
        ("w_up_EFD", (6, 8, 12)), ("w_gate_EFD", (6, 8, 12)), ("w_down_EDF", (6, 12, 8)), ("w_router_ED", (6, 12)))}
    alive, real = [], aw.part_neurons

    def part(w, name):
        gc.collect()
        assert all(ref() is None for ref in alive), "an earlier part is still held in float64"
        out = real(w, name)
        alive.append(weakref.ref(out))
        return out

    monkeypatch.setattr(aw, "part_neurons", part)
    got = aw.analyse_layer(layer, [(0, 1), (2, 4)], 0)
    assert len(alive) == 3
    want = joint_reordering(layer_neurons(layer), 2, 4)
    assert np.array_equal(got.joint_reorder["2-4"].perm, want.perm)
    assert got.joint_reorder["2-4"].mean_neuron_cos_after == pytest.approx(want.mean_neuron_cos_after, abs=1e-12)


def test_a_part_no_layer_can_regress_averages_to_nan_without_a_warning(monkeypatch):
    nan = float("nan")
    layers = [SimpleNamespace(router_r2={p: (nan if i < 2 else 0.5) for p in weights.PARTS}, null_r2=nan,
                              rmoe_similarity=0.25 * i, rmoe_null=nan) for i in range(3)]
    monkeypatch.setattr(weights, "_analyse", lambda layer, pairs, seed: layers[layer["i"]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's nanmean warned "Mean of empty slice" on all-nan parts
        two = weights.weight_analysis([{"i": 0}, {"i": 1}])
        three = weights.weight_analysis([{"i": 0}, {"i": 1}, {"i": 2}])
    assert all(math.isnan(v) for v in two.router_r2_mean.values()) and math.isnan(two.null_r2)
    assert all(v == 0.5 for v in three.router_r2_mean.values())  # the nan layers left out, not counted as 0
    assert two.rmoe_similarity_mean == 0.125 and three.rmoe_similarity_mean == 0.25
