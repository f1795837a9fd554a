"""The upcycling row at toy scale: the pipeline runs, the copies start identical and the scratch experts
apart, and the per-seed difference is an excess over each model's own null."""

import dataclasses

import pytest

from moelab.claims.registry import all_rows, run_row
from moelab.claims.rows_upcycle import _per_seed, excess
from moelab.claims.verdict import VERDICTS
from moelab.claims.workspace import Scale, Workspace


@pytest.fixture(scope="module")
def result(tmp_path_factory, one_torch_thread):
    scale = dataclasses.replace(Scale.smoke(), threads=1)
    ws = Workspace(tmp_path_factory.mktemp("claims"), scale, log=lambda _: None)
    return run_row(all_rows()["upcycle-specialises-less"], ws)


def test_row_runs_and_reports_its_parts(result):
    assert result.verdict in VERDICTS and result.test.direction == "less" and result.seeds == 2
    assert "768 training tokens" in result.setup and "3 dense + 3 MoE steps" in result.setup
    assert len(result.details["per_seed"]) == 2
    assert result.precondition.needs.startswith("the from-scratch MoE's vocabulary specialisation")
    for seed in result.details["per_seed"]:
        d = seed["vocab_specialisation"]
        assert d["difference"]["ci_low"] <= d["difference"]["value"] <= d["difference"]["ci_high"]
        assert d["upcycled"]["null_mean"] is not None and d["scratch"]["null_mean"] is not None
    assert result.measure.value == pytest.approx(result.details["combined"]["vocab_specialisation"]["value"])
    assert set(result.details["final_loss"]) == {"upcycled-s0", "scratch-s0", "upcycled-s1", "scratch-s1"}
    change = result.details["step0_change"]["upcycled-s0"]  # raw top-2 weights and drops break the function
    assert change["rel_output_change"] > 0 and "not renormalised" in change["breaks_function"]


def test_cosine_starts_at_one_for_copies_and_near_zero_from_scratch(result):
    cos = result.details["expert_cosine"]
    up, scratch = cos["upcycled-s0"], cos["scratch-s0"]
    assert up["steps"][0] == 0 and sorted(up["layers"]) == ["moe0", "moe1"]  # tiny-moe: MoE every 2nd of 4 blocks
    assert all(v[0] == pytest.approx(1.0) for v in up["layers"].values())
    assert all(len(v) == len(up["steps"]) for v in up["layers"].values())
    assert all(abs(v[0]) < 0.1 for v in scratch["layers"].values())


def test_difference_of_excesses_on_planted_headlines():
    def est(value, null):
        return {"value": value, "ci_low": value - 0.02, "ci_high": value + 0.02, "null_mean": null}

    assert excess(est(0.8, 0.3)).value == pytest.approx(0.5)
    same = {"models": {f"{k}-s0": {"headline": {"vocab_specialisation": {"estimate": est(0.8, 0.3)}}}
                       for k in ("upcycled", "scratch")}}
    d = _per_seed(same, 0)["vocab_specialisation"]["difference"]  # the same model twice: nothing
    assert d["value"] == pytest.approx(0.0) and d["ci_low"] < 0 < d["ci_high"]
    less = {"models": {"upcycled-s0": {"headline": {"vocab_specialisation": {"estimate": est(0.7, 0.3)}}},
                       "scratch-s0": {"headline": {"vocab_specialisation": {"estimate": est(0.8, 0.2)}}}}}
    assert _per_seed(less, 0)["vocab_specialisation"]["difference"]["value"] == pytest.approx(-0.2)
