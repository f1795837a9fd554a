"""Plumbing shared by the streaming analyses: batches, regrouping, sparse counts, per-layer views, results.

A batch is a dict of numpy arrays, one per trace column, as `Trace.iter_batches` yields it: label columns
(domain, lang) as int codes with `"<col>.names"`, list columns (probs, ...) as 2-D arrays over their
rank-0 rows with `"<col>.rows"`. Hand-built batches may instead give strings for labels and full-height
2-D arrays for list columns. Every accumulator has `columns`, `update(batch)` and `result()`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from moelab.config import MoelabError

Batch = dict[str, np.ndarray]
SUFFIXES = (".rows", ".names")


# ---- results ---------------------------------------------------------------------------------------
def plain(value: Any) -> Any:
    """numpy / dataclass values -> JSON-ready Python (NaN -> None)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return plain(value.tolist())
    if isinstance(value, np.generic):
        return plain(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class Result:
    """Mixin for result dataclasses: `to_dict()` gives plain JSON-ready values."""

    def to_dict(self) -> dict[str, Any]:
        return plain(self)


# ---- input -----------------------------------------------------------------------------------------
def iter_input(trace_like: Any, columns: Sequence[str], batch_rows: int) -> Iterable[Batch]:
    """A Trace (anything with `iter_batches`), one batch dict, or an iterable of batch dicts."""
    if hasattr(trace_like, "iter_batches"):
        have = set(trace_like.columns)
        return trace_like.iter_batches(columns=[c for c in columns if c in have], batch_rows=batch_rows)
    if isinstance(trace_like, dict):
        return [trace_like]
    return trace_like


def require_columns(batch: Batch, columns: Sequence[str], who: str) -> None:
    missing = [c for c in columns if c not in batch]
    if missing:
        raise MoelabError(f"{who} needs the trace column {missing[0]!r}")


def per_layer(value: int | Sequence[int], num_layers: int | None = None) -> list[int]:
    """num_experts given as one int for all layers or one per layer."""
    if isinstance(value, (int, np.integer)):
        if num_layers is None:
            raise MoelabError("num_experts as a single int needs the number of layers")
        return [int(value)] * num_layers
    return [int(v) for v in value]


def check_experts(batch: Batch, num_experts_L: Sequence[int]) -> None:
    """Expert ids within 0..E_l-1 and layers within 0..L-1, so bincounts cannot silently grow."""
    layer = batch["layer"]
    if len(layer) == 0:
        return
    if layer.min() < 0 or layer.max() >= len(num_experts_L):
        raise MoelabError(f"trace layer {int(layer.max())} is outside 0..{len(num_experts_L) - 1} (num_experts per layer)")
    if "expert" not in batch:
        return
    expert = batch["expert"]
    if len(set(num_experts_L)) == 1 and 0 <= expert.min() and expert.max() < num_experts_L[0]:
        return  # one E for every layer: two reductions instead of a per-row lookup (16 analyses ask)
    bad = (expert < 0) | (expert >= np.asarray(num_experts_L)[layer])
    if bad.any():
        i = int(np.argmax(bad))
        raise MoelabError(f"trace expert id {int(expert[i])} is outside 0..{num_experts_L[layer[i]] - 1} at layer {int(layer[i])}")


# ---- slicing and regrouping ------------------------------------------------------------------------
def _list_rows(batch: Batch, name: str) -> np.ndarray:
    rows = batch.get(f"{name}.rows")
    return np.arange(len(batch[name])) if rows is None else rows


def _is_list_column(batch: Batch, name: str) -> bool:
    return f"{name}.rows" in batch


def slice_batch(batch: Batch, start: int, stop: int) -> Batch:
    """Rows [start, stop) of a batch, list columns and their row indices included."""
    out: Batch = {}
    for name, value in batch.items():
        if name.endswith(SUFFIXES):
            continue
        if _is_list_column(batch, name):
            rows = batch[f"{name}.rows"]  # ascending: a contiguous range, so the values stay a view
            lo, hi = np.searchsorted(rows, [start, stop])
            out[name], out[f"{name}.rows"] = value[lo:hi], rows[lo:hi] - start
        else:
            out[name] = value[start:stop]
        if f"{name}.names" in batch:
            out[f"{name}.names"] = batch[f"{name}.names"]
    return out


def _concat_lists(parts: list[np.ndarray]) -> np.ndarray:
    if all(p.ndim == 2 for p in parts) and len({p.shape[1] for p in parts}) == 1:
        return np.concatenate(parts)
    as_objects = [np.empty(len(x), dtype=object) for x in parts]
    for dst, src in zip(as_objects, parts):
        dst[:] = list(src)
    return np.concatenate(as_objects)


def concat_many(parts: Sequence[Batch]) -> Batch:
    """The parts' rows in order, each column copied once; label names are the last part's (a superset:
    codes are stable over an iteration). One part comes back as it is."""
    if len(parts) == 1:
        return parts[0]
    last = parts[-1]
    sizes = [len(next(v for k, v in p.items() if not k.endswith(SUFFIXES) and not _is_list_column(p, k)))
             for p in parts]
    starts = np.cumsum([0] + sizes[:-1])
    out: Batch = {}
    for name, value in last.items():
        if name.endswith(SUFFIXES):
            continue
        if _is_list_column(last, name):
            out[name] = _concat_lists([p[name] for p in parts])
            out[f"{name}.rows"] = np.concatenate([p[f"{name}.rows"] + s for p, s in zip(parts, starts)])
        else:
            out[name] = np.concatenate([p[name] for p in parts])
        if f"{name}.names" in last:
            out[f"{name}.names"] = last[f"{name}.names"]
    return out


def concat_batches(a: Batch, b: Batch) -> Batch:
    """a's rows then b's rows; label names are b's (a superset: codes are stable over an iteration)."""
    return concat_many([a, b])


def token_key(batch: Batch) -> np.ndarray:
    return (batch["seq"].astype(np.int64) << 32) | batch["pos"].astype(np.int64)


def seq_block_key(batch_seqs: int) -> Callable[[Batch], np.ndarray]:
    return lambda batch: batch["seq"].astype(np.int64) // batch_seqs


def regroup(batches: Iterable[Batch], key: Callable[[Batch], np.ndarray]) -> Iterator[Batch]:
    """Re-cut a stream so that no key (a token, a block of sequences) straddles two batches.

    The rows of the key that ends a batch are carried over and completed with the leading rows of the
    next batch; the rest of each batch passes through as views, never copied. Keys must not decrease:
    the trace's (seq, pos, layer, rank) row order guarantees it, and a violation is reported.
    """
    carry: list[Batch] = []  # the pieces of the key that ended the last batch, joined once it is complete
    carry_key = None
    for batch in batches:
        k = key(batch)
        if len(k) == 0:
            continue
        if np.any(k[1:] < k[:-1]) or (carry_key is not None and k[0] < carry_key):
            raise MoelabError("trace rows are not in (seq, pos, layer, rank) order")
        if carry:
            j = int(np.searchsorted(k, carry_key, side="right"))  # rows continuing the carried key
            if j:
                carry.append(slice_batch(batch, 0, j))
            if j == len(k):
                continue
            yield concat_many(carry)
            batch, k = slice_batch(batch, j, len(k)), k[j:]
        cut = int(np.searchsorted(k, k[-1], side="left"))
        if cut:
            yield slice_batch(batch, 0, cut)
        carry, carry_key = [slice_batch(batch, cut, len(k))], k[-1]
    if carry:
        yield concat_many(carry)


# ---- per-layer views -------------------------------------------------------------------------------
_REGULAR: list[Any] = [None, None, False]  # (layer array, (L, K), verdict) of the last batch checked


def _regular(batch: Batch, num_layers: int, top_k: int) -> bool:
    """Whether every token of the batch has all L layers x K ranks in order, so that a column reshapes
    to T x L x K. Checked once per batch (a one-entry cache: every accumulator sees the same batch in turn)."""
    layer = batch["layer"]
    if _REGULAR[0] is layer and _REGULAR[1] == (num_layers, top_k):
        return _REGULAR[2]
    n = len(layer)
    ok = n % (num_layers * top_k) == 0
    if ok and n:
        pattern = np.repeat(np.arange(num_layers), top_k)
        ok = bool((layer.reshape(-1, num_layers * top_k) == pattern).all()
                  and (batch["rank"].reshape(-1, top_k) == np.arange(top_k)).all())
    _REGULAR[:] = [layer, (num_layers, top_k), ok]
    return ok


def layer_choices(batch: Batch, layer: int, top_k: int, columns: Sequence[str],
                  num_layers: int | None = None) -> dict[str, np.ndarray]:
    """Rows of one layer as T x K arrays, tokens in (seq, pos) order; needs token-complete batches.

    With `num_layers`, a batch where every token has every layer is read as T x L x K views (no mask,
    no copy): the common case, and the hot path of every per-token analysis."""
    if num_layers is not None and _regular(batch, num_layers, top_k):
        return {c: batch[c].reshape(-1, num_layers, top_k)[:, layer, :] for c in columns}
    mask = batch["layer"] == layer
    n = int(mask.sum())
    rank = batch["rank"][mask]
    if n % top_k or not np.all(rank.reshape(-1, top_k) == np.arange(top_k)):
        raise MoelabError(f"trace layer {layer}: each token needs ranks 0..{top_k - 1} in order (top_k={top_k})")
    return {c: batch[c][mask].reshape(-1, top_k) for c in columns}


def rank0_list(batch: Batch, name: str, rows_mask: np.ndarray) -> np.ndarray:
    """The list column `name` on the rows picked by `rows_mask` (rank-0 rows) as an n x width array."""
    where = np.full(len(rows_mask), -1, dtype=np.int64)
    rows = _list_rows(batch, name)
    where[rows] = np.arange(len(rows))
    idx = where[rows_mask]
    if np.any(idx < 0):
        raise MoelabError(f"trace column {name!r} is null on some rank-0 rows")
    values = batch[name][idx]
    if values.dtype == object:
        try:
            values = np.stack(list(values)) if len(values) else np.zeros((0, 0), np.float32)
        except ValueError:
            raise MoelabError(f"trace column {name!r} has lists of different lengths within a layer") from None
    return values


def layer_list(batch: Batch, name: str, layer: int, num_layers: int, top_k: int) -> np.ndarray:
    """The list column `name` on one layer's rank-0 rows as T x width, tokens in order.

    When every token has every layer and rank and the column is set on every rank-0 row (a trace as
    written), that is a strided view of the column: no mask over the batch, no gather. Else the rows are
    picked by mask (`rank0_list`)."""
    values, rows = batch[name], batch.get(f"{name}.rows")
    n = len(batch["layer"])
    if (rows is not None and values.ndim == 2 and len(rows) * top_k == n and len(rows)
            and rows[0] == 0 and rows[-1] == n - top_k and _regular(batch, num_layers, top_k)):
        return values.reshape(-1, num_layers, values.shape[1])[:, layer]  # rows are 0, K, 2K, ...
    return rank0_list(batch, name, (batch["layer"] == layer) & (batch["rank"] == 0))


_ENTROPY: list[Any] = [None, {}]  # (the last batch's probs array, layer -> entropy of its rank-0 rows)


def layer_entropy(batch: Batch, layer: int, num_layers: int, top_k: int) -> np.ndarray:
    """H(probs) (nats) of each of the layer's tokens; computed once per batch and layer (load's router
    entropy and the gate entropy read the same values)."""
    from moelab.analysis.null import entropy

    if _ENTROPY[0] is not batch["probs"]:
        _ENTROPY[:] = [batch["probs"], {}]
    cache = _ENTROPY[1]
    if layer not in cache:
        cache[layer] = entropy(layer_list(batch, "probs", layer, num_layers, top_k), axis=1)
    return cache[layer]


# ---- counting --------------------------------------------------------------------------------------
def compact_range(lo: int, hi: int, n: int) -> bool:
    """Whether n integers in lo..hi are better counted in a table over that range than by a sort."""
    return hi - lo < max(4 * n, 1 << 20)


def count_keys(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unique keys and their counts; a bincount when the key range is compact (much faster than a sort)."""
    if len(keys) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    lo, hi = int(keys.min()), int(keys.max())
    if compact_range(lo, hi, len(keys)):
        counts = np.bincount(keys - lo, minlength=hi - lo + 1)
        nz = np.flatnonzero(counts)
        return nz.astype(np.int64) + lo, counts[nz].astype(np.int64)
    return np.unique(keys, return_counts=True)


class KeyCounter:
    """Counts of int64 keys over a stream, memory bounded by the number of distinct keys."""

    def __init__(self) -> None:
        self._chunks: list[tuple[np.ndarray, np.ndarray]] = []
        self._pending = 0
        self._merged = 0

    def add(self, keys: np.ndarray) -> None:
        k, c = count_keys(np.asarray(keys, dtype=np.int64))
        self._chunks.append((k, c))
        self._pending += len(k)
        self.settle()

    def _merge(self) -> None:
        """One sorted chunk of unique keys: the chunks' keys sorted together, equal keys' counts summed (an
        argsort and a run sum, 3x faster than np.unique with its inverse at 16 parts of 1M keys)."""
        if len(self._chunks) != 1:  # one chunk is already sorted and unique (count_keys, or this)
            keys = np.concatenate([k for k, _ in self._chunks]) if self._chunks else np.zeros(0, np.int64)
            counts = np.concatenate([c for _, c in self._chunks]) if self._chunks else np.zeros(0, np.int64)
            order = np.argsort(keys, kind="stable")
            keys, counts = keys[order], counts[order].astype(np.int64, copy=False)
            starts = np.flatnonzero(np.concatenate(([True], keys[1:] != keys[:-1]))) if len(keys) else order
            self._chunks = [(keys[starts], np.add.reduceat(counts, starts) if len(keys) else counts)]
        self._merged, self._pending = len(self._chunks[0][0]), 0

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(sorted unique keys, counts)."""
        self._merge()
        return self._chunks[0]

    def select(self, keep: Callable[[np.ndarray], np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """`result()` restricted to the keys where keep(keys) is True, without merging the rest (one
        layer's keys: the layers' merges then run as separate jobs). Leaves this counter as it was."""
        part = KeyCounter()
        part._chunks = [(k[m], c[m]) for k, c in self._chunks for m in [keep(k)]]
        return part.result()

    def merge(self, other: "KeyCounter", remap: Callable[[np.ndarray], np.ndarray] | None = None,
              settle: bool = True) -> None:
        """Add another counter's counts (its keys passed through `remap` first). `settle=False` keeps its
        chunks apart until `settle()`, `result()` or `select()` (a parent's merge of a worker's part: the
        layers' jobs then merge their own keys, `ShareAccumulator`)."""
        for k, c in other._chunks:
            self._chunks.append((k if remap is None else remap(k), c))
            self._pending += len(k)
        if settle:
            self.settle()

    def settle(self) -> None:
        """Merge the chunks where those not yet merged dominate (bounds the memory, amortised)."""
        if self._pending > max(2 * self._merged, 1 << 22):
            self._merge()

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + c.nbytes for k, c in self._chunks)


class LabelIndex:
    """Stable integer codes for a label column over a stream; the names behind them."""

    def __init__(self) -> None:
        self.code: dict[str, int] = {}

    def _lut(self, names: Iterable[Any]) -> np.ndarray:
        return np.array([self.code.setdefault(str(n), len(self.code)) for n in names], dtype=np.int64)

    def encode(self, batch: Batch, column: str) -> np.ndarray:
        values = batch[column]
        names = batch.get(f"{column}.names")
        if names is not None:
            return self._lut(names)[values] if len(values) else np.zeros(0, np.int64)
        uniq, inv = np.unique(values, return_inverse=True)
        return self._lut(uniq)[inv] if len(values) else np.zeros(0, np.int64)

    @property
    def names(self) -> list[str]:
        return list(self.code)

    def merge(self, other: "LabelIndex") -> np.ndarray:
        """Take in another index's names (new ones get the next codes, in the other's order); returns the
        other's code -> this index's code. Merged in stream order this gives the codes one pass would."""
        return self._lut(other.code)


class PackedCounts:
    """A count table's nonzero cells, the form a part of the stream travels in from a worker to the
    parent (`parallel.py`): one worker's part fills a small share of a 2^26-cell position table split by
    fold (or of a vocabulary table, or of the bootstrap folds), and receiving the dense tables (8.3 GB at
    16 parts of a 33.5M-row trace) was most of the parent's serial merge."""

    def __init__(self, table: np.ndarray):
        self.shape, self.dtype = table.shape, table.dtype
        flat = table.reshape(-1)
        self.index = np.flatnonzero(flat)
        if table.size < 1 << 31:
            self.index = self.index.astype(np.int32)
        self.count = flat[self.index]

    @staticmethod
    def worth(table: np.ndarray) -> bool:
        """Smaller packed: an int32 index and the count per nonzero cell, against every cell."""
        return np.count_nonzero(table) * (4 + table.itemsize) < table.nbytes // 2

    @classmethod
    def pack(cls, table: np.ndarray, min_cells: int = 0) -> "PackedCounts | np.ndarray":
        """The table packed where that is worth it (and it has at least `min_cells` cells), else itself."""
        return cls(table) if table.size >= min_cells and cls.worth(table) else table

    def add_into(self, out: np.ndarray) -> None:
        """out[:, :width] += the table (out's second axis may be wider). np.add.at on aligned arrays: 2.5x
        faster than a fancy-index add for 2M sorted cells of a 2^26-cell table (numpy 2.4)."""
        assert out.flags.c_contiguous, "a packed table adds into a contiguous table only"
        # unpickled arrays may sit unaligned in the message's buffer, which sends np.add.at down a slow path
        index, count = (np.require(a, requirements="AC") for a in (self.index, self.count.astype(out.dtype)))
        if out.shape != self.shape:  # a cell (slot s, rest r) moves by s rows of the wider table
            S, W, E = self.shape
            index = index.astype(np.int64)
            index += (index // (W * E)) * ((out.shape[1] - W) * E)
        np.add.at(out.reshape(-1), index, count)

    def add_slot_into(self, out: np.ndarray, slot: int) -> None:
        """out[:width] += the table's row `slot` (a group value x expert table; out's first axis may be
        wider). The index is sorted (flatnonzero), so the row's cells are one run of it."""
        _, W, E = self.shape
        # bounds of the index's dtype: other bounds would have numpy cast the whole index for each search
        lo, hi = np.searchsorted(self.index, np.array([slot * W * E, (slot + 1) * W * E], self.index.dtype))
        # a cell (value v, expert e) sits at v * E + e in either table; cells of one part never repeat
        out.reshape(-1)[self.index[lo:hi].astype(np.int64) - slot * W * E] += self.count[lo:hi]

    def dense(self) -> np.ndarray:
        out = np.zeros(self.shape, self.dtype)
        out.reshape(-1)[self.index] = self.count
        return out


class OrderedSum:
    """A float64 sum over a stream that a split pass reproduces bit for bit.

    Batches add into an open partial, in stream order. `seal()` (called at the end of each unit of the
    trace, `parallel.py`) closes it; `merge` appends another pass's closed partials after this one's, and
    `total()` adds the partials in order. One pass over units a, b and two passes (a; b) merged then sum
    the same numbers in the same order. Without seals (a plain stream) it is the running sum it replaces."""

    def __init__(self, shape: int | tuple[int, ...] = ()):
        self.open = np.zeros(shape)
        self.closed: list[np.ndarray] = []
        self._dirty = False

    def add(self, value: Any) -> None:
        self.open += value
        self._dirty = True

    def seal(self) -> None:
        if self._dirty:
            self.closed.append(self.open)
            self.open, self._dirty = np.zeros_like(self.open), False

    def merge(self, other: "OrderedSum") -> None:
        self.seal()
        other.seal()
        self.closed.extend(other.closed)

    def total(self) -> np.ndarray:
        out = np.zeros_like(self.open)
        for part in self.closed + [self.open]:
            out = out + part
        return out


def seal(accumulator: Any) -> None:
    """Seal every OrderedSum an accumulator holds (directly or in a list): the end of a unit."""
    for value in vars(accumulator).values():
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, OrderedSum):
                v.seal()


def consume(batches: Iterable[Batch], accumulators: Sequence[Any]) -> None:
    """Feed every batch to every accumulator (one pass over the trace)."""
    for batch in batches:
        for acc in accumulators:
            acc.update(batch)
