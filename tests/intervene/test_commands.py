"""`moelab intervene` on a trained tiny run: files, tables, and one-line refusals."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from moelab.cli import main
from moelab.report.intervene_section import ablation_effects, pruning_and_topk


@pytest.fixture(scope="module")
def run(tiny_run):
    return tiny_run


def test_ablation_and_sweeps_write_json_and_deltas(run, tmp_path, capsys):
    out = tmp_path / "iv"
    rc = main(["intervene", str(run / "run"), "--data", str(run / "corpus"), "--out", str(out),
               "--ablate", "0:all", "--ablate", "1:0,1", "--topk-sweep", "--capacity-sweep", "1,none",
               "--tokens", "200", "--bootstrap", "100", "--prune-by", "reap", "--naee-keep", "3"])
    assert rc == 0
    res = json.loads((out / "intervene.json").read_text())
    assert [(r["block"], r["experts"]) for r in res["ablation"]] == [(0, [0]), (0, [1]), (0, [2]), (0, [3]),
                                                                    (1, [0, 1])]
    assert res["tokens"] == 200
    assert all(r["all"]["p_holm"] >= r["all"]["p"] for r in res["ablation"])
    assert res["topk"]["k=2"]["delta"]["all"]["mean"] == 0.0  # the model's own k
    assert set(res["topk"]) == {"none", "k=1", "k=2", "k=3", "k=4"}
    assert set(res["capacity"]) == {"none", "cf=1.0,openmoe", "cf=1.0,score", "cf=none,openmoe", "cf=none,score"}
    assert set(res["k1_cosine"]) == {"0", "1"}
    ovc = res["observational_vs_causal"]
    assert set(ovc) == {"0"} and set(ovc["0"]["scores"]) == {"frequency", "gate_weighted", "activation_norm", "reap"}
    assert [r["all"]["mean"] for r in res["ablation"][:4]] == pytest.approx(ovc["0"]["causal_effect"], abs=1e-6)
    assert [c["removed_per_layer"] for c in res["pruning"]["curve"]] == [0, 1, 2]
    assert res["pruning"]["curve"][0]["loss"] == pytest.approx(res["topk"]["none"]["loss"]["all"]["mean"], abs=1e-5)
    single = [r["all"]["mean"] for r in res["ablation"][:4]]
    naee = res["naee"]["0"]  # keep 3 of 4 = remove one: the cheapest single ablation
    assert len(naee["subsets"]) == 4 and naee["removed"] == [int(np.argmin(single))]
    assert sorted(s["delta"] for s in naee["subsets"]) == pytest.approx(sorted(single), abs=1e-6)
    assert len(ablation_effects(res).axes[0].get_xticklabels()) == 5
    assert len(pruning_and_topk(res).axes) == 2
    deltas = pq.read_table(out / "ablation_deltas.parquet")
    assert deltas.num_rows == 5 * 200
    first = deltas.slice(0, 200).column("delta").to_numpy()
    assert abs(first.mean() - res["ablation"][0]["all"]["mean"]) < 1e-5
    printed = capsys.readouterr().out
    assert "top-k sweep" in printed and "capacity sweep" in printed and "p_holm" in printed


@pytest.mark.parametrize("extra,msg", [
    (["--ablate", "0:9"], "expert 9 is out of range"),
    (["--ablate", "5:0"], "block 5 is not an MoE layer"),
    (["--ablate", "zero"], "is not BLOCK:E"),
    (["--capacity-sweep", "1,x"], "is not a number or none"),
    (["--capacity-sweep", "1", "--policies", "fifo"], "--policies 'fifo'"),
    (["--capacity-sweep", "nan"], "--capacity-sweep 'nan' must be a finite number"),
    (["--capacity-sweep", "1,inf"], "--capacity-sweep 'inf' must be a finite number"),
    (["--capacity-factor", "nan", "--ablate", "0:0"], "--capacity-factor 'nan' must be a finite number"),
    (["--capacity-factor", "inf", "--ablate", "0:0"], "--capacity-factor 'inf' must be a finite number"),
    ([], "nothing to do"),
    (["--ablate", "1:0", "--naee-keep", "1"], "top_k <= N < E"),
    (["--ablate", "1:0,1", "--prune-by", "reap"], "--prune-by needs"),
])
def test_bad_input_is_one_line_and_exit_2(run, tmp_path, capsys, extra, msg):
    rc = main(["intervene", str(run / "run"), "--data", str(run / "corpus"), "--out", str(tmp_path / "o"),
               "--tokens", "50", *extra])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and msg in err and "\n" not in err
    assert not (tmp_path / "o").exists()


def test_out_holding_a_result_is_refused_unless_overwrite(run, tmp_path, capsys):
    out = tmp_path / "iv"
    common = ["intervene", str(run / "run"), "--data", str(run / "corpus"), "--out", str(out), "--tokens", "50",
              "--bootstrap", "20"]
    assert main([*common, "--ablate", "0:0"]) == 0
    before = (out / "intervene.json").read_text()
    assert json.loads(before)["ablate_capacity"] == "recompute"  # the default, named in the result
    capsys.readouterr()
    assert main([*common, "--ablate", "0:1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "is not empty" in err and "--overwrite" in err and "\n" not in err
    assert (out / "intervene.json").read_text() == before  # the earlier result untouched
    assert main([*common, "--topk-sweep", "--overwrite"]) == 0
    res = json.loads((out / "intervene.json").read_text())
    assert "topk" in res and "ablation" not in res
    assert not (out / "ablation_deltas.parquet").exists()  # the earlier run's deltas do not stay behind


def test_missing_checkpoint_is_one_line(tmp_path, capsys):
    assert main(["intervene", str(tmp_path / "nope"), "--data", str(tmp_path), "--out", str(tmp_path / "o"),
                 "--ablate", "0:0"]) == 2
    assert "checkpoint not found" in capsys.readouterr().err


def test_replay_of_own_trace_changes_nothing_and_another_corpus_is_refused(run, tmp_path, capsys):
    ckpt, corpus = str(run / "run"), str(run / "corpus")
    trace = tmp_path / "t.parquet"
    assert main(["trace", ckpt, "--data", corpus, "--tokens", "300", "--out", str(trace)]) == 0
    assert main(["intervene", ckpt, "--data", corpus, "--out", str(tmp_path / "iv"), "--replay", str(trace),
                 "--tokens", "200", "--bootstrap", "50"]) == 0
    rep = json.loads((tmp_path / "iv" / "intervene.json").read_text())["replay"]
    assert rep["routes_changed"] == 0.0 and rep["delta"]["all"]["mean"] == 0.0
    other = tmp_path / "o.parquet"
    assert main(["trace", ckpt, "--data", corpus, "--split", "train", "--tokens", "100", "--out", str(other)]) == 0
    capsys.readouterr()
    assert main(["intervene", ckpt, "--data", corpus, "--out", str(tmp_path / "iv2"), "--replay", str(other),
                 "--tokens", "100"]) == 2
    err = capsys.readouterr().err.strip()
    assert "other tokens than the corpus row" in err and "\n" not in err
    assert not (tmp_path / "iv2").exists()



class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


def test_pickled_replay_and_corrupt_traces_run_nothing(run, tmp_path, capsys):
    marker = tmp_path / "marker"
    bad_npy = tmp_path / "r.npy"
    np.save(bad_npy, np.array([_Payload(marker)], dtype=object), allow_pickle=True)
    assert main(["intervene", str(run / "run"), "--data", str(run / "corpus"), "--out", str(tmp_path / "o"),
                 "--replay", str(bad_npy), "--tokens", "50"]) == 2
    corrupt = tmp_path / "t.parquet"
    corrupt.write_bytes(b"PAR1 not really")
    assert main(["diff", str(corrupt), str(corrupt)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "pickled" in err[0] and "not a readable Parquet" in err[1]
    assert not marker.exists()
