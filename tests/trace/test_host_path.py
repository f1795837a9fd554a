"""The host side of a trace: rows built in their stored types, row groups encoded on a thread of their own.

The rows are checked against a naive loop over (token, layer, rank) written here from the format's rules
(docs/TRACE.md), not from `batch_rows`: padding, per-layer expert counts, drops, every `--probs` mode, and
the pipelined loop against the synchronous one. The Parquet options are checked in the file's own metadata.

Legend: B batch rows, S sequence, T tokens, L MoE layers, E experts, K experts per token.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from moelab.config import MoelabError
from moelab.model.moe import LayerRouting
from moelab.trace.build import batch_rows, keep_probs, write_trace
from moelab.trace.capture import CapturedLayer
from moelab.trace.io import PLAIN_RUNS, TraceWriter, open_trace
from moelab.trace.schema import TraceMeta

B, S, K = 3, 5, 2
WIDTHS = [4, 6, 4]  # experts per MoE layer
BLOCKS = [1, 3, 5]
DOMAINS, LANGS = ["code", "web"], ["en", "de", "py"]


def routing(seed: int) -> list[CapturedLayer]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for l, E in enumerate(WIDTHS):
        logits_TE = torch.randn(B * S, E, generator=g)
        logits_TE[0] = 0.0  # a uniform row: ties everywhere, which top:N resolves to the lower expert
        probs_TE = logits_TE.softmax(-1)
        w_TK, ids_TK = probs_TE.topk(K, dim=-1)
        dropped_TK = torch.rand(B * S, K, generator=g) < 0.2
        out.append(CapturedLayer(LayerRouting(BLOCKS[l], ids_TK, w_TK.masked_fill(dropped_TK, 0.0), probs_TE,
                                              dropped_TK, logits_TE)))
    return out


def batch(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + seed)
    doc = (torch.arange(B) + 10 * seed).repeat_interleave(S).view(B, S)
    doc[1, 3:] = -1  # padding inside the batch and at its end
    doc[2, 4:] = -1
    return {"input_ids": torch.randint(0, 70000, (B, S), generator=g), "doc": doc,
            "pos": torch.randint(0, 900, (B, S), generator=g), "domain_id": torch.randint(0, 2, (B, S), generator=g),
            "lang_id": torch.randint(0, 3, (B, S), generator=g), "turn": torch.randint(-1, 4, (B, S), generator=g)}


def naive_rows(batches: list[dict], routings: list[list[CapturedLayer]], mode: str) -> list[dict]:
    """One dict per (token, layer, rank), in (seq, pos, layer, rank) order, padding skipped."""
    rows, seq0 = [], 0
    n = int(mode[4:]) if mode.startswith("top:") else 0
    for b, caps in zip(batches, routings):
        for i in range(B):
            for s in range(S):
                t = i * S + s
                if b["doc"][i, s] < 0:
                    continue
                for l, c in enumerate(caps):
                    r = c.routing
                    p_E = r.probs_TE[t]
                    for k in range(K):
                        e = int(r.expert_ids_TK[t, k])
                        row = {"seq": seq0 + i, "pos": s, "doc_pos": int(b["pos"][i, s]),
                               "token": int(b["input_ids"][i, s]), "doc": int(b["doc"][i, s]),
                               "domain": DOMAINS[int(b["domain_id"][i, s])], "lang": LANGS[int(b["lang_id"][i, s])],
                               "turn": int(b["turn"][i, s]), "layer": l, "block": BLOCKS[l], "rank": k,
                               "expert": e, "weight": float(r.weights_TK[t, k]), "prob": float(p_E[e]),
                               "dropped": bool(r.dropped_TK[t, k])}
                        if k == 0 and mode == "full":
                            row["probs"] = p_E.half().float().numpy()
                        if k == 0 and n:
                            # descending probability, ties to the lower expert: a stable sort of -p
                            order = sorted(range(len(p_E)), key=lambda j: (-float(p_E[j]), j))[:n]
                            row["topn_experts"] = np.array(order)
                            row["topn_probs"] = p_E[order].numpy()
                        rows.append(row)
        seq0 += B
    return rows


def read_rows(path) -> list[dict]:
    t = open_trace(path)
    cols = next(t.iter_batches(batch_rows=1 << 20))
    lists = {c: dict(zip(cols[f"{c}.rows"].tolist(), cols[c])) for c in ("probs", "topn_experts", "topn_probs")
             if c in cols}
    names = {c: cols[f"{c}.names"] for c in ("domain", "lang")}
    out = []
    for j in range(len(cols["expert"])):
        row = {c: cols[c][j].item() for c in ("seq", "pos", "doc_pos", "token", "doc", "turn", "layer", "block",
                                              "rank", "expert", "weight", "prob", "dropped")}
        row.update({c: names[c][cols[c][j]] for c in names})
        row.update({c: np.asarray(v[j]) for c, v in lists.items() if j in v})
        out.append(row)
    return out


@pytest.mark.parametrize("mode", ["none", "full", "top:3"])
@pytest.mark.parametrize("overlap", [False, True])
def test_rows_equal_a_naive_loop_over_tokens_layers_and_ranks(tmp_path, mode, overlap):
    batches = [batch(i) for i in range(3)]
    routings = [routing(i) for i in range(3)]
    calls = iter(routings)
    meta = TraceMeta(num_experts=WIDTHS, top_k=K, labels={"domain": DOMAINS, "lang": LANGS})
    path = tmp_path / "t.parquet"
    stats = write_trace(batches, path, meta, lambda b: next(calls), optional=[], blocks=BLOCKS,
                        max_tokens=10**6, probs=mode, overlap=overlap)
    want = naive_rows(batches, routings, mode)
    got = read_rows(path)
    assert stats["rows"] == len(want) == len(got) == 3 * 12 * len(WIDTHS) * K  # 3 padded of 15 tokens
    for w, g in zip(want, got):
        assert w.keys() == g.keys()
        for c in w:
            if isinstance(w[c], np.ndarray):
                np.testing.assert_allclose(g[c], w[c], rtol=0, atol=0, err_msg=c)
            elif isinstance(w[c], float):
                assert g[c] == pytest.approx(w[c], rel=1e-7, abs=0), c
            else:
                assert g[c] == w[c], c


@pytest.mark.parametrize("group_rows, groups", [(40, 4), (100, 2)])  # 72 rows a batch: a group each, or of two
def test_the_pipelined_loop_writes_the_synchronous_file(tmp_path, monkeypatch, group_rows, groups):
    import functools

    import moelab.trace.build as build

    monkeypatch.setattr(build, "TraceWriter", functools.partial(TraceWriter, row_group_rows=group_rows))
    files = []
    # The synchronous loop (one pq.ParquetWriter) is the reference; then one encoder and three at once.
    for i, (overlap, encoders) in enumerate([(False, None), (True, 1), (True, 3)]):
        calls = iter([routing(i) for i in range(4)])
        meta = TraceMeta(num_experts=WIDTHS, top_k=K, labels={"domain": DOMAINS, "lang": LANGS})
        path = tmp_path / f"t{i}.parquet"
        write_trace([batch(i) for i in range(4)], path, meta, lambda b: next(calls), optional=[], blocks=BLOCKS,
                    max_tokens=10**6, probs="full", overlap=overlap, encoders=encoders)
        files.append(path.read_bytes())
    assert pq.ParquetFile(tmp_path / "t2.parquet").metadata.num_row_groups == groups
    assert files[0] == files[1] == files[2]


def test_stored_types_refuse_values_that_do_not_fit():
    caps = keep_probs(routing(0), "none")
    b = batch(0)
    b["turn"][0, 0] = 40000  # int16
    with pytest.raises(MoelabError, match="'turn' holds 40000"):
        batch_rows(b, caps, 0, DOMAINS, LANGS, BLOCKS, probs="none")


def test_keep_probs_leaves_reduced_layers_as_they_are():
    once = keep_probs(routing(0), "top:2")
    assert keep_probs(once, "top:2") == once


@pytest.mark.parametrize("where, encoders", [("writing", 1), ("encoding", 3), ("appending", 3)])
def test_a_failed_background_write_surfaces_and_leaves_no_file(tmp_path, monkeypatch, where, encoders):
    import moelab.trace.io as tio

    meta = TraceMeta(num_experts=[4], top_k=1, labels={"domain": ["x"], "lang": ["y"]})
    path = tmp_path / "t.parquet"

    def broken(*args):
        raise OSError("disk full")

    if where == "writing":  # one encoder: pq.ParquetWriter on the writer's thread
        monkeypatch.setattr(TraceWriter, "_write_group", broken)
    elif where == "encoding":
        monkeypatch.setattr(tio, "encode_group", broken)
    else:
        monkeypatch.setattr(tio.JoinedParquet, "append", broken)
    w = TraceWriter(path, meta, row_group_rows=2, background=True, encoders=encoders)
    w.write({"seq": [0, 0], "pos": [0, 1], "layer": 0, "rank": 0, "expert": [1, 2], "token": [5, 6],
             "weight": [1.0, 1.0], "prob": [0.5, 0.5]})  # the write of this row group fails on the thread
    with pytest.raises(OSError, match="disk full"):
        w.close()
    assert not path.exists() and not (tmp_path / "t.parquet.tmp").exists()
    assert not (tmp_path / "t.parquet.json").exists()


def test_encodings_compression_and_statistics_in_the_file(tmp_path):
    calls = iter([routing(0)])
    meta = TraceMeta(num_experts=WIDTHS, top_k=K, labels={"domain": DOMAINS, "lang": LANGS})
    path = tmp_path / "t.parquet"
    write_trace([batch(0)], path, meta, lambda b: next(calls), optional=[], blocks=BLOCKS, max_tokens=10**6,
                probs="full")
    md = pq.ParquetFile(path).metadata.row_group(0)
    chunks = {md.column(j).path_in_schema: md.column(j) for j in range(md.num_columns)}
    assert {c.compression for c in chunks.values()} == {"LZ4"}
    for name in ("seq", "expert", "layer", "domain"):
        assert "PLAIN_DICTIONARY" in chunks[name].encodings or "RLE_DICTIONARY" in chunks[name].encodings, name
    for name in PLAIN_RUNS:
        assert not {"PLAIN_DICTIONARY", "RLE_DICTIONARY"} & set(chunks[name].encodings), name
    for name in ("weight", "prob"):
        assert "BYTE_STREAM_SPLIT" in chunks[name].encodings, name
    # the readers' statistics are there (plan_units: seq; proven_in_range: layer, rank, expert; all_null: the
    # nullable columns); the float16 probabilities have none
    for name in ("seq", "pos", "layer", "rank", "expert", "token", "weight", "prob"):
        assert chunks[name].is_stats_set and chunks[name].statistics.has_min_max, name
    assert not chunks["probs.list.element"].is_stats_set
    assert pa.types.is_float16(pq.ParquetFile(path).schema_arrow.field("probs").type.value_type)
