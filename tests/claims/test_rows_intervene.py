"""The intervention rows at smoke scale, through the registry: fields, per-seed details, and the value
recomputed from what the details report."""

import math

import numpy as np
import pytest

from moelab.claims.registry import all_rows, run_row
from moelab.claims.verdict import VERDICTS
from moelab.claims.workspace import Scale


def sane(r, name):
    assert r.row == name and r.paper == "Interventions" and r.verdict in VERDICTS and r.seconds > 0
    m = r.measure
    assert all(math.isfinite(v) for v in (m.value, m.ci_low, m.ci_high, m.null))
    assert m.ci_low <= m.value <= m.ci_high and r.test.direction == "less"
    assert r.seeds == Scale.smoke().seeds and "tiny-moe" in r.setup


def test_one_expert_suffices(ws):
    r = run_row(all_rows()["intervene-one-expert-suffices"], ws)
    sane(r, "intervene-one-expert-suffices")
    seeds = r.details["per_seed"]
    assert len(seeds) == 2
    # Every seed reads the same held-out tokens: the pooled value is the mean of the seeds' differences.
    assert r.measure.value == pytest.approx(np.mean([s["loss_k1"] - s["loss_own_k"] for s in seeds]))
    for s in seeds:
        cos = list(s["cosine_k1_vs_own_by_block"].values()) + list(s["cosine_k1_vs_all_by_block"].values())
        assert sorted(s["cosine_k1_vs_own_by_block"]) == ["1", "3"] and all(-1 <= c <= 1 for c in cos)


def test_observational_vs_causal(ws):
    r = run_row(all_rows()["intervene-observational-vs-causal"], ws)
    sane(r, "intervene-observational-vs-causal")
    d = r.details
    assert set(d["scores"]) == {"frequency", "gate_weighted", "activation_norm", "reap"}
    best = max(d["scores"].values(), key=lambda s: s["rho"])
    assert d["scores"][d["best_score"]] is best or d["scores"][d["best_score"]]["rho"] == best["rho"]
    assert r.measure.value == pytest.approx(best["rho"])
    for s in d["scores"].values():
        assert np.asarray(s["per_seed_layer"]).shape == (2, 2)  # seeds x MoE blocks
        assert s["rho"] == pytest.approx(np.nanmean(s["per_seed_layer"]))
    assert np.asarray(d["causal_effect_by_seed_layer"]).shape == (2, 2, 8)
    # The pooled statistic's per-(seed, block) rho equals `moelab intervene`'s own per-block rho.
    for n, blocks in enumerate(d["per_seed_block"]):
        assert sorted(blocks) == ["1", "3"]
        for l, block in enumerate(("1", "3")):
            for name, s in d["scores"].items():
                lib = blocks[block][name]
                assert s["per_seed_layer"][n][l] == pytest.approx(lib["rho"], nan_ok=True)
                assert lib["lo"] <= lib["hi"]
