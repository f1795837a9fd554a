"""Traces from any writer: other integer/float widths, plain strings, absent defaulted columns, metadata in
the Parquet file itself or inferred from the rows, and null columns for what a source did not record."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from moelab.analysis.suite import analyze_all
from moelab.analysis.synthetic import planted_batches
from moelab.config import MoelabError
from moelab.trace.io import TraceWriter, open_trace, sidecar_path
from moelab.trace.schema import META_KEY, TraceMeta, numpy_dtype

CORE = ("seq", "pos", "token", "layer", "rank", "expert", "weight", "prob")


def planted(num_seqs=4, **kw):
    args = dict(num_seqs=num_seqs, seq_len=12, num_layers=2, num_experts=8, top_k=2, seqs_per_batch=4)
    (batch,) = planted_batches(**{**args, **kw})
    return batch


def one_line_error(fn, match):
    with pytest.raises(MoelabError, match=match) as e:
        fn()
    assert "\n" not in str(e.value)


def read_all(trace, columns=None, **kw):
    got = list(trace.iter_batches(columns=columns, **kw))
    return {k: np.concatenate([b[k] for b in got]) for k in got[0] if not k.endswith((".names", ".rows"))}


def pandas_like(batch, widths):
    """A table as pandas or DuckDB would write it: the given Arrow types, plain strings, no sidecar."""
    cols = {name: pa.array(np.asarray(batch[name])).cast(typ) for name, typ in widths.items()}
    cols["domain"] = pa.array(batch["domain.names"][batch["domain"]].astype(str))  # plain string
    cols["lang"] = pa.array(batch["lang.names"][batch["lang"]].astype(str).tolist(), pa.large_string())
    table = pa.table(cols)
    return table.replace_schema_metadata({b"pandas": b'{"index_columns": []}'})


WIDE = {"seq": pa.uint32(), "pos": pa.int64(), "token": pa.int64(), "layer": pa.int64(), "rank": pa.int32(),
        "expert": pa.int64(), "weight": pa.float64(), "prob": pa.float16(), "dropped": pa.bool_()}


def test_other_widths_read_as_canonical_values_and_meta_is_inferred(tmp_path):
    batch = planted()
    path = tmp_path / "wide.parquet"
    pq.write_table(pandas_like(batch, WIDE), path)
    trace = open_trace(path)
    assert trace.meta.num_experts == [8, 8] and trace.meta.top_k == 2  # every expert was chosen somewhere
    assert "inferred" in trace.notes[0] and trace.meta.source == "unknown"
    got = read_all(trace)
    for name in ("seq", "pos", "token", "layer", "rank", "expert", "weight"):
        np.testing.assert_array_equal(got[name], batch[name])
        assert got[name].dtype == batch[name].dtype
    np.testing.assert_allclose(got["prob"], batch["prob"], rtol=1e-3)  # float16 storage
    assert got["prob"].dtype == np.float32
    # absent defaulted columns come with the writer's defaults
    np.testing.assert_array_equal(got["doc_pos"], batch["pos"])
    np.testing.assert_array_equal(got["doc"], batch["seq"])
    np.testing.assert_array_equal(got["block"], batch["layer"])
    assert (got["turn"] == -1).all() and got["turn"].dtype == np.int16


def test_defaults_on_read_equal_the_writers_defaults(tmp_path):
    batch = {k: planted()[k] for k in CORE}
    meta = TraceMeta(num_experts=[8, 8], top_k=2)
    with TraceWriter(tmp_path / "w.parquet", meta) as w:  # reference: the writer fills the defaults
        w.write(batch)
    pq.write_table(pa.table({k: pa.array(v) for k, v in batch.items()}), tmp_path / "r.parquet")
    sidecar_path(tmp_path / "r.parquet").write_text(meta.to_json())
    written, raw = open_trace(tmp_path / "w.parquet"), open_trace(tmp_path / "r.parquet")
    assert raw.defaulted == ["doc_pos", "doc", "block", "turn", "domain", "lang", "dropped"]
    assert written.columns == raw.columns
    (a,), (b,) = list(written.iter_batches()), list(raw.iter_batches())
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
        assert a[k].dtype == b[k].dtype, k


def test_values_that_do_not_fit_are_refused_not_wrapped(tmp_path):
    batch = planted()
    for name, typ, value, match in (("expert", pa.int64(), 70000, "holds 70000, which does not fit int16"),
                                    ("rank", pa.uint64(), 300, "holds 300, which does not fit int8"),
                                    ("prob", pa.float64(), 1e300, "beyond float32's range")):
        widths = dict(WIDE, **{name: typ})
        bad = dict(batch, **{name: np.asarray(batch[name]).astype(numpy_dtype(typ))})
        bad[name][5] = value
        path = tmp_path / f"{name}.parquet"
        pq.write_table(pandas_like(bad, widths), path)
        sidecar_path(path).write_text(TraceMeta(num_experts=[8, 8], top_k=2).to_json())
        one_line_error(lambda: read_all(open_trace(path)), match)


def test_metadata_lives_in_the_file(tmp_path):
    meta = TraceMeta(num_experts=[8, 8], top_k=2, source="moelab", tokenizer="t.json", labels={"lang": ["en"]})
    path = tmp_path / "t.parquet"
    with TraceWriter(path, meta) as w:
        w.write(planted())
    kv = pq.ParquetFile(path).schema_arrow.metadata
    assert json.loads(kv[META_KEY]) == json.loads(sidecar_path(path).read_text())
    sidecar_path(path).unlink()
    alone = open_trace(path)  # one file is a whole trace
    assert alone.meta == meta and alone.notes == []
    table = pq.read_table(path).replace_schema_metadata({META_KEY: b"{not json"})
    pq.write_table(table, tmp_path / "bad.parquet")
    one_line_error(lambda: open_trace(tmp_path / "bad.parquet"),  # names where the bad record lives
                   "bad.parquet: its metadata 'moelab.trace' is not valid JSON")


def test_inference_finds_what_the_rows_show_and_says_when_it_cannot(tmp_path):
    batch = planted()
    keep = (batch["layer"] == 0) | (batch["expert"] < 5)  # layer 1: experts 5..7 never chosen
    keep = np.repeat(keep.reshape(-1, 2).all(axis=1), 2)  # whole (token, layer) groups only
    sub = {k: batch[k][keep] for k in CORE}
    pq.write_table(pa.table({k: pa.array(v) for k, v in sub.items()}), tmp_path / "sub.parquet")
    trace = open_trace(tmp_path / "sub.parquet")
    assert trace.meta.num_experts == [8, 5] and trace.meta.top_k == 2
    assert "an expert no token chose is missed" in trace.notes[0]
    only_layer_1 = {k: v[batch["layer"] == 1] for k, v in ((k, batch[k]) for k in CORE)}
    pq.write_table(pa.table({k: pa.array(v) for k, v in only_layer_1.items()}), tmp_path / "gap.parquet")
    one_line_error(lambda: open_trace(tmp_path / "gap.parquet"), "no rows for layer 0")


def test_null_columns_are_absent_and_analyses_that_need_them_say_so(tmp_path):
    batch = {k: planted()[k] for k in CORE}
    meta = TraceMeta(num_experts=[8, 8], top_k=2, null_columns={"prob": "the source records no probabilities",
                                                                "weight": "the source records no weights"})
    with TraceWriter(tmp_path / "n.parquet", meta) as w:
        w.write(dict(batch, prob=None, weight=None))
    trace = open_trace(tmp_path / "n.parquet")
    assert set(trace.null_columns) == {"prob", "weight"} and "prob" not in trace.columns
    one_line_error(lambda: next(trace.iter_batches(columns=["prob"])), "no 'prob' values .*no probabilities")
    load = analyze_all(trace, analyses=["load"])["load"]  # what needs only the experts still runs
    assert load is not None
    gates = analyze_all(trace, analyses=["gates"])  # skipped, with the source's reason, not guessed
    assert "gates" not in gates and "records no probabilities" in gates["skipped"]["gates"]
    # another writer's all-null column, with no metadata at all: found from the Parquet statistics
    table = pa.table({k: pa.array(v) for k, v in batch.items() if k != "token"})
    pq.write_table(table.append_column("token", pa.nulls(len(table), pa.int64())), tmp_path / "raw.parquet")
    raw = open_trace(tmp_path / "raw.parquet")
    assert list(raw.null_columns) == ["token"] and raw.null_columns["token"] == "every value is null"
    one_line_error(lambda: next(raw.iter_batches(columns=["seq", "token"])), "no 'token' values")
    pq.write_table(table.append_column("token", pa.nulls(len(table))), tmp_path / "nulltype.parquet")  # pandas None
    assert list(open_trace(tmp_path / "nulltype.parquet").null_columns) == ["token"]
