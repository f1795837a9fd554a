"""build_report on planted traces: the page, its sections and figures, metrics.json against analyze_all,
checkpoint series, and no output at all when an input is bad."""

import json

import numpy as np
import pytest

from moelab.analysis import analyze_all, early_routing, to_json_dict
from moelab.config import MoelabError
from moelab.report.build import build_report, queue_setting
from moelab.trace.io import open_trace

from .conftest import SEQ_LEN, assert_self_contained, html_sections, write_planted

SIMULATE = {"capacity_factor": 1.25, "batch_seqs": 8}
OPTIONS = {"min_count": 20}


@pytest.fixture(scope="module")
def planted_report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("planted")
    trace = write_planted(tmp / "token.parquet", "token")
    metrics = build_report([trace], tmp / "out", simulate=SIMULATE, options=OPTIONS, dpi=60)
    return trace, tmp / "out", metrics


def test_report_is_one_self_contained_page_with_a_figure_per_section(planted_report):
    _, out, metrics = planted_report
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "report.html"]
    page = (out / "report.html").read_text()
    assert_self_contained(page)
    sections = html_sections(page)
    assert sections["Summary"] == 0 and sections["Trace"] == 0
    assert sections["Expert load"] == 1 and sections["Co-activation"] == 1
    assert sections["Token drops by position"] == 1 and sections["Routing distributions"] == 1
    assert sections["Expert outputs"] == 2  # rank table, output similarity
    # scores, domain heatmap, position heatmap, MI bars (one language only: a note instead of its heatmap)
    assert sections["Expert specialisation"] == 4 and "Only one language" in page
    assert page.count("<figcaption>") == page.count("<img ")
    assert "vocabulary specialisation 1.00 [1.00, 1.00] (null 0." in page  # value [interval] (null mean ± sd)
    assert "explains" in page and "queue alone" in page  # the trained drops beside their queue-only baseline


def test_metrics_hold_analyze_all_numbers(planted_report):
    trace, out, metrics = planted_report
    saved = json.loads((out / "metrics.json").read_text())
    model = saved["models"]["token"]
    trace = open_trace(trace)
    results = analyze_all(trace, simulate=SIMULATE, queue=queue_setting(trace.meta, SIMULATE), **model["options"])
    assert model["options"]["pos_bucket"] == SEQ_LEN // 16  # 1/16 of the traced length
    assert model["analyses"] == to_json_dict(results)
    head = model["headline"]
    assert head["vocab_specialisation"]["value"] == pytest.approx(np.mean(results["vocab"].rescaled))
    assert head["std_token"]["value"] == pytest.approx(results["std_token"].mean_over_layers)
    assert head["std_position"]["null"] == pytest.approx(results["std_position"].null_over_layers)
    assert head["load_imbalance"]["value"] == pytest.approx(np.mean(results["load"].max_over_mean))
    assert head["drop_share"]["value"] == pytest.approx(results["drops"].overall)
    assert head["drop_share_end"]["null"] == pytest.approx(results["queue:trained"].queue_rise.value)
    assert head["drop_share_end"]["estimate"]["value"] == pytest.approx(head["drop_share_end"]["value"])
    assert head["drop_share_excess"]["value"] == pytest.approx(results["queue:trained"].excess.value)
    assert head["std_token"]["estimate"]["n_permutations"] == 16 and head["std_token"]["estimate"]["n_bootstrap"] > 0
    assert head["drop_share_simulated"]["value"] == pytest.approx(results["drops_simulated"].overall)
    assert saved["summary"] == metrics["summary"] and len(saved["summary"]) >= 5
    assert {k: v for k, v in metrics.items() if k != "files"} == saved


def test_checkpoints_of_one_model_get_early_routing(tmp_path):
    paths = [write_planted(tmp_path / f"s{s}.parquet", step=s, shift=f, all_experts=False)
             for s, f in ((300, 0.0), (100, 0.6), (200, 0.3))]  # given out of order
    metrics = build_report(paths, tmp_path / "out", options={"analyses": ("load",)}, dpi=60)
    assert metrics["mode"] == "checkpoints" and list(metrics["models"]) == ["s300"]
    early = metrics["models"]["s300"]["early"]
    assert early["traces"] == [str(tmp_path / f"s{s}.parquet") for s in (100, 200, 300)]
    ref = early_routing([open_trace(p) for p in early["traces"]])
    assert early["result"] == ref.to_dict() and ref.steps == [100, 200]
    assert np.all(np.diff(np.asarray(ref.topk_overlap), axis=0) > 0)  # closer to the final step by step
    page = (tmp_path / "out" / "report.html").read_text()
    assert html_sections(page)["Early routing learning"] == 1
    assert "top-2 overlap with the final checkpoint already" in page


def test_early_series_for_a_named_model_ends_at_its_own_trace(tmp_path):
    final = write_planted(tmp_path / "final.parquet", step=300, all_experts=False)
    series = [write_planted(tmp_path / f"s{s}.parquet", step=s, shift=f, all_experts=False)
              for s, f in ((200, 0.3), (100, 0.6))]
    metrics = build_report([final], tmp_path / "out", early={"tiny-moe": series},
                           options={"analyses": ("load",)}, dpi=60)
    model = metrics["models"]["tiny-moe"]  # the one unnamed model takes the series' name
    assert model["early"]["traces"] == [str(p) for p in series[::-1]] + [str(final)]
    assert model["early"]["result"]["steps"] == [100, 200]


def test_early_series_without_steps_ends_at_the_analysed_trace(tmp_path):
    """Traces of a hub model's revisions record no step: `analyze FINAL --early A B` is A, B, then FINAL in that
    order. It used to leave FINAL out and measure A against B."""
    final = write_planted(tmp_path / "final.parquet", all_experts=False)
    series = [write_planted(tmp_path / f"r{i}.parquet", shift=f, all_experts=False) for i, f in ((1, 0.6), (2, 0.3))]
    for i, given in enumerate((series, series + [final])):  # naming the final trace again changes nothing
        metrics = build_report([final], tmp_path / f"out{i}", early={"m": given}, options={"analyses": ("load",)},
                               dpi=60)
        early = metrics["models"]["m"]["early"]
        assert early["traces"] == [str(p) for p in series + [final]]
        ref = early_routing([open_trace(p) for p in early["traces"]])
        assert early["result"] == {**ref.to_dict(), "steps": ["checkpoint 1", "checkpoint 2"]}
        assert np.all(np.diff(np.asarray(ref.topk_overlap), axis=0) > 0)  # closer to the final one in order
    with pytest.raises(MoelabError, match="r1.parquet records no checkpoint_step, so their order is unknown"):
        stepped = write_planted(tmp_path / "stepped.parquet", step=300, all_experts=False)
        build_report([stepped], tmp_path / "out2", early={"m": series[:1]}, options={"analyses": ("load",)})


def test_different_models_are_compared_side_by_side(tmp_path):
    a = write_planted(tmp_path / "a.parquet", "token", all_experts=False)
    b = write_planted(tmp_path / "b.parquet", "position", all_experts=False,
                      config={"max_seq_len": 32, "moe": {"router": {"kind": "rmoe"}}})
    metrics = build_report([a, b], tmp_path / "out", names=["tok", "pos"], options={"analyses": ("load",)}, dpi=60)
    assert metrics["mode"] == "compare" and list(metrics["models"]) == ["tok", "pos"]
    page = (tmp_path / "out" / "report.html").read_text()
    sections = html_sections(page)
    assert list(sections) == ["Summary", "Comparison", "tok", "Trace", "Expert load", "pos", "Trace #2",
                              "Expert load #2"]
    assert sections["Expert load"] == sections["Expert load #2"] == 1
    assert "<th>metric</th><th>tok</th><th>pos</th>" in page
    assert '<p class="group">pos</p><ul><li>expert load max/mean' in page
    assert metrics["summary"][0].startswith("tok: expert load max/mean")
    load = {n: metrics["models"][n]["headline"]["load_imbalance"]["value"] for n in ("tok", "pos")}
    row = f"<td>load max/mean</td><td>{load['tok']:.3g} (null"
    assert row in page


def test_bad_input_leaves_no_report(tmp_path):
    good = write_planted(tmp_path / "good.parquet", all_experts=False)
    other = write_planted(tmp_path / "other.parquet", step=200, all_experts=False,
                          config={"max_seq_len": 32, "moe": {"router": {"kind": "rmoe"}}})
    mine = write_planted(tmp_path / "mine.parquet", step=100, all_experts=False)
    out = tmp_path / "out"
    with pytest.raises(MoelabError, match="different models"):
        build_report([good], out, early={"x": [mine, other]}, options={"analyses": ("load",)})
    with pytest.raises(MoelabError, match="not found"):
        build_report([good, tmp_path / "missing.parquet"], out)
    with pytest.raises(MoelabError, match="one checkpoint per model"):
        build_report([good], out, weights=["a", "b"])
    with pytest.raises(MoelabError, match="unknown analysis option"):
        build_report([good], out, options={"bogus": 1})
    assert not out.exists()
    out.mkdir()
    with pytest.raises(MoelabError, match="capacity_factor"):
        build_report([good], out, simulate={"batch_seqs": 8}, options={"analyses": ("drops",)})
    assert list(out.iterdir()) == []


def test_one_early_trace_that_cannot_precede_the_final_names_why(tmp_path):
    """It always said "needs at least two checkpoint traces of one model", whatever the cause."""
    final = write_planted(tmp_path / "final.parquet", step=300, all_experts=False)
    cases = {
        "other": (dict(step=100, config={"max_seq_len": 32, "moe": {"router": {"kind": "rmoe"}}}),
                  "other.parquet and the final trace .*final.parquet are different models "
                  r"\(model.moe.router.kind \('rmoe' vs 'linear'\)\)"),
        "short": (dict(step=100, num_seqs=16), "short.parquet holds 2,048 rows and the final trace .* 3,072: "
                                                "checkpoint traces must cover the same tokens"),
        "same": (dict(step=300), r"same.parquet is from step 300, the same as the final trace .* \(step 300\)"),
        "later": (dict(step=400), r"later.parquet is from step 400, after the final trace"),
        "nostep": (dict(), "nostep.parquet records no checkpoint_step"),
    }
    for name, (kw, match) in cases.items():
        early = write_planted(tmp_path / f"{name}.parquet", all_experts=False, **kw)
        with pytest.raises(MoelabError, match="early routing needs at least two checkpoint traces of one model: .*"
                                              + match):
            build_report([final], tmp_path / "out", early={"m": [early]}, options={"analyses": ("load",)})
    with pytest.raises(MoelabError, match="final.parquet is the final trace itself"):
        build_report([final], tmp_path / "out", early={"m": [final]}, options={"analyses": ("load",)})
    assert not (tmp_path / "out").exists()


def test_a_corrupt_early_trace_is_named_as_corrupt(tmp_path):
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    final = write_planted(tmp_path / "final.parquet", step=300, all_experts=False)
    early = write_planted(tmp_path / "early.parquet", step=300, all_experts=False)
    table = pq.read_table(early)  # the file's own metadata travels with its schema
    i = table.schema.get_field_index("expert")
    table = table.set_column(i, table.schema.field(i), pc.add(table.column(i), 99).cast(table.column(i).type))
    pq.write_table(table, early)
    with pytest.raises(MoelabError, match="early.parquet declares num_experts=4 but holds expert 10[0-2]"):
        build_report([final], tmp_path / "out", early={"m": [early]}, options={"analyses": ("load",)})
