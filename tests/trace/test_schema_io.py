"""Trace schema, sidecar and Parquet I/O: round trips, streaming, and one-line errors for bad input."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from moelab.analysis.synthetic import planted_batches
from moelab.config import MoelabError
from moelab.trace.io import TraceWriter, open_trace, sidecar_path
from moelab.trace.schema import SCHEMA_VERSION, TraceMeta, numpy_dtype, trace_schema

META = TraceMeta(num_experts=[8, 8], top_k=2, capacity_factor=1.25, capacity_formula="topk",
                 drop_policy="openmoe", checkpoint_step=100, tokenizer="umt5", source="moelab",
                 labels={"domain": ["web", "code"]}, model_config={"d_model": 64})


def planted(**kw):
    args = dict(num_seqs=6, seq_len=16, num_layers=2, num_experts=8, top_k=2, seqs_per_batch=2, all_experts=True)
    return list(planted_batches(**{**args, **kw}))


def write(path, batches, meta=META, **kw):
    with TraceWriter(path, meta, **kw) as writer:
        for b in batches:
            writer.write(b)
    return open_trace(path)


def one_line_error(fn, match):
    with pytest.raises(MoelabError, match=match) as e:
        fn()
    assert "\n" not in str(e.value)


def test_round_trip_streams_the_same_rows(tmp_path):
    batches = planted()
    trace = write(tmp_path / "t.parquet", batches, row_group_rows=200)
    assert trace.meta == META and trace.num_rows == sum(len(b["expert"]) for b in batches)
    assert pq.ParquetFile(trace.path).metadata.num_row_groups > 1
    assert set(trace.optional) == {"probs", "expert_norms", "expert_cos", "expert_density"}
    got = list(trace.iter_batches(batch_rows=97))
    assert max(len(b["expert"]) for b in got) <= 97
    for col in ("seq", "pos", "token", "layer", "rank", "expert", "prob", "dropped", "turn"):
        np.testing.assert_array_equal(np.concatenate([b[col] for b in got]), np.concatenate([b[col] for b in batches]))
        assert got[0][col].dtype == numpy_dtype(trace_schema().field(col).type)
    names = got[-1]["domain.names"]
    decoded = np.concatenate([b["domain.names"][b["domain"]] for b in got])
    assert decoded.tolist() == np.concatenate([b["domain.names"][b["domain"]] for b in batches]).tolist()
    assert list(names) == ["web", "code"]
    probs, written = np.concatenate([b["probs"] for b in got]), np.concatenate([b["probs"] for b in batches])
    assert probs.dtype == np.float32  # stored as float16 (schema.PROBS_TYPE), widened on read
    np.testing.assert_array_equal(probs, written.astype(np.float16).astype(np.float32))  # numpy's own rounding
    assert (np.abs(probs - written) <= np.abs(written) * 2.0**-11 + 2.0**-25).all()  # half an ulp, subnormals
    np.testing.assert_array_equal(np.concatenate([b["expert_norms"] for b in got]),  # float32 lists stay exact
                                  np.concatenate([b["expert_norms"] for b in batches]))
    assert all(np.array_equal(b["rank"][b["probs.rows"]], np.zeros(len(b["probs.rows"]))) for b in got)
    assert got[0]["expert_cos"].shape[1] == 8 * 7 // 2


def test_projection_defaults_and_sidecar(tmp_path):
    n = 4
    minimal = {"seq": np.zeros(n), "pos": np.arange(n), "token": np.arange(n), "layer": np.zeros(n),
               "rank": np.zeros(n), "expert": np.array([0, 1, 2, 3]), "weight": 0.5, "prob": 0.5}
    trace = write(tmp_path / "m.parquet", [minimal], meta=TraceMeta(num_experts=[4], top_k=1))
    (batch,) = trace.iter_batches(columns=["doc_pos", "block", "turn", "lang", "dropped"])
    assert set(batch) == {"doc_pos", "block", "turn", "lang", "lang.names", "dropped"}
    assert batch["doc_pos"].tolist() == [0, 1, 2, 3] and batch["turn"].tolist() == [-1] * n
    assert batch["lang.names"][batch["lang"]].tolist() == ["unknown"] * n and not batch["dropped"].any()
    side = json.loads(sidecar_path(trace.path).read_text())
    assert side["schema_version"] == SCHEMA_VERSION and side["num_experts"] == [4]
    one_line_error(lambda: next(trace.iter_batches(columns=["probs"])), "no column 'probs'")


def test_label_codes_stay_stable_across_row_groups(tmp_path):
    base = planted(num_seqs=1, all_experts=False)[0]
    a = dict(base, domain=np.full(len(base["expert"]), "math"))
    del a["domain.names"]
    trace = write(tmp_path / "l.parquet", [a, base], row_group_rows=1)  # one row group per batch
    got = list(trace.iter_batches(columns=["domain"], batch_rows=10_000))
    names = got[-1]["domain.names"]
    decoded = np.concatenate([names[b["domain"]] for b in got])
    assert set(decoded[: len(base["expert"])]) == {"math"} and set(decoded[len(base["expert"]):]) == {"web"}


def test_variable_list_lengths_come_as_objects(tmp_path):
    meta = TraceMeta(num_experts=[2, 3], top_k=1)
    batch = {"seq": [0, 0], "pos": [0, 0], "token": [5, 5], "layer": [0, 1], "rank": [0, 0], "expert": [1, 2],
             "weight": 1.0, "prob": 1.0, "probs": pa.array([[0.1, 0.9], [0.2, 0.3, 0.5]], pa.list_(pa.float32()))}
    (got,) = write(tmp_path / "v.parquet", [batch], meta=meta).iter_batches()
    f16 = lambda v: np.float16(v).astype(np.float32).tolist()  # noqa: E731  stored as float16
    assert got["probs"].dtype == object and got["probs"][1].tolist() == f16([0.2, 0.3, 0.5])
    (again,) = write(tmp_path / "w.parquet", [got], meta=meta).iter_batches()  # read batches write back
    assert again["probs"][0].tolist() == f16([0.1, 0.9])  # rounding twice changes nothing


def test_writer_publishes_only_on_clean_close(tmp_path):
    path = tmp_path / "w.parquet"
    writer = TraceWriter(path, META, row_group_rows=10)
    writer.write(planted(num_seqs=1)[0])
    assert writer.tmp.exists() and not path.exists()
    writer.close()
    assert path.exists() and sidecar_path(path).exists() and not writer.tmp.exists()
    bad = tmp_path / "bad.parquet"
    with pytest.raises(RuntimeError):
        with TraceWriter(bad, META, row_group_rows=10) as w:
            w.write(planted(num_seqs=1)[0])
            raise RuntimeError("interrupted")
    assert not bad.exists() and not (tmp_path / "bad.parquet.tmp").exists()


def test_an_overwrite_interrupted_between_the_renames_is_reported_not_misread(tmp_path, monkeypatch):
    """The trace is renamed before its sidecar; a crash between the two leaves the old sidecar beside the
    new file, and the reader, which trusts the file's own metadata, names the disagreement in one line."""
    import os

    from moelab.trace import io as trace_io

    path = tmp_path / "t.parquet"
    write(path, planted(num_seqs=2))
    other = TraceMeta(num_experts=[8, 8], top_k=2, source="moelab", checkpoint_step=999)
    calls, real = [], os.replace

    def crash_on_the_sidecar(src, dst):
        calls.append(str(dst))
        if str(dst).endswith(".json"):
            raise KeyboardInterrupt  # the process stops after the trace's rename
        real(src, dst)

    monkeypatch.setattr(trace_io.os, "replace", crash_on_the_sidecar)
    with pytest.raises(KeyboardInterrupt):
        write(path, planted(num_seqs=2), meta=other)
    monkeypatch.undo()
    assert calls == [str(path), str(sidecar_path(path))]  # the trace first
    one_line_error(lambda: open_trace(path), "sidecar t.parquet.json disagrees with the metadata inside the file")
    sidecar_path(path).unlink()
    assert open_trace(path).meta.checkpoint_step == 999  # the file's own record


def test_a_sidecar_beside_a_file_without_metadata_is_the_record(tmp_path):
    p = tmp_path / "r.parquet"
    write_raw(p, good_table(), dict(META.to_dict(), checkpoint_step=7))  # plain pyarrow: no moelab metadata
    assert open_trace(p).meta.checkpoint_step == 7


def test_writer_errors(tmp_path):
    row = {"seq": [0], "pos": [0], "token": [1], "layer": [0], "rank": [0], "expert": [1], "weight": 1.0, "prob": 1.0}
    one_line_error(lambda: write(tmp_path / "a.parquet", [dict(row, expert=[40000])]), "'expert' cannot be stored")
    one_line_error(lambda: write(tmp_path / "b.parquet", [dict(row, colour=[1])]), "unknown trace column 'colour'")
    one_line_error(lambda: write(tmp_path / "c.parquet", []), "would be empty")
    one_line_error(lambda: write(tmp_path / "d.parquet", [dict(row, pos=[0, 1])]), "different lengths")


def write_raw(path, table, meta: dict | None = None):
    pq.write_table(table, path)
    sidecar_path(path).write_text(json.dumps(meta if meta is not None else META.to_dict()))


def good_table(n=4):
    b = planted(num_seqs=1, all_experts=False)[0]
    trace_batch = {k: v[:n] for k, v in b.items() if not k.endswith((".names", ".rows")) and k != "probs"}
    trace_batch["domain"] = np.full(n, "web")
    trace_batch["lang"] = np.full(n, "en")
    trace_batch["doc_pos"], trace_batch["block"], trace_batch["doc"] = b["pos"][:n], b["layer"][:n], b["seq"][:n]
    return pa.table({f.name: pa.array(trace_batch[f.name]).cast(f.type) for f in trace_schema()})


def test_reader_errors(tmp_path):
    p = tmp_path / "r.parquet"
    write_raw(p, good_table())
    assert open_trace(p).num_rows == 4  # a file written by another tool, plain pyarrow, is accepted
    write_raw(p, good_table().drop_columns(["expert"]))
    one_line_error(lambda: open_trace(p), "lacks the required column 'expert'")
    t = good_table()
    write_raw(p, t.set_column(t.schema.get_field_index("expert"), "expert", t["expert"].cast(pa.string())))
    one_line_error(lambda: open_trace(p), "'expert' has type string, expected an integer")
    write_raw(p, good_table().slice(0, 0))
    one_line_error(lambda: open_trace(p), "is empty")
    write_raw(p, good_table(), dict(META.to_dict(), schema_version=SCHEMA_VERSION + 1))
    one_line_error(lambda: open_trace(p), "newer than this moelab supports")
    sidecar_path(p).write_text("{")
    one_line_error(lambda: open_trace(p), "sidecar .*json is not valid JSON")  # a bad sidecar is not skipped
    one_line_error(lambda: open_trace(tmp_path / "missing.parquet"), "trace not found")
    write_raw(tmp_path / "x.parquet", good_table())
    (tmp_path / "x.parquet").write_bytes(b"not parquet at all")
    one_line_error(lambda: open_trace(tmp_path / "x.parquet"), "not a readable Parquet file")


def test_meta_json_round_trip_and_validation():
    assert TraceMeta.from_json(META.to_json()) == META
    newer = dict(META.to_dict(), added_later=[1, 2])
    meta = TraceMeta.from_dict(newer)
    assert meta.extra == {"added_later": [1, 2]} and meta.to_dict()["added_later"] == [1, 2]
    one_line_error(lambda: TraceMeta(num_experts=[4], top_k=5), "top_k=5")
    one_line_error(lambda: TraceMeta(num_experts=[], top_k=1), "num_experts")
    one_line_error(lambda: TraceMeta.from_dict({"schema_version": 1, "top_k": 1}), "lacks the key 'num_experts'")
    one_line_error(lambda: TraceMeta.from_json("{"), "not valid JSON")
    one_line_error(lambda: TraceMeta(num_experts=[4], top_k=1, drop_policy="random"), "drop_policy")


def test_numpy_dtype_of_the_stored_types():
    assert [numpy_dtype(t) for t in (pa.int8(), pa.int16(), pa.int32(), pa.int64(), pa.float16(), pa.float32(),
                                     pa.bool_())] == [np.int8, np.int16, np.int32, np.int64, np.float16, np.float32,
                                                      np.bool_]


def test_a_sidecar_that_is_not_utf8_is_one_line(tmp_path):
    """Beside a plain-pyarrow file (the sidecar is the record) and beside a moelab file (checked against it)."""
    p = tmp_path / "r.parquet"
    write_raw(p, good_table())
    sidecar_path(p).write_bytes(b"\xff\xfe{}")
    one_line_error(lambda: open_trace(p), f"trace sidecar {sidecar_path(p)} is not UTF-8 text")
    q = tmp_path / "m.parquet"
    with TraceWriter(q, META) as writer:
        writer.write(planted(num_seqs=2)[0])
    sidecar_path(q).write_bytes(b"\xff\xfe{}")
    one_line_error(lambda: open_trace(q), "is not UTF-8 text")


def test_a_new_trace_may_not_take_a_sidecars_or_unfinished_files_name(tmp_path, capsys):
    from moelab.cli import main
    from moelab.trace.filemeta import check_trace_out

    p = tmp_path / "r.parquet"
    write_raw(p, good_table())
    side = sidecar_path(p)
    before = side.read_bytes()
    for name in (side, tmp_path / "x.parquet.tmp", tmp_path / "X.JSON"):
        one_line_error(lambda: check_trace_out(name), "a trace is a Parquet file")
    check_trace_out(tmp_path / "new.parquet")
    check_trace_out(tmp_path / "routing")  # no suffix: a name, not a sidecar's
    # through the CLI, even with --overwrite: trace import and trace both check before reading anything
    assert main(["trace", "import", "replay", str(tmp_path / "missing.npy"), "--out", str(side), "--overwrite"]) == 2
    assert "a trace is a Parquet file" in capsys.readouterr().err
    assert main(["trace", str(tmp_path / "no-model"), "--data", str(tmp_path), "--out", str(side), "--overwrite"]) == 2
    assert "a trace is a Parquet file" in capsys.readouterr().err
    assert side.read_bytes() == before


def test_a_trace_names_its_tokenizer_by_an_absolute_path(tiny_run, tmp_path, monkeypatch):
    """Traced with a relative --data, the report still quotes token text when built from another folder."""
    from moelab.cli import main
    from moelab.report.build import token_decoder
    from moelab.trace.io import open_trace

    monkeypatch.chdir(tiny_run)
    out = tmp_path / "t.parquet"
    assert main(["trace", "run", "--data", "corpus", "--tokens", "16", "--seq-len", "16", "--out", str(out)]) == 0
    monkeypatch.chdir(tmp_path)
    meta = open_trace(out).meta
    assert meta.tokenizer == str((tiny_run / "corpus" / "tokenizer.json").resolve())
    decode = token_decoder(meta)
    assert decode is not None and isinstance(decode(5), str)
