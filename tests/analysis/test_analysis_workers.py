"""`--workers N`: the streaming pass over N processes gives bit for bit the one-worker results."""

from __future__ import annotations

import json

import numpy as np

from moelab.analysis import analyze_all, to_json_dict
from moelab.analysis.parallel import split
from moelab.analysis.synthetic import planted_batches
from moelab.cli import main

E, K, L = 6, 2, 3
ARGS = dict(num_seqs=20, seq_len=24, num_layers=L, num_experts=E, top_k=K, vocab=30, seqs_per_batch=4)


def _same(a, b, path="result"):
    """Exact equality, NaN equal to NaN (JSON-ready values)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and np.isnan(a):
        assert isinstance(b, float) and np.isnan(b), path
    else:
        assert a == b, path


def test_workers_give_the_one_worker_results_bit_for_bit(write_trace):
    batches = list(planted_batches(rule="token", capacity_factor=1.0, all_experts=True, **ARGS))
    trace = write_trace(batches, [E] * L, K, row_group_rows=500)
    # Small batches: GateStats' null generator advances once per batch, so a split that changed the
    # batches any worker sees would show here.
    kw = dict(simulate=dict(capacity_factor=1.0, batch_seqs=4), queue=dict(capacity_factor=1.5, batch_seqs=4),
              min_count=5, n_permutations=4, batch_rows=97)
    one = to_json_dict(analyze_all(trace, workers=1, **kw))
    assert one["gates"] is not None and one["drops_simulated"] is not None
    for n in (2, 3, 16):
        _same(to_json_dict(analyze_all(trace, workers=n, **kw)), one)


def test_analyze_metrics_json_equal_for_1_2_3_workers(write_trace, tmp_path):
    batches = list(planted_batches(rule="token", capacity_factor=1.0, all_experts=True, **ARGS))
    trace = write_trace(batches, [E] * L, K, row_group_rows=500)
    texts = {}
    for n in (1, 2, 3):
        out = tmp_path / f"out{n}"
        assert main(["analyze", str(trace.path), "--out", str(out), "--workers", str(n),
                     "--permutations", "4", "--simulate-capacity", "1.0"]) == 0
        metrics = json.loads((out / "metrics.json").read_text())
        metrics.pop("files", None)  # the output folder differs by construction
        texts[n] = json.dumps(metrics, sort_keys=True)
    assert texts[2] == texts[1] and texts[3] == texts[1]
    assert "workers" not in texts[1]


def test_bad_workers_is_one_line(write_trace, capsys):
    batches = list(planted_batches(rule="token", capacity_factor=1.0, **ARGS))
    trace = write_trace(batches, [E] * L, K)
    assert main(["analyze", str(trace.path), "--out", str(trace.path.parent / "o"), "--workers", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--workers must be >= 1" in err and len(err.splitlines()) == 1


def test_split_balances_and_keeps_every_accumulator():
    keys = ["pool", "load", "tables:token", "tables:pos", "coactivation", "gates", "dynamic", "drops"]
    parts = split(keys, 3)
    assert len(parts) == 3 and sorted(k for p in parts for k in p) == sorted(keys)
    assert len(split(keys, 1)) == 1 and sorted(split(keys, 1)[0]) == sorted(keys)
    assert len(split(keys[:2], 8)) == 2  # never more workers than accumulators
