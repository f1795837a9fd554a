"""`moelab analyze --interventions`: intervene and diff results become report sections and metrics entries."""

import json

import pytest

from moelab.cli import main
from moelab.config import MoelabError


def test_intervene_and_diff_results_join_the_report(tiny_run, tmp_path):
    run, corpus = tiny_run / "run", tiny_run / "corpus"
    trace = tmp_path / "t.parquet"
    assert main(["trace", str(run), "--data", str(corpus), "--tokens", "256", "--seq-len", "16",
                 "--out", str(trace)]) == 0
    assert main(["diff", str(trace), str(trace), "--out", str(tmp_path / "d.json")]) == 0
    assert main(["intervene", str(run), "--data", str(corpus), "--out", str(tmp_path / "iv"), "--ablate", "1:0",
                 "--topk-sweep", "--tokens", "128", "--bootstrap", "20"]) == 0
    out = tmp_path / "report"
    assert main(["analyze", str(trace), "--out", str(out), "--permutations", "2", "--bootstrap", "4",
                 "--interventions", str(tmp_path / "iv" / "intervene.json"), str(tmp_path / "d.json")]) == 0
    page = (out / "report.html").read_text()
    assert "Interventions: " in page and "Trace diff: " in page and "Holm" in page
    metrics = json.loads((out / "metrics.json").read_text())
    kinds = {v["kind"] for v in metrics["interventions"].values()}
    assert kinds == {"intervene", "diff"}
    diff = next(v for v in metrics["interventions"].values() if v["kind"] == "diff")
    assert diff["any_layer_differs"] == 0.0  # a trace against itself


@pytest.mark.parametrize("content,msg", [(None, "not found"), ("{", "is not a JSON file"),
                                         ('{"a": 1}', "neither a `moelab intervene` result")])
def test_a_bad_results_file_is_one_line_before_any_analysis(tmp_path, capsys, content, msg):
    bad = tmp_path / "x.json"
    if content is not None:
        bad.write_text(content)
    rc = main(["analyze", str(tmp_path / "missing-trace.parquet"), "--out", str(tmp_path / "r"),
               "--interventions", str(bad)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and msg in err and len(err.splitlines()) == 1
    assert not (tmp_path / "r").exists()


def test_reading_a_results_file_leaves_no_file_open(tmp_path):
    """A report reads every --interventions file; each must be closed when read (was left to the GC)."""
    import gc
    import warnings

    from moelab.report.intervene_section import read_intervention

    good = tmp_path / "d.json"
    good.write_text(json.dumps({"layers": [], "any_layer_differs": 0.0}))
    bad = tmp_path / "x.json"
    bad.write_text("{not json")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        assert read_intervention(str(good))[0] == "diff"
        with pytest.raises(MoelabError, match="not a JSON file"):
            read_intervention(str(bad))
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]
