"""The expert view shows an expert's measured ablation effect from `moelab intervene` results."""

import json

import pytest

from moelab.config import MoelabError
from moelab.explore.commands import build_explorer


def _result(path, rows):
    path.write_text(json.dumps({"tokens": 100, "ablation": rows}))
    return str(path)


def test_the_expert_view_finds_its_single_expert_ablation(tmp_path, traces):
    row = lambda block, experts, mean: {"block": block, "experts": experts,  # noqa: E731
                                        "all": {"mean": mean, "lo": mean - 0.01, "hi": mean + 0.01, "p": 0.01,
                                                "p_holm": 0.04}}
    res = _result(tmp_path / "iv.json", [row(1, [5], 0.25), row(1, [5, 6], 0.5), row(3, [5], 0.75)])
    ex = build_explorer([str(traces[0])], interventions=[res])
    src = ex.sources[0]
    src.meta.extra["moe_blocks"] = [1, 3, 5]  # MoE layer l sits in block 2l + 1
    got = ex.expert({"layer": "0", "expert": "5"}, wait=60)["ablation"]
    assert [(a["block"], a["mean"]) for a in got] == [(1, 0.25)]  # not the pair ablation, not block 3's
    assert ex.expert({"layer": "1", "expert": "5"}, wait=60)["ablation"][0]["mean"] == 0.75
    assert ex.expert({"layer": "0", "expert": "4"}, wait=60)["ablation"] == []  # not measured
    del src.meta.extra["moe_blocks"]
    assert ex.expert({"layer": "0", "expert": "5"}, wait=60)["ablation"] == []  # no block map: nothing claimed


def test_a_diff_result_is_refused_as_interventions(tmp_path, traces):
    bad = tmp_path / "d.json"
    bad.write_text(json.dumps({"layers": [], "any_layer_differs": 0.0}))
    with pytest.raises(MoelabError, match="is a `moelab diff` result"):
        build_explorer([str(traces[0])], interventions=[str(bad)])
