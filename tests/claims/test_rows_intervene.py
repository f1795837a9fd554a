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
    assert len(seeds) == 2 and r.verdict in ("too few seeds", "not testable here")  # smoke: 2 seeds
    # The per-seed share is k=1's cost over the control's, from the per-seed losses the details report.
    for s, share in zip(seeds, r.seed_values):
        want = (s["loss_k1"] - s["loss_own_k"]) / (s["loss_no_routed"] - s["loss_own_k"])
        assert share == pytest.approx(want, rel=1e-9) or (np.isnan(share) and s["loss_no_routed"] <= s["loss_own_k"])
        cos = list(s["cosine_k1_vs_own_by_block"].values()) + list(s["cosine_k1_vs_all_by_block"].values())
        assert sorted(s["cosine_k1_vs_own_by_block"]) == ["1", "3"] and all(-1 <= c <= 1 for c in cos)
    assert r.measure.null == 1.0 and r.precondition is not None


def test_one_expert_negative_control(ws):
    """Routed experts that output nothing: removing them all costs nothing, so the row must not sign."""
    import copy

    import torch

    from moelab.claims.record import ClaimResult
    from moelab.claims.rows_intervene import _held_out, control_losses, one_expert_decision
    from moelab.claims.verdict import Claim, Measure
    from moelab.intervene.edit import moe_blocks

    model, batches, cf = _held_out(ws, 0)
    zeroed = copy.deepcopy(model)  # the independent reference: routed experts' weights physically zero
    with torch.no_grad():
        for layer in moe_blocks(zeroed).values():
            layer.experts.w_out_EFD.zero_()
    ref, hooked = control_losses(zeroed, batches, cf), control_losses(model, batches, cf)
    # The hook's control equals the physically emptied model (its own-k loss).
    assert np.allclose(hooked["none"], ref["own"], atol=1e-4)
    assert np.allclose(ref["none"], ref["own"], atol=1e-4) and np.allclose(ref["k1"], ref["own"], atol=1e-4)
    shares, regime, control = one_expert_decision([ref, ref, ref])
    assert not regime.met and abs(control.value) < 1e-6
    r = ClaimResult(row="nc", paper="Interventions", claim="c", paper_number="p", measured="m",
                    measure=Measure(0.0, 0.0, 0.0, 1.0), test=Claim("less", 0.5), setup="s", seeds=3,
                    seed_values=[0.1, 0.1, 0.1], precondition=regime)  # even with shares that would sign
    assert r.verdict == "not testable here"
    # The unmodified model's control does cost something (the precondition can be met).
    assert float((hooked["none"] - hooked["own"]).sum()) > 0


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
