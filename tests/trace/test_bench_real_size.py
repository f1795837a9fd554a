"""benchmarks/bench_real_size.py --tiny runs end to end: forward, trace with --probs none / top:N / full, the
intervene ablation loop, and the analysis at 1 and 2 workers, each row count being tokens x MoE layers x top-k."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

ROOT = Path(__file__).parents[2]


def test_bench_real_size_tiny(tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks/bench_real_size.py"), "--tiny", "--batches", "2",
                          "--workers", "2", "--json", str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    r = json.loads(out.read_text())
    rows = r["tokens"] * 2 * 2  # --tiny: 2 MoE layers, top-2
    assert {k: v["rows"] for k, v in r["trace"].items()} == {"none": rows, "top:4": rows, "full": rows,
                                                              "full_1enc": rows, "full_sync": rows}  # top:4 of 8
    t = r["trace"]
    # 8 float16 probabilities, or 4 float32 ones and their int16 ids, more per (token, layer)
    assert min(t["full"]["mib"], t["top:4"]["mib"]) > t["none"]["mib"]
    w = t["full"]["probs_widths"]
    assert w["mib_f32"] > w["mib_f16"] and w["write_s_f16"] > 0 and w["write_s_f32"] > 0  # float16: smaller file
    iv = r["intervene"]
    assert iv["ablations"] == 2 and iv["block"] == 1 and iv["s_per_ablation"] > 0 and iv["vs_forwards"] > 0
    assert [(a["workers"], a["rows"]) for a in r["analysis"]] == [(1, rows), (2, rows)]
    assert all(v["tok_s"] > 0 and v["ratio"] > 0 for v in r["trace"].values()) and r["forward_tok_s"] > 0
