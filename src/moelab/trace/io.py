"""Parquet I/O for routing traces: a streaming `TraceWriter` and `open_trace` -> `Trace`.

Writing appends record batches as they come and flushes a row group every ~1M rows (or 128 MiB), so
memory stays bounded however long the trace; the file appears at its path only when the writer closes
cleanly (it is written to `<path>.tmp` and renamed). Reading streams column-projected record batches
as dicts of numpy arrays and never reads the whole file. docs/TRACE.md describes the format.
"""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from moelab.config import MoelabError
from moelab.trace.schema import (
    DEFAULTED, LABEL_COLUMNS, LIST_COLUMNS, META_KEY, NULLABLE, OPTIONAL, REQUIRED, SidecarError, TraceMeta,
    field_type, numpy_dtype, trace_schema, validate_schema,
)
from moelab.trace.filemeta import all_null, proven_in_range, read_meta, sidecar_path
from moelab.trace.stitch import JoinedParquet, check_joined, encode_group, joinable
from moelab.trace.validate import BatchValidator, fit_dtype

ROW_GROUP_ROWS = 1 << 20
BUFFER_BYTES = 128 << 20
# Per-token columns repeat each value on all L * K rows of a token: compression alone packs those runs, and
# plain encoding skips a dictionary's hash of every value. `seq` and the per-row ids keep their dictionaries.
PLAIN_RUNS = ("pos", "doc_pos", "token", "doc", "turn", "rank", "dropped")
# Columns a writer may leave out, and what they become (documented in docs/TRACE.md).
COPIED_DEFAULTS = {"doc_pos": "pos", "doc": "seq", "block": "layer"}
CONSTANT_DEFAULTS = {"turn": -1, "domain": "unknown", "lang": "unknown", "dropped": False}


# ---- writing ---------------------------------------------------------------------------------------
def parquet_options(schema: pa.Schema) -> dict[str, Any]:
    """How a trace's columns are encoded. At a 7B model's forward speed, encoding is the slowest step of a
    trace (docs/PERFORMANCE.md, "The host side of tracing"); each choice was measured on OLMoE-1B-7B's
    routing shape, 2.1M rows a row group:

    - lz4, not zstd: 23% less encoding time and 35% less reading time for files 2% (no probs) to 10%
      (float16 probs) larger.
    - Floats get no dictionary: it is built only to be dropped (the per-row weight and prob: half their
      encoding time, smaller files). float32 gets byte-stream-split, which compresses better; float16 does
      not, because DuckDB (2.0) cannot read byte-stream-split float16, and SQL over a trace must work.
    - No statistics on the float list columns (probabilities, norms): float16 min/max took a quarter of
      the probs column's encoding time, and no reader prunes on them. Every other column keeps its
      statistics: the readers use those of seq, pos, layer, rank, expert and the nullable columns.
    - `PLAIN_RUNS` are plain encoded (15% less encoding time, files the same size).
    - Page checksums: a damaged float page decodes to plausible numbers, so the reader checks the CRC.
    - No page index (nor bloom filters, Arrow's default): a writer with several encoders joins row groups
      encoded apart (`trace.stitch`), and those live after all row groups.
    """
    floats = [f.name for f in schema if pa.types.is_floating(_value_type(f.type))]
    split = [_leaf(f) for f in schema if f.name in floats and _value_type(f.type) == pa.float32()]
    return dict(compression="lz4", use_byte_stream_split=split, write_page_checksum=True, write_page_index=False,
                use_dictionary=[_leaf(f) for f in schema if f.name not in floats and f.name not in PLAIN_RUNS],
                write_statistics=[_leaf(f) for f in schema if not (f.name in floats and f.name in LIST_COLUMNS)])


def _leaf(field: pa.Field) -> str:
    """The Parquet column path of a trace field (a list's element for list columns)."""
    return f"{field.name}.list.element" if pa.types.is_list(field.type) else field.name


def _value_type(typ: pa.DataType) -> pa.DataType:
    """A list column's element type, else the type itself."""
    return typ.value_type if pa.types.is_list(typ) else typ


def _label_array(value: Any, n: int, names: Any = None) -> pa.Array:
    if names is not None:  # int codes into `names`, as Trace.iter_batches yields them
        return pa.DictionaryArray.from_arrays(pa.array(np.asarray(value, np.int32)),
                                              pa.array(np.asarray(names, dtype=str)))
    if isinstance(value, str):
        return pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int32)), pa.array([value]))
    arr = value if isinstance(value, (pa.Array, pa.ChunkedArray)) else pa.array(np.asarray(value, dtype=str))
    if pa.types.is_dictionary(arr.type):
        arr = arr.cast(pa.string())
    return pc.dictionary_encode(arr.cast(pa.string()))


def _list_array(value: Any, rank0_R: np.ndarray, name: str, rows: Any = None) -> pa.Array:
    """Rows x n or rank0-rows x n matrix -> the column's list type filled on rank-0 rows, null elsewhere.

    With `rows` (as Trace.iter_batches yields it) the values cover exactly those rows instead, and may
    be an object array of 1-D arrays when their lengths differ (layers with different E). Values are
    stored in the column's width: `probs` rounds to float16 here (schema.PROBS_TYPE)."""
    typ = field_type(name)
    dtype = numpy_dtype(typ.value_type)
    if isinstance(value, (pa.Array, pa.ChunkedArray)):
        if dtype.kind == "i":  # ids: the same range rule as for numpy input, not Arrow's error
            flat = pc.list_flatten(value)
            lo, hi = pc.min_max(flat).values() if len(flat) else (None, None)
            if not pa.types.is_integer(flat.type) or (lo is not None and not 0 <= lo.as_py() <= hi.as_py()
                                                      <= np.iinfo(dtype).max):
                raise MoelabError(f"trace column {name!r} holds expert ids (integers in 0..{np.iinfo(dtype).max})")
        return value.cast(typ, safe=not pa.types.is_floating(typ.value_type))
    if rows is not None:
        rank0_R = np.zeros(len(rank0_R), dtype=bool)
        rank0_R[np.asarray(rows)] = True
    n_rank0 = int(rank0_R.sum())
    if isinstance(value, np.ndarray) and value.dtype == object and len(value) == n_rank0:
        lengths_P = np.fromiter(map(len, value), dtype=np.int64, count=len(value))
        flat = np.concatenate(list(value)) if len(value) else np.zeros(0, dtype)
        _check_ids(flat, dtype, name)
        with np.errstate(over="ignore"):
            flat = flat.astype(dtype, copy=False)
    else:
        mat = np.asarray(value)
        _check_ids(mat, dtype, name)
        with np.errstate(over="ignore"):  # a float16 overflow becomes inf, which no probability reaches
            mat = mat.astype(dtype, copy=False)
        if mat.ndim != 2 or mat.shape[0] not in (len(rank0_R), n_rank0):
            raise MoelabError(f"trace column {name!r} needs shape (rows or rank-0 rows, n), got {mat.shape}")
        if mat.shape[0] == len(rank0_R) and n_rank0 != len(rank0_R):
            mat = mat[rank0_R]
        lengths_P, flat = np.full(n_rank0, mat.shape[1]), mat.reshape(-1)
    lengths = np.zeros(len(rank0_R), np.int64)
    lengths[rank0_R] = lengths_P
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat), mask=pa.array(~rank0_R))


def _check_ids(values: np.ndarray, dtype: np.dtype, name: str) -> None:
    """An integer list column (expert ids) takes integers in 0..max of its type, never wrapped."""
    if dtype.kind == "i" and (values.dtype.kind not in "iu" or values.size and not 0 <= values.min()
                              <= values.max() <= np.iinfo(dtype).max):
        raise MoelabError(f"trace column {name!r} holds expert ids (integers in 0..{np.iinfo(dtype).max})")


def _plain_array(value: Any, n: int, name: str) -> pa.Array:
    typ = field_type(name)
    if value is None and name in NULLABLE:  # a source that did not record it (TraceMeta.null_columns)
        return pa.nulls(n, typ)
    if np.isscalar(value):
        value = np.full(n, value)
    try:
        arr = value if isinstance(value, (pa.Array, pa.ChunkedArray)) else pa.array(np.asarray(value))
        return arr.cast(typ, safe=not pa.types.is_floating(typ))
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as e:
        raise MoelabError(f"trace column {name!r} cannot be stored as {typ}: {e}") from None


class TraceWriter:
    """Context manager that streams row batches into a Parquet trace and its JSON sidecar.

    `write(columns)` takes a mapping column -> numpy array / list / pyarrow array / scalar (broadcast).
    List columns take a 2-D array over all rows or over the rank-0 rows only. The optional columns of
    the file are those of the first batch unless `optional` names them.

    `background=True` encodes each row group on a thread of its own while the caller goes on building the
    next: Parquet encoding is the slowest step of tracing a fast model and releases the GIL. `encoders=N`
    encodes up to N row groups at once, each into a one-group file in memory, and joins them in order
    (`trace.stitch`): Arrow's encoder is single-threaded, so this is how a trace uses more than one core
    for it (with pyarrow >= 18; an older one encodes on one thread, `stitch.joinable`). At most N row
    groups are in flight (memory stays bounded); the file is byte for byte the one
    written without them, and an error there surfaces at the next flush or at close, which then leaves
    no file.
    """

    def __init__(self, path: str | Path, meta: TraceMeta, *, optional: list[str] | None = None,
                 row_group_rows: int = ROW_GROUP_ROWS, buffer_bytes: int = BUFFER_BYTES, background: bool = False,
                 encoders: int = 1):
        self.path = Path(path)
        self.tmp = Path(str(path) + ".tmp")
        self.meta = meta
        self.optional = None if optional is None else list(optional)
        self.row_group_rows = row_group_rows
        self.buffer_bytes = buffer_bytes
        self.num_rows = 0
        self._buffer: list[pa.RecordBatch] = []
        self._buffered_rows = self._buffered_bytes = 0
        self._writer: pq.ParquetWriter | None = None
        self._schema: pa.Schema | None = None
        self._closed = False
        self.encoders = max(1, int(encoders))
        background = background or self.encoders > 1
        self._join = background and self.encoders > 1 and joinable()
        self._in_flight = self.encoders if self._join else 1
        self._pool = ThreadPoolExecutor(self._in_flight, thread_name_prefix="trace-writer") if background else None
        self._pending: deque[Future] = deque()  # row groups being encoded, in file order
        self._file = None
        self._joined: JoinedParquet | None = None

    def __enter__(self) -> "TraceWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def _to_batch(self, columns: Mapping[str, Any]) -> pa.RecordBatch:
        if "expert" not in columns:
            raise MoelabError("trace batch lacks the required column 'expert'")
        n = len(np.atleast_1d(columns["expert"]))
        companions = [f"{c}.names" for c in LABEL_COLUMNS] + [f"{c}.rows" for c in LIST_COLUMNS]
        unknown = [c for c in columns if c not in REQUIRED + OPTIONAL + tuple(companions)]
        if unknown:
            raise MoelabError(f"unknown trace column {unknown[0]!r}")
        if self.optional is None:
            self.optional = [c for c in OPTIONAL if c in columns]
        if self._schema is None:  # the sidecar rides in the file too, so that one file is a whole trace
            self._schema = trace_schema(self.optional).with_metadata({META_KEY: self.meta.to_json()})
        cols = dict(columns)
        for name, source in COPIED_DEFAULTS.items():
            if name not in cols and source in cols:
                cols[name] = cols[source]
        for name, value in CONSTANT_DEFAULTS.items():
            cols.setdefault(name, value)
        rank0_R = np.asarray(_plain_array(cols.get("rank", 0), n, "rank")) == 0
        arrays = []
        for field in self._schema:
            if field.name not in cols:
                raise MoelabError(f"trace batch lacks the column {field.name!r}")
            value = cols[field.name]
            if field.name in LABEL_COLUMNS:
                arrays.append(_label_array(value, n, cols.get(f"{field.name}.names")))
            elif field.name in LIST_COLUMNS:
                arrays.append(_list_array(value, rank0_R, field.name, cols.get(f"{field.name}.rows")))
            else:
                arrays.append(_plain_array(value, n, field.name))
        lengths = {len(a) for a in arrays}
        if lengths != {n}:
            raise MoelabError(f"trace batch columns have different lengths: {sorted(lengths)}")
        return pa.RecordBatch.from_arrays(arrays, schema=self._schema)

    def write(self, columns: Mapping[str, Any]) -> None:
        if self._closed:
            raise MoelabError(f"trace writer for {self.path} is already closed")
        batch = self._to_batch(columns)
        self._buffer.append(batch)
        self._buffered_rows += batch.num_rows
        self._buffered_bytes += batch.nbytes
        if self._buffered_rows >= self.row_group_rows or self._buffered_bytes >= self.buffer_bytes:
            self._flush()

    def _flush(self) -> None:
        if not self._buffer:
            return
        batches, rows = self._buffer, self._buffered_rows
        self._buffer, self._buffered_rows, self._buffered_bytes = [], 0, 0
        self.num_rows += rows
        if self._pool is None:
            self._write_group(batches)
        else:
            self._drain(self._in_flight - 1)  # an earlier group's error surfaces here
            if self._join:
                job = self._pool.submit(self._encode_group, batches)
            else:
                job = self._pool.submit(self._write_group, batches)
            self._pending.append(job)

    def _drain(self, keep: int) -> None:
        """Finish row groups in order until at most `keep` are in flight (and those done too); encoded
        parts are appended to the joined file."""
        while self._pending and (len(self._pending) > keep or self._pending[0].done()):
            part = self._pending.popleft().result()
            if not self._join:
                continue
            if self._joined is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._file = open(self.tmp, "wb")
                self._joined = JoinedParquet(self._file)
            self._joined.append(part)

    def _encode_group(self, batches: list[pa.RecordBatch]) -> pa.Buffer:
        return encode_group(self._group_table(batches), parquet_options(self._schema))

    def _group_table(self, batches: list[pa.RecordBatch]) -> pa.Table:
        """One row group's batches as one table, label dictionaries unified across them."""
        return pa.Table.from_batches(batches, self._schema).unify_dictionaries().combine_chunks()

    def _write_group(self, batches: list[pa.RecordBatch]) -> None:
        if self._writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._writer = pq.ParquetWriter(self.tmp, self._schema, **parquet_options(self._schema))
        table = self._group_table(batches)
        self._writer.write_table(table, row_group_size=max(table.num_rows, 1))

    def close(self) -> None:
        """Flush, then publish the trace and its sidecar. An empty trace is an error, not a file."""
        if self._closed:
            return
        tmp_meta = Path(str(sidecar_path(self.path)) + ".tmp")
        try:
            self._flush()
            self._drain(0)
            self._stop()
            if self._joined is not None:
                self._joined.finish()
                self._file.close()
                check_joined(self.tmp, self.num_rows, len(self._joined.groups))
            elif self._writer is None:
                raise MoelabError(f"trace {self.path} would be empty: no rows were written")
            else:
                self._writer.close()
            tmp_meta.write_text(self.meta.to_json(), encoding="utf-8")
        except BaseException:  # the last flush (a full disk): the exit will not abort for us
            self.abort()
            tmp_meta.unlink(missing_ok=True)
            raise
        self._closed = True
        # The trace first: it carries its metadata, which the reader trusts over the sidecar, and a crash
        # between the two renames leaves an old sidecar that the reader reports as disagreeing.
        os.replace(self.tmp, self.path)
        os.replace(tmp_meta, sidecar_path(self.path))

    def _stop(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def abort(self) -> None:
        """Drop everything written so far: no partial trace is ever left at `path`."""
        self._closed = True
        for pending in self._pending:
            pending.cancel()
        for pending in self._pending:
            try:
                pending.result()
            except BaseException:  # the error being handled is the caller's; this one goes with the file
                pass
        self._pending.clear()
        self._stop()
        if self._file is not None:
            self._file.close()
        if self._writer is not None:
            try:
                self._writer.close()
            except OSError:  # closing writes the footer: on a full disk that fails too; the file goes anyway
                pass
            self._writer = None
        self.tmp.unlink(missing_ok=True)


# ---- reading ---------------------------------------------------------------------------------------
class _LabelCodes:
    """Stable int32 codes for a label column across batches whose dictionaries differ (one per row group)."""

    def __init__(self) -> None:
        self.code: dict[str, int] = {}

    def encode(self, arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
        if not pa.types.is_dictionary(arr.type):
            arr = pc.dictionary_encode(arr)
        lut = np.array([self.code.setdefault(s, len(self.code)) for s in arr.dictionary.to_pylist()],
                       dtype=np.int32)
        codes = lut[arr.indices.to_numpy(zero_copy_only=False)] if len(lut) else np.zeros(0, np.int32)
        return codes, np.array(list(self.code), dtype=object)


def _list_to_numpy(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(values, rows): a 2-D array over the non-null rows when lengths agree, else an object array of 1-D.

    `flatten` skips null lists and is usually a zero-copy slice of the values buffer: wide all-experts
    columns are not copied on the way to numpy. Floats come as float32 whatever the stored width (float16
    `probs` widen exactly), integer lists (expert ids) as int16."""
    rows = np.flatnonzero(arr.is_valid().to_numpy(zero_copy_only=False))
    flat = arr.flatten().to_numpy(zero_copy_only=False)
    if flat.dtype.kind == "f" and flat.dtype != np.float32:  # float16 `probs` (or another writer's doubles)
        flat = flat.astype(np.float32)
    elif flat.dtype.kind in "iu" and flat.dtype != np.int16:
        flat = fit_dtype(flat, "expert", "trace list column")  # ids, range-checked into int16
    lengths = pc.list_value_length(arr).drop_null().to_numpy(zero_copy_only=False)
    if not len(lengths):  # no rank-0 row in this batch: still the column's dtype (int16 ids stay integers)
        return np.zeros((0, 0), flat.dtype), rows
    if np.all(lengths == lengths[0]):
        return flat.reshape(len(lengths), int(lengths[0])), rows
    out = np.empty(len(lengths), dtype=object)
    out[:] = np.split(flat, np.cumsum(lengths)[:-1])
    return out, rows


class Trace:
    """An opened trace: `meta`, `num_rows`, `columns`, and `iter_batches` streaming numpy column dicts.

    `columns` lists what a read can ask for: the stored columns, the defaulted ones the file leaves out,
    and not the columns whose every value is null (`null_columns`: column -> why, e.g. an imported
    replay array has no router probabilities).
    """

    def __init__(self, path: Path, meta: TraceMeta, file: pq.ParquetFile, optional: list[str]):
        self.path, self.meta, self._file = path, meta, file
        self.num_rows = file.metadata.num_rows
        names = set(file.schema_arrow.names)
        self.defaulted = [c for c in DEFAULTED if c not in names]
        self.null_columns = {c: meta.null_columns.get(c, "every value is null") for c in NULLABLE
                             if c in meta.null_columns or all_null(file, c)}
        self.columns = [c for c in REQUIRED if c not in self.null_columns] + optional
        self.optional = optional
        self._proven = proven_in_range(file, meta)

    @property
    def notes(self) -> list[str]:
        return list(self.meta.notes)

    @property
    def probs_mode(self) -> str:
        """What the trace keeps of each router distribution: the sidecar's record ("full", "none", "top:N"),
        else what the columns show (a trace written before the record existed: "full" or "none")."""
        if self.meta.probs_mode is not None:
            return self.meta.probs_mode
        if "topn_probs" in self.optional:  # another writer's top-N columns without the record: N from the rows
            for rb in self._file.iter_batches(batch_size=4096, columns=["topn_probs"]):
                lengths = pc.drop_null(pc.list_value_length(rb.column(0)))
                if len(lengths):
                    return f"top:{int(pc.max(lengths).as_py())}"
        return "full" if "probs" in self.optional else "none"

    def _plan(self, columns: list[str]) -> list[str]:
        """Check a request; return the stored columns to read for it (defaults copy pos, seq or layer)."""
        for c in columns:
            if c in self.null_columns:
                raise MoelabError(f"trace {self.path} has no {c!r} values ({self.null_columns[c]}): "
                                  f"what needs them cannot run on it")
            if c not in self.columns:
                raise MoelabError(f"trace {self.path} has no column {c!r} (it has: {', '.join(self.columns)})")
        wanted = set(columns) | {COPIED_DEFAULTS[c] for c in columns if c in self.defaulted and c in COPIED_DEFAULTS}
        return [c for c in self.columns if c in wanted and c not in self.defaulted]

    def iter_batches(self, columns: list[str] | None = None, batch_rows: int = ROW_GROUP_ROWS,
                     validate: bool = True, row_groups: Sequence[int] | None = None) -> Iterator[dict[str, np.ndarray]]:
        """Yield dicts of numpy arrays, reading only `columns` (default: all) `batch_rows` rows at a time.

        Label columns (domain, lang) come as int32 codes, stable over the whole iteration, with their
        names so far under `"<col>.names"`. List columns come as a 2-D array over their non-null rows
        (the rank-0 rows) with those rows' indices within the batch under `"<col>.rows"`. Numbers come in
        the canonical dtypes whatever width the file stores. `validate` checks the documented rules on the
        columns read (validate.BatchValidator); a violation is a MoelabError naming it. `row_groups`
        reads only those Parquet row groups (ascending; default all): a worker's share of the file.
        """
        columns = list(self.columns if columns is None else columns)
        read = self._plan(columns)
        labels = {c: _LabelCodes() for c in columns if c in LABEL_COLUMNS}
        checker = BatchValidator(self.meta, f"trace {self.path}", self._proven) if validate else None
        for group in range(self._file.metadata.num_row_groups) if row_groups is None else row_groups:
            # A fresh reader per row group: a long-lived one keeps every pre-buffered row group cached,
            # so memory would grow with the file instead of staying at one row group.
            file = pq.ParquetFile(self.path, metadata=self._file.metadata, page_checksum_verification=True)
            try:
                for rb in _checked(file.iter_batches(batch_size=batch_rows, row_groups=[group], columns=read),
                                   f"trace {self.path} row group {group}"):
                    out = self._to_numpy(rb, labels)
                    self._fill_defaults(out, columns, rb.num_rows)
                    if checker is not None:
                        checker.check(out)
                    yield {k: v for k, v in out.items() if k.split(".")[0] in columns}
            finally:
                file.close()

    def _to_numpy(self, rb: pa.RecordBatch, labels: dict[str, _LabelCodes]) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for name in rb.schema.names:
            arr = rb.column(name)
            if name in LIST_COLUMNS:
                out[name], out[f"{name}.rows"] = _list_to_numpy(arr)
                continue
            if arr.null_count:
                raise MoelabError(f"trace {self.path} column {name!r} has null values")
            if name in labels:
                out[name], out[f"{name}.names"] = labels[name].encode(arr)
            else:
                out[name] = fit_dtype(arr.to_numpy(zero_copy_only=False), name, f"trace {self.path}")
        return out

    def _fill_defaults(self, out: dict[str, np.ndarray], columns: list[str], n: int) -> None:
        """The writer's defaults for the columns this file leaves out (docs/TRACE.md)."""
        for name in (c for c in columns if c in self.defaulted):
            dtype = field_type(name)
            if name in COPIED_DEFAULTS:
                out[name] = out[COPIED_DEFAULTS[name]].astype(numpy_dtype(dtype))
            elif name in LABEL_COLUMNS:
                out[name] = np.zeros(n, np.int32)
                out[f"{name}.names"] = np.array([CONSTANT_DEFAULTS[name]], dtype=object)
            else:
                out[name] = np.full(n, CONSTANT_DEFAULTS[name], dtype=numpy_dtype(dtype))


def _checked(batches: Iterator[pa.RecordBatch], where: str) -> Iterator[pa.RecordBatch]:
    """Record batches, a damaged page (failed checksum, undecodable data) becoming one MoelabError line."""
    while True:
        try:
            rb = next(batches)
        except StopIteration:
            return
        except (OSError, pa.ArrowInvalid) as e:
            raise MoelabError(f"{where} is unreadable: {str(e).strip().splitlines()[0]}") from None
        yield rb


def open_trace(path: str | Path) -> Trace:
    """Open and validate a trace (schema, metadata, non-empty) without reading its rows."""
    path = Path(path)
    if not path.is_file():
        raise MoelabError(f"trace not found: {path}")
    try:
        file = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise MoelabError(f"trace {path} is not a readable Parquet file: {e}") from None
    optional = validate_schema(file.schema_arrow, where=f"trace {path}")
    if file.metadata.num_rows == 0:
        raise MoelabError(f"trace {path} is empty (0 rows)")
    try:
        meta = read_meta(path, file)
    except SidecarError as e:  # name the file the bad record came from
        side = sidecar_path(path)
        where = f"its sidecar {side}" if side.is_file() else f"its metadata {META_KEY.decode()!r}"
        raise MoelabError(f"trace {path}: {where} {e.problem}") from None
    return Trace(path, meta, file, optional)
