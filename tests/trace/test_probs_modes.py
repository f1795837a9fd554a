"""`--probs full|top:N|none`: what each mode keeps, checked against the router's distribution recomputed from
its own weights (not against moelab's writer), and what the analyses and the report make of a top:N trace.

Legend: T tokens, L MoE layers, E experts, K experts per token, N probabilities kept by top:N.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from moelab.analysis.suite import analyze_all, to_json_dict
from moelab.config import MoelabError
from moelab.model.config import ModelConfig, MoEConfig, RouterConfig
from moelab.model.transformer import build_model
from moelab.trace.build import trace_batches, trace_meta
from moelab.trace.io import TraceWriter, open_trace
from moelab.trace.schema import META_KEY, TraceMeta, check_probs, parse_probs

L, E, K, S, B = 2, 8, 2, 8, 4


def model():
    cfg = ModelConfig(vocab_size=50, d_model=16, n_layers=L, n_heads=2, ffn_hidden=32, max_seq_len=32,
                      moe=MoEConfig(router=RouterConfig(kind="linear"), num_experts=E, top_k=K, moe_every=1,
                                    expert_hidden=16))
    return build_model(cfg, seed=0).eval()


def batches(n):
    g = torch.Generator().manual_seed(1)
    for i in range(n):
        ids = torch.randint(0, 50, (B, S), generator=g)
        doc = (torch.arange(B) + i * B).repeat_interleave(S).view(B, S)
        yield {"input_ids": ids, "labels": ids, "doc": doc, "pos": torch.arange(S).repeat(B, 1),
               "domain_id": (doc % 2).to(torch.int16), "lang_id": torch.zeros(B, S, dtype=torch.int16),
               "turn": torch.full((B, S), -1, dtype=torch.int16)}


def router_inputs(m, n):
    """Each router's input x_TD per layer, hooked on the router module: [L] lists of [T, D], all batches."""
    xs = [[] for _ in range(L)]
    routers = [layer.router for layer in m.moe_layers()]
    hooks = [r.register_forward_pre_hook(lambda mod, a, l=l: xs[l].append(a[0].detach()))
             for l, r in enumerate(routers)]
    with torch.no_grad():
        for b in batches(n):
            m(b["input_ids"])
    for h in hooks:
        h.remove()
    return [torch.cat(x) for x in xs], [r.weight_ED.detach() for r in routers]


def recomputed(m, n, dtype):
    """softmax(x W^T) from the router weights, [T, L, E] in `dtype` (float64: the exact reference)."""
    xs, ws = router_inputs(m, n)
    return torch.stack([torch.softmax(x.to(dtype) @ w.to(dtype).t(), dim=-1) for x, w in zip(xs, ws)], dim=1)


def trace(m, path, n, probs, **kw):
    meta = trace_meta(m, None, 0, None, "moelab", ["a", "b"], ["en"])
    trace_batches(m, batches(n), path, meta, max_tokens=n * B * S, capacity_factor=None, probs=probs, **kw)
    return open_trace(path)


def rank0_TL(t, column):
    cols = next(t.iter_batches(columns=["layer", "rank", column], batch_rows=1 << 20))
    assert (cols["rank"][cols[f"{column}.rows"]] == 0).all()
    return cols[column].reshape(-1, L, cols[column].shape[1])


def test_full_is_the_routers_distribution_within_float16_rounding(tmp_path):
    m = model()
    t = trace(m, tmp_path / "full.parquet", 2, "full")
    assert t.meta.probs_mode == "full" and t.probs_mode == "full"
    assert pq.ParquetFile(t.path).schema_arrow.field("probs").type == pa.list_(pa.float16())
    got_TLE = rank0_TL(t, "probs")
    ref_TLE = recomputed(m, 2, torch.float64).numpy()
    assert got_TLE.dtype == np.float32 and got_TLE.shape == ref_TLE.shape
    # float16 keeps 11 significant bits: half an ulp is 2^-11 relative, 2^-25 absolute below 2^-14
    # (subnormals); the router itself computes in float32, a further 1e-6 relative at most here.
    err = np.abs(got_TLE - ref_TLE)
    assert (err <= ref_TLE * (2.0**-11 + 1e-6) + 2.0**-25).all(), float((err / ref_TLE).max())
    assert not np.array_equal(got_TLE, ref_TLE.astype(np.float32))  # the rounding is there to be documented
    # the chosen experts' `prob` stays float32: the router's own probabilities at its choices
    cols = next(t.iter_batches(columns=["expert", "prob"], batch_rows=1 << 20))
    at_choice = np.take_along_axis(ref_TLE, cols["expert"].reshape(-1, L, K).astype(np.int64), axis=2)
    np.testing.assert_allclose(cols["prob"].reshape(-1, L, K), at_choice, rtol=1e-6)


@pytest.mark.parametrize("n", [K, K + 1, E])
def test_top_n_is_torch_topk_of_the_recomputed_distribution(tmp_path, n):
    m = model()
    t = trace(m, tmp_path / "top.parquet", 2, f"top:{n}")
    assert t.meta.probs_mode == f"top:{n}" and "probs" not in t.columns
    assert {"topn_experts", "topn_probs"} <= set(t.optional)
    ref = torch.topk(recomputed(m, 2, torch.float32), n, dim=-1)
    np.testing.assert_array_equal(rank0_TL(t, "topn_experts"), ref.indices.numpy())
    np.testing.assert_allclose(rank0_TL(t, "topn_probs"), ref.values.numpy(), rtol=1e-6, atol=0)
    assert json.loads((tmp_path / "top.parquet.json").read_text())["probs_mode"] == f"top:{n}"


def test_none_keeps_only_the_chosen_probabilities(tmp_path):
    m = model()
    t = trace(m, tmp_path / "none.parquet", 1, "none")
    assert t.meta.probs_mode == "none" and not {"probs", "topn_experts", "topn_probs"} & set(t.columns)
    full = trace(m, tmp_path / "full.parquet", 1, "full")
    keep = ["seq", "pos", "layer", "rank", "expert", "weight", "prob", "dropped"]
    a, b = pq.read_table(t.path, columns=keep), pq.read_table(full.path, columns=keep)
    assert a.replace_schema_metadata(None).equals(b.replace_schema_metadata(None))


def test_parse_and_check_probs():
    assert [parse_probs(v) for v in ("full", "NONE", "top:8", " top:08 ")] == ["full", "none", "top:8", "top:8"]
    for bad in ("top:0", "top:x", "top:", "half", "top:-1", "topk:2", ""):
        with pytest.raises(MoelabError, match="is not full, none or top:N"):
            parse_probs(bad)
    assert check_probs("top:8", [8, 16], 2) == "top:8"
    with pytest.raises(MoelabError, match="N=9 exceeds the model's 8 experts"):
        check_probs("top:9", [8, 16], 2)
    with pytest.raises(MoelabError, match="N=1 is below the model's top_k=2"):
        check_probs("top:1", [8], 2)
    with pytest.raises(MoelabError, match="probs_mode='top:9' keeps more than the 8"):
        TraceMeta(num_experts=[8], top_k=2, probs_mode="top:9")
    with pytest.raises(MoelabError, match="probs_mode='half' is not full, none or top:N"):
        TraceMeta(num_experts=[8], top_k=2, probs_mode="half")


def test_a_float32_probs_file_of_an_older_writer_still_reads_exactly(tmp_path):
    m = model()
    t = trace(m, tmp_path / "t.parquet", 1, "full")
    table = pq.read_table(t.path)
    values = np.random.default_rng(0).random((table.num_rows // K, E)).astype(np.float32)  # not float16 values
    rank0 = table.column("rank").to_numpy() == 0
    offsets = np.concatenate([[0], np.cumsum(np.where(rank0, E, 0))]).astype(np.int32)
    old = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values.reshape(-1)), mask=pa.array(~rank0))
    i = table.schema.get_field_index("probs")
    table = table.set_column(i, pa.field("probs", pa.list_(pa.float32())), old)
    meta = TraceMeta.from_json((tmp_path / "t.parquet.json").read_text())
    meta.probs_mode = None  # written before the record existed
    (tmp_path / "t.parquet.json").write_text(meta.to_json())
    table = table.replace_schema_metadata({META_KEY: meta.to_json()})  # the file's own copy, as it was written
    pq.write_table(table, tmp_path / "t.parquet")
    again = open_trace(tmp_path / "t.parquet")
    assert again.probs_mode == "full"
    np.testing.assert_array_equal(rank0_TL(again, "probs").reshape(-1, E), values)


def write_topn(path, ids, probs, meta=None):
    meta = meta or TraceMeta(num_experts=[4], top_k=1, probs_mode="top:2")
    with TraceWriter(path, meta) as w:
        w.write({"seq": [0, 1], "pos": [0, 0], "token": [1, 2], "layer": [0, 0], "rank": [0, 0], "expert": [0, 1],
                 "weight": 1.0, "prob": 0.5, "topn_experts": ids, "topn_probs": probs})
    return open_trace(path)


@pytest.mark.parametrize("ids, probs, meta, match", [
    ([[0, 4], [1, 0]], [[0.5, 0.2], [0.6, 0.1]], None, "'topn_experts' holds expert 4 in a layer of 4 experts"),
    ([[0, 1, 2], [1, 0, 2]], [[0.5, 0.2, 0.1], [0.6, 0.1, 0.1]], None,
     "'topn_probs' has a list of length 3 where top:2 needs 2"),
    ([[0, 1], [1, 0]], [[0.5, np.nan], [0.6, 0.1]], None, "'topn_probs' holds NaN"),
])
def test_bad_top_n_columns_are_one_line_errors(tmp_path, ids, probs, meta, match):
    t = write_topn(tmp_path / "t.parquet", np.array(ids), np.array(probs, np.float32), meta)
    with pytest.raises(MoelabError, match=match) as e:
        list(t.iter_batches())
    assert "\n" not in str(e.value)


def test_a_top_n_trace_needs_both_columns(tmp_path):
    t = write_topn(tmp_path / "t.parquet", np.array([[0, 1], [1, 0]]), np.array([[0.5, 0.2], [0.6, 0.1]], np.float32))
    assert np.array_equal(next(t.iter_batches())["topn_experts"], [[0, 1], [1, 0]])
    table = pq.read_table(t.path).drop_columns(["topn_probs"])
    pq.write_table(table, tmp_path / "u.parquet")
    with pytest.raises(MoelabError, match="only one of 'topn_experts' and 'topn_probs'"):
        open_trace(tmp_path / "u.parquet")


# What needs every expert's probability, by result field: a top:N trace leaves exactly these out.
NEEDS_FULL = {"load": {"router_entropy"},
              "gates": {"cross_layer_mi", "cross_layer_null", "gate_entropy_median", "gate_entropy_mean",
                        "cross_layer_overall", "entropy_estimates", "entropy_overall"},
              "dynamic": {"rank_counts", "top1_is_largest_norm", "top1_estimates", "top1_overall"}}


def test_a_top_n_trace_runs_every_analysis_that_can_run_and_the_report_names_the_rest(tmp_path):
    from moelab.report.build import build_report

    m = model()
    n = 5  # 20 sequences: enough for the bootstrap intervals
    full = to_json_dict(analyze_all(trace(m, tmp_path / "full.parquet", n, "full", all_experts=True)))
    top = to_json_dict(analyze_all(trace(m, tmp_path / "top.parquet", n, "top:3", all_experts=True)))
    assert "skipped" not in full
    assert set(top["skipped"]) == {"probs"}
    why = top["skipped"]["probs"]
    assert "router entropy, gate entropy, cross-layer gate MI or router-rank vs output-norm-rank" in why
    assert "keeps only the 3 largest router probabilities" in why
    assert set(top) - {"skipped"} == set(full)  # every analysis ran
    for name in full:
        a, b = full[name], top[name]
        if isinstance(a, dict) and name in NEEDS_FULL:
            missing = {k for k in a if b.get(k) is None and a[k] is not None}
            assert missing == NEEDS_FULL[name], (name, missing)
            a = {k: v for k, v in a.items() if k not in missing}
            b = {k: v for k, v in b.items() if k not in missing}
        assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True), name
    build_report([tmp_path / "top.parquet"], tmp_path / "report", dpi=40)
    page = (tmp_path / "report" / "report.html").read_text()
    assert "Without full probabilities" in page and "keeps only the 3 largest router probabilities" in page
    assert "top:3: the 3 largest per token and layer" in page


@pytest.mark.parametrize("probs", ["full", "top:3"])
def test_every_column_reads_in_duckdb(tmp_path, probs):
    """SQL over a trace (the explorer's way in) sees the same list values as open_trace."""
    duckdb = pytest.importorskip("duckdb")
    t = trace(model(), tmp_path / "t.parquet", 1, probs, all_experts=True)
    column = "probs" if probs == "full" else "topn_probs"
    got = duckdb.sql(f"SELECT {column}, expert_norms FROM read_parquet('{t.path}') WHERE rank = 0").fetchall()
    want = next(t.iter_batches(columns=[column, "expert_norms"], batch_rows=1 << 20))
    np.testing.assert_array_equal(np.array([r[0] for r in got], np.float32), want[column])
    np.testing.assert_array_equal(np.array([r[1] for r in got], np.float32), want["expert_norms"])


def test_a_damaged_probs_page_is_a_one_line_error(tmp_path):
    """Damaged float bytes decode to plausible numbers: the writer's page checksums catch them on read."""
    t = trace(model(), tmp_path / "t.parquet", 1, "full")
    md = pq.ParquetFile(t.path).metadata.row_group(0)
    chunk = next(md.column(j) for j in range(md.num_columns) if md.column(j).path_in_schema == "probs.list.element")
    data = bytearray(t.path.read_bytes())
    at = chunk.data_page_offset + chunk.total_compressed_size // 2
    data[at: at + 8] = bytes(8)
    (tmp_path / "bad.parquet").write_bytes(bytes(data))
    (tmp_path / "bad.parquet.json").write_text((tmp_path / "t.parquet.json").read_text())
    with pytest.raises(MoelabError, match="row group 0 is unreadable: .*CRC") as e:
        list(open_trace(tmp_path / "bad.parquet").iter_batches(columns=["probs"]))
    assert "\n" not in str(e.value)


def test_a_top_n_trace_without_the_record_reads_its_n_from_the_rows(tmp_path):
    t = write_topn(tmp_path / "t.parquet", [[0, 1], [1, 0]], [[0.5, 0.2], [0.6, 0.1]])
    meta = TraceMeta.from_json(t.meta.to_json())
    meta.probs_mode = None  # another writer: top-N columns, no record of N
    table = pq.read_table(t.path).replace_schema_metadata({META_KEY: meta.to_json()})
    pq.write_table(table, t.path)
    (tmp_path / "t.parquet.json").write_text(meta.to_json())
    assert open_trace(t.path).probs_mode == "top:2"
