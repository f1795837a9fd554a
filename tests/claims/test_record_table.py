import json

import numpy as np
import pytest

from moelab.claims.heldout import two_level_bootstrap
from moelab.claims.record import ClaimResult, read_results, write_result
from moelab.claims.table import render
from moelab.claims.verdict import Claim, Measure
from moelab.config import MoelabError


def result(row="r1", value=0.3, paper="OpenMoE"):
    return ClaimResult(row=row, paper=paper, claim="c", paper_number="p", measured="m",
                       measure=Measure(value, value - 0.1, value + 0.1, 0.0, 0.01), test=Claim("greater", 0.05),
                       setup="s", seeds=3, details={"x": [float("nan"), 1.0]},
                       seed_values=[value - 0.05, value, value + 0.05])  # t-interval: value +- 0.124


def test_roundtrip_recomputes_the_verdict(tmp_path):
    write_result(result(), tmp_path)
    d = json.loads((tmp_path / "r1.json").read_text())
    assert d["verdict"] == "reproduced" and d["details"]["x"] == [None, 1.0]
    d["verdict"], d["seed_values"] = "reproduced", [-1.0, 0.3, 0.3]  # a hand-edited result cannot keep its verdict
    (tmp_path / "r1.json").write_text(json.dumps(d))
    assert read_results(tmp_path)["r1"].verdict == "inconclusive"


def test_corrupt_result_is_one_error(tmp_path):
    (tmp_path / "bad.json").write_text('{"schema": 1, "row": "x"}')
    with pytest.raises(MoelabError, match="bad.json is not a claims result"):
        read_results(tmp_path)
    (tmp_path / "bad.json").write_text("[1")
    with pytest.raises(MoelabError, match="not readable JSON"):
        read_results(tmp_path)


def test_render_orders_by_paper_and_lists_missing_rows():
    md = render({"b": result("b", paper="RMoE"), "a": result("a", -0.5)}, ["a", "b", "c"])
    assert md.index("## OpenMoE") < md.index("## RMoE") < md.index("### a") < md.index("### b")
    assert "Not yet run: c" in md and "1 reproduced, 1 not reproduced, 0 inconclusive, 0 too few seeds, 0 not testable here" in md


def test_two_level_bootstrap_planted_effect_and_nothing():
    rng = np.random.default_rng(0)
    counts_S = rng.integers(50, 100, 300).astype(float)
    noise_NS = rng.normal(0, 0.5, (3, 300)) * np.sqrt(counts_S)
    v, lo, hi = two_level_bootstrap(noise_NS, counts_S)  # nothing: the interval holds 0
    assert lo < 0 < hi
    v, lo, hi = two_level_bootstrap(noise_NS + 0.2 * counts_S, counts_S)  # 0.2 per token planted
    assert lo < 0.2 < hi and lo > 0.1
    # A seed effect: seeds disagree by far more than the sequences' noise, so the interval must widen.
    seeded_NS = noise_NS + np.array([[0.0], [0.4], [0.8]]) * counts_S
    _, lo2, hi2 = two_level_bootstrap(seeded_NS, counts_S)
    _, lo1, hi1 = two_level_bootstrap(seeded_NS[:1], counts_S)
    assert hi2 - lo2 > 5 * (hi1 - lo1)


def test_render_compares_a_second_run_and_names_moved_verdicts():
    first = {"a": result("a", 0.3), "b": result("b", 0.3), "c": result("c", 0.3)}
    second = {"a": result("a", 0.31), "b": result("b", 0.0), "c": result("c", 0.0)}  # b: reproduced -> inconclusive
    second["c"].seed_values = [0.0, 0.1]  # c's second run has fewer seeds: named, not compared
    md = render(first, ["a", "b", "c"], second, "Re-run at 2 threads.")
    assert "Re-run at 2 threads. 1 of 2 comparable verdicts held; these moved: b." in md
    assert "| b | reproduced | 0.3 [0.176, 0.424] | **inconclusive** |" in md
    assert "Not compared (1;" in md and "): c." in md and "| c |" not in md.split("## A second run")[1].split("##")[0]
    assert "## A second run" not in render(first, ["a", "b"])


def test_fewer_than_three_seeds_signs_nothing_and_the_change_is_named(tmp_path):
    two = ClaimResult(row="two", paper="RMoE", claim="c", paper_number="p", measured="m",
                      measure=Measure(0.3, 0.29, 0.31, 0.0), test=Claim("greater"), setup="s", seeds=2,
                      seed_values=[0.3, 0.3001])  # two seeds that agree: still no verdict
    assert two.verdict == "too few seeds"
    one = ClaimResult(row="one", paper="OLMoE", claim="c", paper_number="p", measured="m",
                      measure=Measure(0.9, 0.89, 0.91, 0.2), test=Claim("greater", 0.1), setup="s", seeds=1)
    assert one.seed_values == [0.9] and one.verdict == "too few seeds"
    write_result(one, tmp_path)
    d = json.loads((tmp_path / "one.json").read_text())
    d["verdict"], d["seed_values"], d["previous_verdict"] = "reproduced", [], ""  # as stored by the old rule
    (tmp_path / "one.json").write_text(json.dumps(d))
    back = read_results(tmp_path)["one"]
    assert back.previous_verdict == "reproduced" and back.verdict == "too few seeds"
    md = render({"one": back}, ["one"])
    assert "## Verdicts changed by the current rule" in md and "| one | reproduced | **too few seeds** |" in md


def test_committed_per_seed_values_give_the_audits_interval():
    # rmoe-np-ablation's two committed seeds: the audit's t-interval [-0.30, +0.21] (2 seeds: no verdict).
    r = ClaimResult(row="rmoe-np-ablation", paper="RMoE", claim="c", paper_number="p", measured="m",
                    measure=Measure(-0.046, -0.07, -0.022, 0.0), test=Claim("greater", 0.0155), setup="s", seeds=2,
                    details={"per_seed": [{"np": 4.841273091149445, "gru": 4.907409160378942},
                                          {"np": 4.934028077387638, "gru": 4.960494960518745}]})
    assert r.measure.ci_low == pytest.approx(-0.298, abs=0.001) and r.measure.ci_high == pytest.approx(0.206, abs=0.001)
    assert r.verdict == "too few seeds" and r.details["sequence_level_measure"]["ci_low"] == -0.07


def test_a_settled_check_decided_by_the_older_rule_counts_as_unmet(tmp_path):
    """A stored result whose "stopped moving" precondition passed the older rule (a late-slope interval holding
    0, which a moving curve passes) is re-decided as not testable, named in the changed-verdicts section."""
    from moelab.claims.verdict import Precondition

    r = result("old-rule")
    r.precondition = Precondition("a training-loss gap that has stopped moving (slope over the last 20% of steps "
                                  "with a 95% interval holding 0)", "slope +0.121 nats per 1000 steps [-0.497, "
                                  "+0.739] over steps >= 322", True)
    write_result(r, tmp_path)
    d = json.loads((tmp_path / "old-rule.json").read_text())
    d["precondition"]["met"], d["verdict"] = True, "reproduced"  # as the older code stored it
    (tmp_path / "old-rule.json").write_text(json.dumps(d))
    back = read_results(tmp_path)["old-rule"]
    assert back.verdict == "not testable here" and "older rule" in back.reason and "[-0.497, +0.739]" in back.reason
    changed = render({"old-rule": back}, ["old-rule"]).split("## Verdicts changed by the current rule")[1]
    assert "| old-rule | reproduced | **not testable here** |" in changed
    fresh = result("new-rule")  # the equivalence rule's wording is kept as measured
    fresh.precondition = Precondition("a training-loss gap that has stopped moving: over the last 20% of steps it "
                                      "moved by less than 0.0261 nats either way", "moved +0.001", True)
    write_result(fresh, tmp_path)
    assert read_results(tmp_path)["new-rule"].verdict == "reproduced"


def test_audit_section_names_every_changed_verdict_and_added_row(tmp_path):
    from moelab.claims.table import read_audit

    audit_file = tmp_path / "audit.json"
    audit_file.write_text(json.dumps({"commit": "abc1234", "about": "the audited table",
                                      "verdicts": {"a": "reproduced", "b": "not reproduced"}}))
    audit = read_audit(audit_file)
    rows = {"a": result("a", 0.3), "b": result("b", 0.3), "c": result("c", 0.3)}  # all reproduced now
    md = render(rows, ["a", "b", "c"], audit=audit).split("## Since the audit")[1].split("\n## ")[0]
    assert "1 of 2 verdicts changed, 1 rows added" in md and "(commit abc1234)" in md
    assert "| b | not reproduced | **reproduced** |" in md and "| c | (new row) | **reproduced** |" in md
    assert "| a |" not in md
    assert read_audit(tmp_path / "absent.json") == {}
    audit_file.write_text("{not json")
    with pytest.raises(MoelabError, match="audit.json: not an audit verdicts file"):
        read_audit(audit_file)
