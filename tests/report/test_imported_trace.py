"""A trace imported from a tool that records neither token ids nor router probabilities (a router-replay
array) still gets every analysis it can answer, and the report says which ones it cannot and why."""

import json

import numpy as np

from moelab.analysis.suite import analyze_all
from moelab.cli import main
from moelab.trace.io import open_trace


def _replay(tmp_path, tokens=3000, layers=3, E=8, k=2):
    rng = np.random.default_rng(0)
    ids = np.stack([[rng.choice(E, k, replace=False) for _ in range(layers)] for _ in range(tokens)]).astype(np.int32)
    src = tmp_path / "replay.npy"
    np.save(src, ids)
    out = tmp_path / "t.parquet"
    assert main(["trace", "import", "replay", str(src), "--out", str(out), "--num-experts", str(E)]) == 0
    return out


def test_analyses_without_tokens_or_probs_skip_only_what_needs_them(tmp_path):
    trace = open_trace(_replay(tmp_path))
    assert "token" not in trace.columns and "prob" not in trace.columns
    results = analyze_all(trace, n_permutations=2, n_bootstrap=4)
    assert set(results["skipped"]) == {"token", "gates", "intervals"}  # one replay array = one sequence
    assert "1 sequence" in results["skipped"]["intervals"]
    assert np.isnan(results["std_position"].overall.ci_low)  # withheld, not a zero-width interval
    assert "router-replay" in results["skipped"]["gates"]  # the importer's reason is carried through
    for gone in ("vocab", "std_token", "top_tokens", "gates"):
        assert gone not in results
    for kept in ("load", "std_position", "coactivation", "drops"):
        assert kept in results


def test_analyze_verb_reports_an_imported_trace(tmp_path, capsys):
    trace = _replay(tmp_path)
    out = tmp_path / "report"
    assert main(["analyze", str(trace), "--out", str(out), "--permutations", "2", "--bootstrap", "4"]) == 0
    html = (out / "report.html").read_text()
    assert "No gate entropy" in html and "No vocabulary specialisation" in html and "No intervals" in html
    metrics = json.loads((out / "metrics.json").read_text())
    assert "std_position" in json.dumps(metrics)


def test_gate_table_says_what_sigmoid_scores_measure():
    from moelab.analysis.gates import gate_stats
    from moelab.report.sections import gates_section

    # One layer, two tokens, top-2 of 4, sigmoid scores: each in (0, 1), not summing to 1 over the experts.
    scores_TE = np.array([[0.9, 0.8, 0.2, 0.1], [0.7, 0.6, 0.5, 0.4]], np.float32)
    batch = {"seq": np.zeros(4, np.int64), "pos": np.repeat([0, 1], 2).astype(np.int32),
             "layer": np.zeros(4, np.int16), "rank": np.tile([0, 1], 2).astype(np.int8),
             "expert": np.tile([0, 1], 2).astype(np.int16), "prob": scores_TE[:, :2].reshape(-1),
             "probs": scores_TE, "probs.rows": np.array([0, 2])}
    results = {"gates": gate_stats(batch, [4], 2)}
    softmax, sigmoid = gates_section(results), gates_section(results, "sigmoid")
    assert not any("sigmoid" in getattr(b, "text", "") for b in softmax.blocks)
    assert "sigmoid" in sigmoid.blocks[0].text and "normalised to sum to 1" in sigmoid.blocks[0].text
    table = sigmoid.blocks[-1]
    assert table.rows[0][-1] == "n/a" and softmax.blocks[-1].rows[0][-1] == "0.50"  # k/E only for softmax


def test_sequences_are_counted_across_batch_cuts():
    from moelab.analysis.suite import SequenceCounter

    counter = SequenceCounter()
    for seq in ([0, 0, 1], [1, 1, 2], [2], [5, 5]):  # sequence 1 and 2 straddle a cut
        counter.update({"seq": np.array(seq)})
    assert counter.count == 4
