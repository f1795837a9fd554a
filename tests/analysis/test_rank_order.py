"""Megatron imports put rank 0 on the lowest expert id (issue 23 item 3). The same planted routing is
written the way RouterTracer writes it (routing_map.nonzero(): ascending ids) and the way OLMoE writes it
(by router logit); the Megatron import is marked rank_order=unknown, and every rank-dependent analysis
refuses it or leaves that part out and says so, while the OLMoE import (the nothing case) keeps them."""

from __future__ import annotations

import json

import numpy as np
import pytest

from moelab.analysis.early import early_routing
from moelab.analysis.suite import analyze_all
from moelab.cli import main
from moelab.config import MoelabError
from moelab.trace.formats import import_trace
from moelab.trace.io import open_trace

T, L, K, E = 64, 3, 2, 8


@pytest.fixture(scope="module")
def routed(tmp_path_factory):
    """Ranked routing with a planted top-1 chain (top-1 at layer l+1 = top-1 at l + 1 mod E), imported
    from a RouterTracer file (ids ascending) and from an OLMoE file (ids by rank), 4 sequences."""
    d = tmp_path_factory.mktemp("rank")
    rng = np.random.default_rng(0)
    seqs = []
    for _ in range(4):
        ids = np.zeros((T, L, K), np.int64)
        ids[:, 0, 0] = rng.integers(0, E, T)
        for l in range(1, L):
            ids[:, l, 0] = (ids[:, l - 1, 0] + 1) % E
        for t in range(T):
            for l in range(L):
                ids[t, l, 1] = rng.choice([e for e in range(E) if e != ids[t, l, 0]])
        seqs.append(ids)
    meg = [json.dumps({"step": s, "block": "decoder", "layer": l, "num_tokens": T, "topk": K,
                       "top_indices": np.sort(ids[:, l], axis=1).tolist()})  # routing_map.nonzero() order
           for s, ids in enumerate(seqs) for l in range(L)]
    (d / "router_trace_rank0.jsonl").write_text("\n".join(meg) + "\n")
    olm = [json.dumps({"input_ids": list(range(T)), "exp_ids": ids.transpose(0, 2, 1).tolist()}) for ids in seqs]
    (d / "c4.jsonl").write_text("\n".join(olm) + "\n")
    for name, fmt, src in (("meg", "megatron", d / "router_trace_rank0.jsonl"), ("olm", "olmoe", d / "c4.jsonl")):
        for copy in ("a", "b"):
            import_trace(fmt, src, d / f"{name}_{copy}.parquet", num_experts=E)
    return d, seqs


def test_megatron_rank_0_is_not_the_top_1(routed):
    d, seqs = routed
    meg, olm = open_trace(d / "meg_a.parquet"), open_trace(d / "olm_a.parquet")
    assert meg.meta.extra["rank_order"] == "unknown" and olm.meta.extra["rank_order"] == "logits"
    top1 = np.concatenate([ids[:, :, 0] for ids in seqs]).reshape(-1)
    rank0 = [np.concatenate([b["expert"][b["rank"] == 0] for b in t.iter_batches(columns=["rank", "expert"])])
             for t in (meg, olm)]
    assert np.array_equal(rank0[1], top1)  # OLMoE's rank 0 is the top-1 choice
    assert 0.2 < np.mean(rank0[0] == top1) < 0.8  # Megatron's is the smaller id: top-1 only by chance


def test_analyze_all_leaves_out_the_top1_parts_and_says_so(routed):
    d, _ = routed
    kw = dict(analyses=("load", "specialisation", "coactivation"), labels=(), n_bootstrap=0, n_permutations=2)
    meg = analyze_all(open_trace(d / "meg_a.parquet"), **kw)
    olm = analyze_all(open_trace(d / "olm_a.parquet"), **kw)
    assert "rank" in meg["skipped"] and "rank order is unknown" in meg["skipped"]["rank"]
    assert "rank" not in olm.get("skipped", {})
    assert meg["coactivation"].transitions is None and meg["coactivation"].transition_mi is None
    # the planted chain: with true ranks every top-1 transition is a -> a + 1
    trans = olm["coactivation"].transitions[0]
    assert trans.sum() == 4 * T and all(trans[a, (a + 1) % E] == trans[a].sum() for a in range(E))
    # rank-independent parts agree exactly: the same expert sets, whatever their order
    for l in range(L):
        np.testing.assert_array_equal(meg["coactivation"].counts[l], olm["coactivation"].counts[l])
        np.testing.assert_array_equal(meg["load"].routed[l], olm["load"].routed[l])


def test_analyze_all_top1_label_mi_falls_back_to_all_ranks(routed):
    d, _ = routed
    meg = analyze_all(open_trace(d / "meg_a.parquet"), analyses=("specialisation",), labels=("domain",),
                      mi_ranks="top1", n_bootstrap=0, n_permutations=2)
    olm = analyze_all(open_trace(d / "olm_a.parquet"), analyses=("specialisation",), labels=("domain",),
                      mi_ranks="top1", n_bootstrap=0, n_permutations=2)
    assert meg["mi:domain"].ranks != "top1" and olm["mi:domain"].ranks == "top1"
    assert "top-1 label MI" in meg["skipped"]["rank"]


def test_early_routing_refuses(routed):
    d, _ = routed
    with pytest.raises(MoelabError, match="early routing \\(top-1 agreement\\) reads rank 0 as the top-1 choice"):
        early_routing([open_trace(d / "meg_a.parquet"), open_trace(d / "meg_b.parquet")], n_bootstrap=0)
    got = early_routing([open_trace(d / "olm_a.parquet"), open_trace(d / "olm_b.parquet")], n_bootstrap=0,
                        n_permutations=2)
    assert np.allclose(got.top1_agreement, 1.0)  # the same routing twice


def test_diff_prints_no_top1_agreement_for_unknown_ranks(routed, capsys):
    d, _ = routed
    assert main(["diff", str(d / "meg_a.parquet"), str(d / "meg_b.parquet"), "--out", str(d / "m.json")]) == 0
    out = capsys.readouterr().out
    assert "top-1 agreement left out: a trace's rank order is unknown" in out
    got = json.loads((d / "m.json").read_text())
    assert all(row["top1_agreement"] is None for row in got["layers"]) and got["layers"][0]["jaccard"] == 1.0
    assert main(["diff", str(d / "olm_a.parquet"), str(d / "olm_b.parquet"), "--out", str(d / "o.json")]) == 0
    assert "left out" not in capsys.readouterr().out
    assert all(row["top1_agreement"] == 1.0 for row in json.loads((d / "o.json").read_text())["layers"])


def test_the_report_says_so(routed, capsys):
    d, _ = routed
    assert main(["analyze", str(d / "meg_a.parquet"), "--out", str(d / "rep"), "--bootstrap", "0",
                 "--permutations", "2"]) == 0
    html = (d / "rep" / "report.html").read_text()
    assert "Rank order" in html and "rank order is unknown" in html
    skipped = json.loads((d / "rep" / "metrics.json").read_text())["models"]
    assert "rank order is unknown" in json.dumps(skipped)
