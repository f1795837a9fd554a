"""The streaming reader checks the documented rules: each planted violation stops with one line naming it,
a clean trace (the answer "nothing") passes at any batch size, and `validate=False` is what lets a bad
file through."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from moelab.analysis.synthetic import planted_batches
from moelab.cli import main
from moelab.config import MoelabError
from moelab.trace.io import TraceWriter, open_trace
from moelab.trace.schema import TraceMeta

META = TraceMeta(num_experts=[8, 8], top_k=2)


def planted(**kw):
    args = dict(num_seqs=4, seq_len=12, num_layers=2, num_experts=8, top_k=2, seqs_per_batch=4)
    (batch,) = planted_batches(**{**args, **kw})
    return batch


def write(path, batch, meta=META):
    with TraceWriter(path, meta) as w:
        w.write(batch)
    return open_trace(path)


def drain(trace, **kw):
    for _ in trace.iter_batches(**kw):
        pass


def one_line_error(fn, match):
    with pytest.raises(MoelabError, match=match) as e:
        fn()
    assert "\n" not in str(e.value)


def with_probs(batch, rows_E):
    out = {k: v for k, v in batch.items() if k not in ("probs", "probs.rows")}
    offsets = np.concatenate([[0], np.cumsum([0 if r is None else len(r) for r in rows_E])]).astype(np.int32)
    flat = np.concatenate([r for r in rows_E if r is not None]).astype(np.float32)
    mask = pa.array([r is None for r in rows_E])
    out["probs"] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat), mask=mask)
    return out


def probs_rows(batch):
    rows = [None] * len(batch["expert"])
    for i, r in enumerate(batch["probs.rows"]):
        rows[r] = batch["probs"][i].copy()
    return rows


def test_a_clean_trace_passes_at_any_batch_size(tmp_path):
    trace = write(tmp_path / "ok.parquet", planted())
    for rows in (1, 3, 5, 97, 1 << 20):  # groups of top_k rows straddle batches at odd sizes
        drain(trace, batch_rows=rows)


def at(batch, name, i, value):
    return dict(batch, **{name: np.where(np.arange(len(batch[name])) == i, value, batch[name])})


def test_each_violation_is_one_line(tmp_path):
    batch = planted()
    dup = dict(batch, expert=batch["expert"].copy())
    dup["expert"][7] = dup["expert"][6]  # rows 6, 7: ranks 0 and 1 of one (token, layer)
    nine = dict(batch, expert=batch["expert"].copy())
    nine["expert"][10] = 9
    short, nan = probs_rows(batch), probs_rows(batch)
    short[4] = short[4][:7]
    nan[8][3] = np.nan
    cases = [
        (dup, "holds expert .* twice within one \\(token, layer\\)"),
        (nine, "declares num_experts=8 but holds expert 9"),
        (with_probs(batch, short), "'probs' has a list of length 7 where the layer's E=8 needs 8"),
        (with_probs(batch, nan), "'probs' holds NaN"),
        (at(batch, "prob", 3, np.nan), "'prob' holds NaN"),
        (at(batch, "expert", 5, -1), "holds expert -1"),
        (at(batch, "layer", 2, 2), "holds layer 2 but declares 2"),
        (at(batch, "rank", 1, 2), "holds rank 2 but declares top_k=2"),
    ]
    for i, (bad, match) in enumerate(cases):
        trace = write(tmp_path / f"bad{i}.parquet", bad)
        one_line_error(lambda: drain(trace), match)
        drain(trace, validate=False)  # the check, not the file, is what refuses it


def test_duplicate_split_between_batches_is_found(tmp_path):
    batch = planted()
    bad = dict(batch, expert=batch["expert"].copy())
    bad["expert"][9] = bad["expert"][8]
    trace = write(tmp_path / "dup.parquet", bad)
    one_line_error(lambda: drain(trace, batch_rows=9), "twice within one")  # rows 8 | 9 in two batches


def test_per_layer_expert_counts(tmp_path):
    meta = TraceMeta(num_experts=[8, 4], top_k=2)
    batch = planted()
    batch["expert"] = np.where(batch["layer"] == 1, batch["expert"] % 4, batch["expert"]).astype(np.int16)
    keep = np.repeat((batch["expert"].reshape(-1, 2)[:, 0] != batch["expert"].reshape(-1, 2)[:, 1]), 2)
    clean = {k: v[keep] for k, v in batch.items() if not k.startswith("probs") and not k.endswith(".names")}
    clean["domain"], clean["lang"] = "web", "en"
    drain(write(tmp_path / "ok.parquet", clean, meta))
    bad = dict(clean, expert=clean["expert"].copy())
    i = int(np.flatnonzero(clean["layer"] == 1)[0])
    bad["expert"][i] = 6
    one_line_error(lambda: drain(write(tmp_path / "bad.parquet", bad, meta)),
                   "declares num_experts=4 for layer 1 but holds expert 6")


def test_cli_exit_2_on_a_bad_trace(tmp_path, capsys):
    batch = planted()
    batch["expert"] = batch["expert"].copy()
    batch["expert"][3] = 9
    write(tmp_path / "t.parquet", batch)
    code = main(["trace", "export", str(tmp_path / "t.parquet"), "--format", "replay",
                 "--out", str(tmp_path / "r.npy")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "holds expert 9" in err
    assert not (tmp_path / "r.npy").exists()


def test_statistics_spare_only_what_they_prove(tmp_path):
    import pyarrow.parquet as pq

    from moelab.trace.filemeta import proven_in_range
    from moelab.trace.io import sidecar_path

    clean = write(tmp_path / "ok.parquet", planted())
    assert proven_in_range(pq.ParquetFile(clean.path), META) == {"layer", "rank", "expert"}
    batch = planted()
    batch["expert"] = batch["expert"].copy()
    batch["expert"][3] = 9
    bad = write(tmp_path / "bad.parquet", batch)
    assert proven_in_range(pq.ParquetFile(bad.path), META) == {"layer", "rank"}
    # a file without statistics proves nothing and is checked row by row
    pq.write_table(pq.read_table(bad.path), tmp_path / "nostats.parquet", write_statistics=False)
    sidecar_path(tmp_path / "nostats.parquet").write_text(META.to_json())
    nostats = open_trace(tmp_path / "nostats.parquet")
    assert proven_in_range(pq.ParquetFile(nostats.path), META) == frozenset()
    one_line_error(lambda: drain(nostats), "holds expert 9")


@pytest.mark.parametrize("verb", ["analyze", "analyze --workers 2", "diff"])
def test_a_nan_weight_is_refused_by_analyze_and_diff(tmp_path, capsys, verb):
    """Neither verb uses `weight`, so neither read it, and a trace explore --full-check refuses passed."""
    good = write(tmp_path / "good.parquet", planted())
    bad = write(tmp_path / "bad.parquet", at(planted(), "weight", 5, np.nan))
    out = tmp_path / "out"
    argv = {"analyze": ["analyze", str(bad.path), "--out", str(out), "--permutations", "2", "--bootstrap", "0"],
            "diff": ["diff", str(good.path), str(bad.path), "--out", str(out)]}[verb.split()[0]] + verb.split()[1:]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"trace {bad.path} column 'weight' holds NaN" in err[0], err
    assert not out.exists()
