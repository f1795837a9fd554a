"""A trace without full router probabilities: every analysis that can run on it runs, with the same
numbers as on the full trace, and the report says in one note what cannot."""

from __future__ import annotations

from moelab.analysis import analyze_all, to_json_dict
from moelab.analysis.synthetic import planted_batches
from moelab.cli import main

E, K, L = 6, 2, 3
ARGS = dict(num_seqs=20, seq_len=24, num_layers=L, num_experts=E, top_k=K, vocab=30, seqs_per_batch=4)


def test_no_probs_trace_runs_what_it_can_and_says_what_not(write_trace, tmp_path):
    batches = list(planted_batches(rule="token", capacity_factor=1.0, **ARGS))
    full = write_trace(batches, [E] * L, K, name="full.parquet")
    bare = write_trace([{k: v for k, v in b.items() if not k.startswith("probs")} for b in batches], [E] * L, K,
                       name="bare.parquet")
    kw = dict(min_count=5, n_permutations=4)
    a, b = to_json_dict(analyze_all(full, **kw)), to_json_dict(analyze_all(bare, **kw))
    assert "probs" not in a.get("skipped", {}) and "router entropy" in b["skipped"]["probs"]
    for name in ("coactivation", "drops", "vocab", "std_position", "mi:domain"):
        assert b[name] == a[name], name  # built on the chosen experts: unchanged
    for key in ("inner_balance_median", "outer_balance_median"):  # the chosen experts' probabilities
        assert b["gates"][key] == a["gates"][key], key
    for key in ("gate_entropy_mean", "cross_layer_mi"):
        assert a["gates"][key] is not None and b["gates"][key] is None, key
    assert main(["analyze", str(bare.path), "--out", str(tmp_path / "r"), "--permutations", "4",
                 "--workers", "1"]) == 0
    html = (tmp_path / "r" / "report.html").read_text()
    assert "Without full probabilities" in html and "No router entropy, gate entropy" in html
