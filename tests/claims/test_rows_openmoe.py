"""The OpenMoE routing rows at smoke scale, through the registry: sane fields, details of the right shape,
and the value recomputed from the details it reports."""

import pytest

from moelab.claims.registry import all_rows, run_row
from moelab.claims.workspace import Scale


def test_context_independent(ws, sane):
    r = run_row(all_rows()["openmoe-context-independent"], ws)
    sane(r, "openmoe-context-independent", "OpenMoE")
    d = r.details
    assert len(d["per_layer"]) == 2 and r.measure.null == 0.0  # tiny-moe: MoE at blocks 1 and 3
    tok, pos = d["token_std"], d["position_std"]
    want = ((tok["value"] - tok["null"]) - (pos["value"] - pos["null"])) / d["ceiling"]
    assert d["per_seed"][0]["value"] == pytest.approx(want)  # seed 0's gap from its own estimates
    assert r.seed_values == [g["value"] for g in d["per_seed"]] and len(r.seed_values) == 2
    assert r.measure.value == pytest.approx(sum(r.seed_values) / 2) and r.verdict == "too few seeds"
    assert 0 < d["ceiling"] < 1


def test_early_routing(ws, sane):
    r = run_row(all_rows()["openmoe-early-routing"], ws)
    sane(r, "openmoe-early-routing", "OpenMoE")
    d = r.details
    assert set(d["per_seed"]) == {"10%", "20%"} and all(len(v) == 2 for v in d["per_seed"].values())
    steps = [c["step"] for c in d["curve_seed0"]]
    assert steps == sorted(steps) and len(steps) == Scale.smoke().steps - 1  # a snapshot each step, final apart
    at20 = d["per_seed"]["20%"][0]
    curve = {c["step"]: c for c in d["curve_seed0"]}[at20["step"]]
    # The pairwise analysis and the whole series agree on the same checkpoint.
    assert at20["top1"]["value"] == pytest.approx(curve["top1_agreement_mean"])
    assert at20["top1"]["null"] == pytest.approx(curve["null_top1_mean"], rel=1e-6)
    per = [p["top1"] for p in d["per_seed"]["20%"]]
    mean_null = sum(p["null"] for p in per) / 2
    assert r.seed_values == pytest.approx([p["value"] - p["null"] + mean_null for p in per])
    assert r.measure.null == pytest.approx(mean_null) and r.verdict == "too few seeds"
    assert r.precondition is not None and "drop" in r.precondition.measured  # the snapshot's regime, measured
    assert all(0 <= v <= 1 for c in d["curve_seed0"] for v in c["top1_agreement"] + c["topk_overlap"])
    assert r.test.margin == pytest.approx((1 - r.measure.null) / 2)


def test_halfway_step_planted_and_never():
    from moelab.claims.rows_openmoe import halfway_step

    def curve(values, null=0.2):
        return [{"step": 10 * (i + 1), "top1_agreement_mean": v, "null_top1_mean": null} for i, v in enumerate(values)]

    assert halfway_step(curve([0.3, 0.59, 0.61, 0.9]), "top1_agreement") == 30  # half way from 0.2 to 1 is 0.6
    assert halfway_step(curve([0.2, 0.3, 0.5]), "top1_agreement") is None
