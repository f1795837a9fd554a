"""Valid traces at the edges: a one-expert layer, top-1 routing, no expert pairs, no turns. Each builds a
report (no crash), and a layer without pairs is NaN, not a 0.0 that pulls the headline mean down."""

from __future__ import annotations

import json

import numpy as np
import pytest

from moelab import cli
from moelab.analysis import analyze_all
from moelab.report.headline import _dynamic_headlines
from moelab.trace.io import TraceWriter
from moelab.trace.schema import TraceMeta


def write_rows(path, ids_LTK, num_experts, seqs=4):
    """A trace from per-layer T x K ids, T tokens split into `seqs` sequences, no turns."""
    ids = np.asarray(ids_LTK)
    L, T, K = ids.shape
    seq_T, pos_T = np.repeat(np.arange(seqs), T // seqs), np.tile(np.arange(T // seqs), seqs)
    rows = {"seq": np.repeat(seq_T, L * K), "pos": np.repeat(pos_T, L * K),
            "token": np.repeat(np.arange(T) % 7, L * K), "layer": np.tile(np.repeat(np.arange(L), K), T),
            "rank": np.tile(np.arange(K), T * L), "expert": np.transpose(ids, (1, 0, 2)).reshape(-1),
            "prob": np.full(ids.size, 0.5), "weight": np.full(ids.size, 0.5),
            "domain": np.repeat(np.where(seq_T % 2 == 0, "web", "code"), L * K)}
    with TraceWriter(path, TraceMeta(num_experts=list(num_experts), top_k=K)) as writer:
        writer.write(rows)
    return path


@pytest.fixture
def main(monkeypatch):
    monkeypatch.setattr(cli, "COMMAND_MODULES", ["moelab.report.commands"])
    return cli.main


def test_one_expert_layer_top1_builds_a_report(main, tmp_path, capsys):
    rng = np.random.default_rng(0)
    ids = np.stack([np.zeros((256, 1), int), rng.integers(0, 4, size=(256, 1))])
    trace = write_rows(tmp_path / "t.parquet", ids, [1, 4], seqs=16)  # 16: enough sequences for intervals
    rc = main(["analyze", str(trace), "--out", str(tmp_path / "out"), "--labels", "domain,turn",
               "--min-count", "5", "--permutations", "4", "--bootstrap", "8"])
    printed = capsys.readouterr().out
    assert rc == 0 and (tmp_path / "out" / "report.html").is_file()
    assert "co-activation" not in printed  # k = 1: no pairs, so no "strongest co-activation 0.00"
    page = (tmp_path / "out" / "report.html").read_text()
    assert "No layer has expert pairs" in page
    assert "The trace has no turn labels" in page and "Only one turn" not in page
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert "coactivation_max" not in metrics["models"]["t"]["headline"]
    est = metrics["models"]["t"]["headline"]["std_position"]["estimate"]
    assert est["n_permutations"] == 4 and est["n_bootstrap"] == 8


def test_layers_without_pairs_are_nan_and_leave_the_headline_mean_alone():
    rng = np.random.default_rng(1)
    T = 256
    ids = np.stack([np.zeros((T, 1), int), rng.integers(0, 4, size=(T, 1))])
    batch = write_batch(ids)
    rank0 = np.flatnonzero(batch["rank"] == 0)
    cos = np.empty(len(rank0), dtype=object)  # E(E-1)/2 pairs: none at layer 0, six at layer 1
    cos[:] = [np.zeros(0, np.float32) if l == 0 else np.full(6, 0.0, np.float32) for l in batch["layer"][rank0]]
    batch.update({"expert_cos": cos, "expert_cos.rows": rank0})
    res = analyze_all(batch, num_experts=[1, 4], top_k=1, analyses=("dynamic", "coactivation"))
    dyn = res["dynamic"]
    assert np.isnan(dyn.mean_angular[0]) and dyn.mean_angular[1] == pytest.approx(0.5)  # cos 0: angular 0.5
    head = {h.key: h for h in _dynamic_headlines(dyn)}["output_angular_similarity"]
    assert head.value == pytest.approx(0.5)  # the one layer with pairs, not (0.0 + 0.5) / 2
    assert all(np.isnan(e.value) for e in res["coactivation"].strongest)  # k = 1: no pairs anywhere


def test_planted_pairs_sit_far_above_the_load_matched_null():
    rng = np.random.default_rng(1)
    pair_T = rng.integers(0, 2, size=512)  # experts 0 and 1 always together, 2 and 3 together
    ids = np.stack([np.stack([2 * pair_T, 2 * pair_T + 1], axis=1)] * 2)
    res = analyze_all(write_batch(ids), num_experts=[4, 4], top_k=2, analyses=("coactivation",), n_permutations=8)
    co = res["coactivation"]
    assert [e.value for e in co.strongest] == [1.0, 1.0]
    assert co.strongest_overall.null_mean < 0.6 and co.strongest_overall.p == pytest.approx(1 / 9)


def write_batch(ids_LTK):
    """One in-memory batch (the analysis side accepts batches as well as files)."""
    ids = np.asarray(ids_LTK)
    L, T, K = ids.shape
    return {"seq": np.repeat(np.arange(T) // 64, L * K), "pos": np.repeat(np.arange(T) % 64, L * K),
            "layer": np.tile(np.repeat(np.arange(L), K), T).astype(np.int16),
            "rank": np.tile(np.arange(K), T * L).astype(np.int8),
            "expert": np.transpose(ids, (1, 0, 2)).reshape(-1).astype(np.int16)}


def test_queue_setting_comes_from_the_sidecar():
    from moelab.report.build import queue_setting

    meta = TraceMeta(num_experts=[4], top_k=2, capacity_factor=1.25, capacity_formula="group", group_size=64,
                     drop_policy="score", extra={"batch_seqs": 16, "min_capacity": 2})
    assert queue_setting(meta, None) == {"capacity_factor": 1.25, "formula": "group", "policy": "score",
                                         "batch_seqs": 16, "group_size": 64, "min_capacity": 2}
    meta.extra = {}
    assert queue_setting(meta, {"capacity_factor": 2.0, "batch_seqs": 4})["batch_seqs"] == 4
    assert queue_setting(meta, None)["batch_seqs"] == 8  # `moelab trace`'s default batch
    assert queue_setting(TraceMeta(num_experts=[4], top_k=2), None) is None  # dropless: no queue
