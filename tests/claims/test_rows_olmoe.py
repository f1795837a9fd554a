"""The OLMoE rows at smoke scale, through the registry."""

import pytest

from moelab.claims.registry import all_rows, run_row


def test_saturation(ws, sane):
    r = run_row(all_rows()["olmoe-saturation"], ws)
    sane(r, "olmoe-saturation", "OLMoE")
    d = r.details
    first = d["curve_seed0"][0]
    assert d["step"] == first["step"]  # the earliest snapshot is the one nearest 10% at smoke scale
    assert d["per_seed"][0]["overlap"]["value"] == pytest.approx(first["topk_overlap_mean"])
    assert d["rise_first_to_last_snapshot_seed0"] == pytest.approx(d["curve_seed0"][-1]["topk_overlap_mean"]
                                                                   - first["topk_overlap_mean"])
    # Every seed's snapshot against its own final checkpoint, paired with its own null.
    per = [p["overlap"] for p in d["per_seed"]]
    mean_null = sum(p["null"] for p in per) / len(per)
    assert len(per) == 2 and r.measure.null == pytest.approx(mean_null)
    assert r.seed_values == pytest.approx([p["value"] - p["null"] + mean_null for p in per])
    assert r.measure.value == pytest.approx(sum(r.seed_values) / 2) and r.verdict == "too few seeds"


def test_vocab_and_domain(ws, sane):
    v = run_row(all_rows()["olmoe-vocab-specialisation"], ws)
    sane(v, "olmoe-vocab-specialisation", "OLMoE")
    assert len(v.details["per_layer"]) == 2 and v.measure.value <= 1
    # Every seed's final checkpoint: the per-seed values are the seeds' own estimates, each paired with its own
    # null (value - null + mean null); 2 smoke seeds decide nothing.
    mean_null = sum(e["null"] for e in v.details["per_seed"]) / 2
    assert v.seed_values == pytest.approx([e["value"] - e["null"] + mean_null for e in v.details["per_seed"]])
    assert len(v.seed_values) == 2 and v.measure.null == pytest.approx(mean_null)
    assert v.verdict == "too few seeds" and v.measure.value == pytest.approx(sum(v.seed_values) / 2)
    assert v.details["domain_max_share"]["value"] > 0  # the smoke trace's budget reaches every domain
    d = run_row(all_rows()["olmoe-domain-specialisation"], ws)
    sane(d, "olmoe-domain-specialisation", "OLMoE")
    shares = d.details["per_domain_max_share_by_layer"]
    assert set(shares) == {"code", "math", "prose"} and all(len(s) == 2 for s in shares.values())
    # Seed 0's value is the mean over its domains and layers.
    assert d.details["per_seed"][0]["value"] == pytest.approx(sum(sum(s) for s in shares.values()) / 6)
    assert d.details["vocab_specialisation"]["value"] == pytest.approx(v.details["per_seed"][0]["value"])
    assert len(d.seed_values) == 2 and d.verdict == "too few seeds"


def test_the_vocabulary_row_goes_on_where_the_trace_holds_one_domain(ws, monkeypatch):
    # One domain traced: no domain headline. The vocabulary row reports it in its details as missing instead
    # of stopping with a KeyError (Python 3.12's stdlib once filled the whole smoke trace with code).
    import moelab.claims.rows_olmoe as rows_olmoe

    real = rows_olmoe.routing_metrics

    def one_domain(w):
        m = real(w)
        return {**m, "headline": {k: v for k, v in m["headline"].items() if k != "max_share:domain"}}

    monkeypatch.setattr(rows_olmoe, "routing_metrics", one_domain)
    v = run_row(all_rows()["olmoe-vocab-specialisation"], ws)
    assert v.details["domain_max_share"] is None and v.measure.value <= 1
