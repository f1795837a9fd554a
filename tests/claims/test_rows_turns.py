"""The drop-towards-the-end row at toy scale on the doctest conversations, and its small helpers on
planted numbers (a model that drops nothing has no excess)."""

import dataclasses

import pytest

from moelab.claims.registry import all_rows, run_row
from moelab.claims.rows_turns import MIN_SEQ_LEN, _turn_gap, reach
from moelab.claims.verdict import VERDICTS
from moelab.claims.workspace import Scale, Workspace


@pytest.fixture(scope="module")
def result(tmp_path_factory, one_torch_thread):
    ws = Workspace(tmp_path_factory.mktemp("claims"), dataclasses.replace(Scale.smoke(), threads=1),
                   log=lambda _: None)
    return run_row(all_rows()["openmoe-drop-towards-end"], ws)


def test_row_runs_on_real_conversations(result):
    assert result.verdict in VERDICTS and result.seeds == 2 and result.measure.null == 0.0
    d = result.details
    assert d["conversations"] > 100 and d["traced_tokens"] == Scale.smoke().trace_tokens
    assert len(d["per_seed"]) == 2
    for seed in d["per_seed"]:
        assert 0.0 <= seed["overall"] <= 1.0
        assert "0" in seed["share_by_turn"] or 0 in seed["share_by_turn"]  # conversations have turns
        if seed["excess"] is not None:
            assert seed["excess"]["value"] == pytest.approx(seed["rise"]["value"] - seed["queue_rise"])
    assert result.measure.ci_low <= result.measure.value <= result.measure.ci_high
    # The paper's statistic: the raw rise per seed, the queue's part a detail; the long runs' traced rows reach
    # the paper's positions (measured from the traces' positions, not the setting).
    assert result.seed_values == [s["rise"]["value"] for s in d["per_seed"]]
    assert result.precondition.met and result.precondition.measured == "2048-token sequences"


def test_reach_needs_the_papers_positions():
    assert not reach(128).met and reach(MIN_SEQ_LEN).met and not reach(MIN_SEQ_LEN - 1).met


def test_turn_gap_by_hand():
    seeds = [{"s": {"0": 0.1, "1": 0.2, "2": 0.3, "3": 0.5}}, {"s": {"0": 0.2, "2": 0.2}}]
    assert _turn_gap(seeds, "s") == pytest.approx(((0.4 - 0.1) + 0.0) / 2)
    assert _turn_gap([{"s": {"1": 0.3}}], "s") is None
