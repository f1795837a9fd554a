"""What a trace file says about itself: its metadata (sidecar, Parquet key-value metadata, or inferred
from the rows) and which columns hold nothing but nulls. Used by `io.open_trace`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from moelab.config import MoelabError
from moelab.trace.schema import META_KEY, TraceMeta
from moelab.trace.validate import fit_dtype

SCAN_ROWS = 1 << 20


def sidecar_path(path: str | Path) -> Path:
    return Path(str(path) + ".json")


def check_trace_out(path: str | Path, flag: str = "--out", overwrite: bool = True) -> None:
    """A place a new trace may be written: a writable file path whose name is not one a trace writes
    beside itself (X.json, its sidecar; X.tmp, the file while it is written), which would replace another
    trace's sidecar or be taken for one; an existing file only with `overwrite` (the rule of train,
    upcycle, convert and intervene: an earlier result is never replaced silently)."""
    from moelab.outpath import check_out_file

    check_out_file(path, flag)
    if Path(path).suffix.lower() in (".json", ".tmp"):
        raise MoelabError(f"{flag} {path}: a trace is a Parquet file and {Path(path).suffix} names a trace's "
                          "sidecar or unfinished file: give a name such as routing.parquet")
    if not overwrite and Path(path).is_file():  # a folder is refused by check_out_file
        raise MoelabError(f"{flag} {path} already exists: pass --overwrite to replace it, or choose another")


def all_null(file: pq.ParquetFile, name: str) -> bool:
    """Whether the file's statistics say every value of column `name` is null (False when unknown)."""
    schema = file.schema_arrow
    if name not in schema.names:
        return False
    if pa.types.is_null(schema.field(name).type):
        return True
    md = file.metadata
    paths = [md.row_group(0).column(j).path_in_schema for j in range(md.num_columns)] if md.num_row_groups else []
    if name not in paths:
        return False
    j = paths.index(name)
    for g in range(md.num_row_groups):
        stats = md.row_group(g).column(j).statistics
        if stats is None or not stats.has_null_count or stats.null_count != md.row_group(g).num_rows:
            return False
    return md.num_row_groups > 0


def proven_in_range(file: pq.ParquetFile, meta: TraceMeta) -> frozenset[str]:
    """The id columns whose Parquet statistics (min/max of every row group) already prove them in range,
    so the reader need not scan them again: layer in 0..L-1, rank in 0..K-1, expert in 0..E-1 (uniform E).
    Anything unproven, or out of range, is left to the per-batch checks, which name the offending row."""
    limits = {"layer": len(meta.num_experts), "rank": meta.top_k}
    if len(set(meta.num_experts)) == 1:
        limits["expert"] = meta.num_experts[0]
    md = file.metadata
    if not md.num_row_groups:
        return frozenset()
    paths = [md.row_group(0).column(j).path_in_schema for j in range(md.num_columns)]
    proven = set()
    for name, limit in limits.items():
        if name not in paths:
            continue
        j = paths.index(name)
        stats = [md.row_group(g).column(j).statistics for g in range(md.num_row_groups)]
        if all(s is not None and s.has_min_max and 0 <= s.min and s.max < limit for s in stats):
            proven.add(name)
    return frozenset(proven)


def read_meta(path: Path, file: pq.ParquetFile) -> TraceMeta:
    """The file's own key-value metadata (moelab writes it into every trace), else the sidecar (a trace
    written by another tool), else inferred from the rows. A sidecar that disagrees with the file's own
    record is an error: an interrupted overwrite, or an edit that the file would silently contradict."""
    side = sidecar_path(path)
    kv = file.schema_arrow.metadata or {}
    if META_KEY not in kv:
        return TraceMeta.from_json(_sidecar_text(side)) if side.is_file() else infer_meta(path, file)
    try:
        text = kv[META_KEY].decode("utf-8")
    except UnicodeDecodeError:
        raise MoelabError(f"trace {path} metadata {META_KEY.decode()!r} is not UTF-8 text") from None
    meta = TraceMeta.from_json(text)
    if side.is_file() and TraceMeta.from_json(_sidecar_text(side)).to_json() != meta.to_json():
        raise MoelabError(f"trace {path}: its sidecar {side.name} disagrees with the metadata inside the file (an "
                          f"interrupted write or an edited sidecar); delete {side.name} to use the file's own")
    return meta


def _sidecar_text(side: Path) -> str:
    try:
        return side.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise MoelabError(f"trace sidecar {side} is not UTF-8 text (a JSON file moelab writes is)") from None
    except OSError as e:
        raise MoelabError(f"trace sidecar {side} cannot be read: {e.strerror or e}") from None


def infer_meta(path: Path, file: pq.ParquetFile) -> TraceMeta:
    """num_experts per layer = its largest expert id + 1; top_k = largest rank + 1; with a note saying so."""
    where = f"trace {path}"
    max_E: dict[int, int] = {}
    top_k = 0
    for rb in file.iter_batches(batch_size=SCAN_ROWS, columns=["layer", "rank", "expert"]):
        if any(rb.column(c).null_count for c in ("layer", "rank", "expert")):
            raise MoelabError(f"{where} has null values in layer, rank or expert")
        layer = fit_dtype(rb.column("layer").to_numpy(zero_copy_only=False), "layer", where)
        expert = fit_dtype(rb.column("expert").to_numpy(zero_copy_only=False), "expert", where)
        rank = fit_dtype(rb.column("rank").to_numpy(zero_copy_only=False), "rank", where)
        if min(layer.min(), expert.min(), rank.min()) < 0:
            raise MoelabError(f"{where} holds a negative layer, rank or expert id")
        for l in np.unique(layer):
            max_E[int(l)] = max(max_E.get(int(l), 0), int(expert[layer == l].max()) + 1)
        top_k = max(top_k, int(rank.max()) + 1)
    gaps = [l for l in range(max(max_E) + 1) if l not in max_E]
    if gaps:
        raise MoelabError(f"{where} has no sidecar or metadata and no rows for layer {gaps[0]}: "
                          f"its number of experts cannot be inferred (write a sidecar {sidecar_path(path)})")
    num_experts = [max_E[l] for l in range(len(max_E))]
    if top_k > min(num_experts):
        raise MoelabError(f"{where} holds rank {top_k - 1} in a layer with fewer experts than that")
    note = (f"no sidecar or Parquet metadata: num_experts={num_experts} and top_k={top_k} were inferred from "
            f"the rows (largest expert id + 1 per layer, largest rank + 1); an expert no token chose is "
            f"missed, so write a sidecar to be exact")
    return TraceMeta(num_experts=num_experts, top_k=top_k, source="unknown", notes=[note])
