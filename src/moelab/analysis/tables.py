"""E_i(g) count tables: routed choices per (layer, group, expert) for one grouping, streamed.

A `ShareAccumulator` counts choices for a label (domain, lang), the token ID, the position (or a position
bucket), the turn: before dropping, all ranks (or rank 0 only with `ranks="top1"`). For the bootstrap it
keeps the counts split by sequence fold (`resample.fold_of`); small group ranges count in dense tables,
large ones (a vocabulary split by fold) in a sparse counter. `specialisation.py` scores the tables.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Sequence

import numpy as np

from moelab.analysis.common import (
    KeyCounter, LabelIndex, PackedCounts, Result, check_experts, compact_range, consume, iter_input,
    require_columns,
)
from moelab.analysis.resample import FOLDS, fold_of, mix64
from moelab.config import MoelabError

LABEL_GROUPS = ("domain", "lang")
INT_GROUPS = ("token", "pos", "doc_pos", "turn", "doc", "seq")
GROUPS = LABEL_GROUPS + INT_GROUPS + ("pos_bucket",)
DENSE_GROUPS = 1 << 17  # group values below this may count in a dense table ...
DENSE_BUDGET = 1 << 26  # ... of at most this many cells (256 MiB of int32)
PARTS_BUDGET = 1 << 29  # bytes of merged parts a table keeps apart for its layers' jobs to add (512 MiB)
REPLICATE_DENSE_CELLS = 1 << 23  # fold x group x expert cells the bootstrap may hold at once (64 MiB)


def _integral(weights_RF: np.ndarray) -> bool:
    """Bootstrap weights that are whole numbers (`resample.replicate_weights`: how often each fold is drawn)."""
    w = np.asarray(weights_RF)
    return bool(np.all(np.isfinite(w)) and np.all(w == np.round(w)) and np.abs(w).max(initial=0) < 1 << 20)


def add_counts(flat: np.ndarray, cells_N: np.ndarray) -> None:
    """flat[c] += (how often c occurs in cells_N): a bincount over the cells' range where that range is
    compact, else an unbuffered add (no sort; measured 2-3x faster than np.unique's on trace batches). The
    added 1 has the table's own dtype: a Python int sends np.add.at down its casting path, 14x slower
    (208 vs 15 ms for 1M cells of a 2^26-cell int32 table, numpy 2.4)."""
    if len(cells_N) == 0:
        return
    lo, hi = int(cells_N.min()), int(cells_N.max())
    if compact_range(lo, hi, len(cells_N)):
        flat[lo:hi + 1] += np.bincount(cells_N - lo, minlength=hi - lo + 1).astype(flat.dtype)
    else:
        np.add.at(flat, cells_N, flat.dtype.type(1))


def compact_unique(values_N: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """np.unique(values_N, return_inverse=True) for non-negative ints, without a sort when their range is
    compact (a presence map and its running count): the same two arrays."""
    values_N = np.asarray(values_N)
    if len(values_N) == 0 or values_N.min() < 0 or not compact_range(0, int(values_N.max()), len(values_N)):
        return np.unique(values_N, return_inverse=True)
    present = np.zeros(int(values_N.max()) + 1, bool)
    present[values_N] = True
    rank = np.cumsum(present) - 1
    return np.flatnonzero(present).astype(values_N.dtype), rank[values_N]


@dataclasses.dataclass
class ShareTables(Result):
    """Per MoE layer l: the group values seen, and counts[l][g, e] = choices of group g routed to e."""

    group: str
    ranks: str  # "all" or "top1"
    num_experts: list[int]
    top_k: int
    groups: list[np.ndarray]
    counts: list[np.ndarray]
    names: list[str] | None = None  # label groups: groups[l] are codes into names
    uniform: list[float] = dataclasses.field(default_factory=list)  # E_i(g) under uniform routing: 1/E

    def __post_init__(self) -> None:
        self.uniform = [1.0 / E for E in self.num_experts]

    @property
    def choices_per_token(self) -> int:
        return self.top_k if self.ranks == "all" else 1

    def tokens(self, layer: int) -> np.ndarray:
        """n(g): (token, layer) pairs of each group (every token contributes k choices, or 1 for top1)."""
        return self.counts[layer].sum(axis=1) // self.choices_per_token

    def share(self, layer: int) -> np.ndarray:
        """E_i(g): share of g's choices that went to expert i (rows sum to 1)."""
        c = self.counts[layer].astype(np.float64)
        return c / np.maximum(c.sum(axis=1, keepdims=True), 1)

    def replicate_tables(self, layer: int, weights_RF: np.ndarray | None, keep_G: np.ndarray) -> Iterator[np.ndarray]:
        """Bootstrap replicates of counts[layer][keep_G]: one fold-weighted G' x E table per row of weights."""
        if weights_RF is None or getattr(self, "folds", 1) <= 1:
            return
        fold, g, e, c = self.fold_entries[layer]
        keep_G = keep_G & self.sampled[layer]
        index_G = np.full(len(self.groups[layer]), -1)
        index_G[np.flatnonzero(keep_G)] = np.arange(int(np.sum(keep_G)))
        m = index_G[g] >= 0
        E, G = self.num_experts[layer], int(np.sum(keep_G))
        key, fold, c = index_G[g[m]] * E + e[m], fold[m], c[m].astype(np.float64)
        F = len(weights_RF[0]) if len(weights_RF) else 0
        if F * G * E <= REPLICATE_DENSE_CELLS and _integral(weights_RF):
            # One F x (G E) table of per-fold counts, then every replicate as one matrix product: integer
            # weights times integer counts sum exactly in float64 (< 2^53), so this equals the bincounts
            # below bit for bit, in any order of summation.
            per_fold = np.bincount(fold.astype(np.int64) * (G * E) + key, weights=c, minlength=F * G * E)
            W_RF, step = np.asarray(weights_RF, np.float64), max(1, REPLICATE_DENSE_CELLS // max(G * E, 1))
            for lo in range(0, len(W_RF), step):
                for r_N in W_RF[lo:lo + step] @ per_fold.reshape(F, G * E):
                    yield r_N.reshape(G, E)
            return
        for w_F in weights_RF:
            yield np.bincount(key, weights=w_F[fold] * c, minlength=G * E).reshape(G, E)

    def group_names(self, layer: int) -> list[str]:
        g = self.groups[layer]
        return [self.names[i] for i in g] if self.names is not None else [str(v) for v in g]


class ShareAccumulator:
    """Counts (fold, layer, group, expert) over a stream in a sparse counter: memory ~ distinct keys.

    The fold (a hash of the row's sequence, `resample.fold_of`) keeps the counts split for the bootstrap;
    `folds=1` counts without it. With `fold_sample` n > 1 only the groups whose hash is 0 mod n are split
    (the others count under one extra fold): split counts of a large vocabulary take one key per choice,
    which a 100M-row trace cannot afford, so the intervals come from that sample of groups (see
    `_resampled`)."""

    def __init__(self, group: str, num_experts: Sequence[int], top_k: int, *, ranks: str = "all",
                 pos_bucket: int = 256, folds: int = FOLDS, seed: int = 0, fold_sample: int = 1):
        if group not in GROUPS:
            raise MoelabError(f"unknown grouping {group!r} (known: {', '.join(GROUPS)})")
        if ranks not in ("all", "top1"):
            raise MoelabError(f"ranks={ranks!r} must be 'all' or 'top1'")
        self.group, self.ranks, self.top_k, self.pos_bucket = group, ranks, top_k, pos_bucket
        self.num_experts = list(num_experts)
        self.folds, self.seed, self.fold_sample = folds, seed, max(1, fold_sample)
        if (folds + 1) * len(self.num_experts) >= 1 << 15:
            raise MoelabError(f"{folds} bootstrap folds x {len(self.num_experts)} layers is too many to count")
        self.counter = KeyCounter()
        self.dense: dict[str, np.ndarray] = {}  # "split" / "unsplit": slot x group value x expert counts
        self.dense_rows = 0
        # merged parts' dense tables (`PackedCounts` or arrays) not yet added into `dense` (see `merge`)
        self.parts: dict[str, list[Any]] = {}
        self.labels = LabelIndex() if group in LABEL_GROUPS else None
        self.columns = ("seq", "layer", "rank", "expert", "pos" if group == "pos_bucket" else group)
        self._sample_table: np.ndarray | None = None  # `_sampled` of 0..n-1 (`_sampled_rows`)

    def _values(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        if self.labels is not None:
            return self.labels.encode(batch, self.group)
        if self.group == "pos_bucket":
            return batch["pos"].astype(np.int64) // self.pos_bucket
        return batch[self.group].astype(np.int64)

    def update(self, batch: dict[str, np.ndarray]) -> None:
        require_columns(batch, self.columns, f"specialisation by {self.group}")
        check_experts(batch, self.num_experts)
        self.settle()
        values = self._values(batch)
        keep = values >= 0  # turn -1 = no turn: not a group
        if self.ranks == "top1":
            keep &= batch["rank"] == 0
        if values.size and values.max() >= 1 << 32:
            raise MoelabError(f"group {self.group} value {int(values.max())} is too large to count")
        layer, expert = batch["layer"], batch["expert"]
        every = bool(keep.all())  # the common case: no row to leave out, so no copies to take
        if not every:
            layer, values, expert = layer[keep], values[keep], expert[keep]
        if not len(layer):
            return
        layer = layer.astype(np.int64)
        fold = np.zeros(len(layer), np.int64)
        if self.folds > 1:
            fold = fold_of(batch["seq"], self.folds, self.seed)
            fold = fold.copy() if every else fold[keep]  # fold_of's answer is cached: never written into
            if self.fold_sample > 1:
                fold[~self._sampled_rows(values)] = self.folds
        slot = layer + len(self.num_experts) * fold
        small = None if values.max() < DENSE_GROUPS else values < DENSE_GROUPS
        taken = np.zeros(len(layer), bool)  # rows a dense table counted; the others go to the sparse counter
        for name, rows in (("unsplit", fold >= self.folds if self.folds > 1 else True),
                           ("split", fold < self.folds if self.folds > 1 else False)):
            if small is not None:
                rows = rows & small
            if rows is False or (rows is not True and not rows.any()):
                continue
            picked = (slot if name == "split" else layer, values, expert)
            if rows is not True and not rows.all():
                picked = tuple(a[rows] for a in picked)
            if self._add_dense(name, *picked):
                taken |= rows
        if not taken.all():
            sparse = ~taken
            self.counter.add((slot[sparse] << 48) | (values[sparse] << 16) | expert[sparse])

    def _add_dense(self, name: str, slot: np.ndarray, values: np.ndarray, expert: np.ndarray) -> bool:
        """Count rows in a dense slot x group value x expert table; False (nothing counted) when the table
        would pass DENSE_BUDGET cells: a large vocabulary split by fold stays in the sparse counter."""
        slots = len(self.num_experts) * (self.folds if name == "split" else 1)
        V, E = int(values.max()) + 1, max(self.num_experts)
        table = self.dense.get(name)
        if table is None or V > table.shape[1]:
            width = max(V, 2 * (0 if table is None else table.shape[1]))
            if slots * min(width, DENSE_GROUPS) * E > DENSE_BUDGET:
                width = V
            if slots * width * E > DENSE_BUDGET:
                return False
            grown = np.zeros((slots, width, E), np.int32)  # a cell counts at most the rows seen
            if table is not None:
                grown[:, :table.shape[1]] = table
            table = self.dense[name] = grown
        self.dense_rows += len(slot)
        if self.dense_rows >= 1 << 31 and table.dtype != np.int64:
            table = self.dense[name] = table.astype(np.int64)
        add_counts(table.reshape(-1), (slot * table.shape[1] + values) * E + expert)
        return True

    def merge(self, other: "ShareAccumulator") -> None:
        """Add the counts of a later part of the stream (parallel.py). Label codes are per pass: the other
        pass's codes are mapped to ours, new names numbered after ours in its order, as one pass would.

        Without labels the part's tables and sparse chunks are kept as they came, up to PARTS_BUDGET
        bytes, and each layer's job adds its own rows of them (`layer_result`): adding 16 parts of a
        33.5M-row trace into the token and position tables was 1.2 s of the parent's serial merge."""
        lut = self.labels.merge(other.labels) if self.labels is not None else None
        self.dense_rows += other.dense_rows
        if lut is None:
            self.counter.merge(other.counter, settle=False)
            for name, table in other.dense.items():
                self.parts.setdefault(name, []).append(table)
            if self._parts_bytes() > PARTS_BUDGET:
                self.settle()
            return

        def remap(keys: np.ndarray) -> np.ndarray:
            value = lut[(keys >> 16) & 0xFFFFFFFF]
            return (keys & ~np.int64(0xFFFFFFFF << 16)) | (value << 16)

        self.counter.merge(other.counter, remap)
        for name, table in other.dense.items():
            if isinstance(table, PackedCounts):
                table = table.dense()  # label tables: a handful of group values, small
            used = min(table.shape[1], len(lut))
            self._add_table(name, table[:, :used], lut[:used])

    def _parts_bytes(self) -> int:
        return self.counter.nbytes + sum(t.index.nbytes + t.count.nbytes if isinstance(t, PackedCounts) else t.nbytes
                                         for ts in self.parts.values() for t in ts)

    def settle(self) -> None:
        """Add the parts kept apart into the dense tables (in merge order)."""
        for name, tables in self.parts.items():
            for table in tables:
                self._add_table(name, table)
        self.parts = {}
        self.counter.settle()

    def _add_table(self, name: str, table: Any, lut: np.ndarray | None = None) -> None:
        """dense[name] += a part's table (group values mapped through `lut`, where given)."""
        width = (int(lut.max()) + 1 if len(lut) else 0) if lut is not None else table.shape[1]
        mine = self.dense.get(name)
        wide = max(width, 0 if mine is None else mine.shape[1])
        dtype = self._count_dtype([table])
        if mine is not None and mine.shape[1] == wide and mine.dtype == dtype:
            grown = mine  # added in place: a copy per merged part cost seconds at 16 parts (2^26 cells)
        else:
            grown = np.zeros((table.shape[0], wide, table.shape[2]), dtype)
            if mine is not None:
                grown[:, :mine.shape[1]] = mine
        if lut is not None:
            grown[:, lut] += table  # lut is one to one: no index repeats
        elif isinstance(table, PackedCounts):
            table.add_into(grown)
        else:
            grown[:, :table.shape[1]] += table
        self.dense[name] = grown

    def _count_dtype(self, tables: list[Any]) -> type:
        """int32 for a dense table of counts, unless the rows counted or one of the tables added need int64."""
        wide = self.dense_rows >= 1 << 31 or any(t is not None and t.dtype == np.int64 for t in tables)
        return np.int64 if wide else np.int32

    def for_transfer(self) -> "ShareAccumulator":
        """This part, its large and mostly empty dense tables packed, to be sent to the parent and merged
        there (`parallel.py`); after this it can only be merged. Its sparse counts are merged into one
        sorted chunk here, in the worker, rather than in the parent."""
        self.settle()
        self.counter.result()
        self._sample_table = None  # a cache: not worth the pipe
        self.dense = {name: PackedCounts.pack(t, min_cells=1 << 16) for name, t in self.dense.items()}
        return self

    def _sampled(self, values: np.ndarray) -> np.ndarray:
        return mix64(values, self.seed + 0x5A) % np.uint64(self.fold_sample) == 0

    def _sampled_rows(self, values: np.ndarray) -> np.ndarray:
        """`_sampled` of every row, read from a table over the group values (a vocabulary) where they are
        small: one lookup a row instead of a 64-bit hash."""
        top = int(values.max()) + 1
        if top > DENSE_GROUPS:
            return self._sampled(values)
        table = self._sample_table
        if table is None or len(table) < top:
            table = self._sample_table = self._sampled(np.arange(max(top, 2 * (0 if table is None else len(table)))))
        return table[values]

    def _layer_entries(self, layer: int, sparse: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
        """(fold, group value, expert, count) of one layer's nonzero cells, sparse and dense counts together;
        `sparse`: the sparse counter's entries of this layer (slot, value, expert, count). One layer at a
        time: the entries of every layer's dense cells at once (a position table split by fold has 2^26
        cells) took more memory than the whole pass."""
        L = len(self.num_experts)
        slot_N, value_N, expert_N, count_N = sparse
        parts = [(slot_N // L, value_N, expert_N, count_N)]
        for name in list(self.dense) + [n for n in self.parts if n not in self.dense]:  # merge's order
            if name == "split":  # slot = layer + L * fold
                t = self._layer_rows(name, slice(layer, L * self.folds, L))
                f, v, e = np.nonzero(t)
                parts.append((f, v, e, t[f, v, e]))
            else:
                t = self._layer_rows(name, slice(layer, layer + 1))[0]
                v, e = np.nonzero(t)
                parts.append((np.full(len(v), self.folds if self.folds > 1 else 0), v, e, t[v, e]))
        return tuple(np.concatenate([p[i].astype(np.int64) for p in parts]) for i in range(4))

    def _layer_rows(self, name: str, slots: slice) -> np.ndarray:
        """Rows `slots` of dense[name] (slot x group value x expert) with the parts kept apart added in
        (a view of the table where there are none)."""
        table, parts = self.dense.get(name), self.parts.get(name, [])
        if not parts:
            return table[slots]
        width = max([t.shape[1] for t in parts] + ([table.shape[1]] if table is not None else []))
        rows = range(*slots.indices(parts[0].shape[0]))
        out = np.zeros((len(rows), width, parts[0].shape[2]), self._count_dtype(parts + [table]))
        if table is not None:
            out[:, :table.shape[1]] = table[slots]
        for t in parts:
            for i, s in enumerate(rows):
                if isinstance(t, PackedCounts):
                    t.add_slot_into(out[i], s)
                else:
                    out[i, :t.shape[1]] += t[s]
        return out

    def layer_result(self, l: int) -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray, ...], np.ndarray]:
        """One layer of `result()`: (group values, group x expert counts, fold entries, sampled groups).
        Layers are independent, so `analyze --workers` builds them as separate jobs."""
        L, E = len(self.num_experts), self.num_experts[l]
        keys, counts = self.counter.select(lambda k: (k >> 48) % L == l)  # slot = layer + L * fold
        sparse = (keys >> 48, (keys >> 16) & 0xFFFFFFFF, keys & 0xFFFF, counts)
        fold_N, value_N, expert_N, count_N = self._layer_entries(l, sparse)
        g, inv = compact_unique(value_N)
        flat = np.bincount(inv * E + expert_N, weights=count_N, minlength=len(g) * E)
        split = fold_N < self.folds if self.folds > 1 else np.zeros(len(fold_N), bool)
        # Narrow types: these stay alive for the bootstrap (folds < 2^15 and expert ids < 2^16 by construction).
        wide = len(g) >= 1 << 31 or (len(count_N) and count_N.max() >= 1 << 31)
        entries = (fold_N[split].astype(np.int16), inv[split].astype(np.int64 if wide else np.int32),
                   expert_N[split].astype(np.int32), count_N[split].astype(np.int64 if wide else np.int32))
        sampled = self._sampled(g) if self.fold_sample > 1 else np.ones(len(g), bool)
        return g, flat.astype(np.int64).reshape(len(g), E), entries, sampled

    def result(self, layers: list[tuple] | None = None) -> ShareTables:
        """The tables; `layers`: what `layer_result` returned for each layer, in order, where it was
        computed apart."""
        if layers is None:
            layers = [self.layer_result(l) for l in range(len(self.num_experts))]
        names = self.labels.names if self.labels is not None else None
        out = ShareTables(group=self.group, ranks=self.ranks, num_experts=self.num_experts,
                          top_k=self.top_k, groups=[p[0] for p in layers], counts=[p[1] for p in layers],
                          names=names)
        out.fold_entries, out.folds = [p[2] for p in layers], self.folds  # not fields: kept out of metrics.json
        out.sampled = [p[3] for p in layers]
        out.pos_bucket = self.pos_bucket
        return out


def share_tables(trace_like: Any, group: str, num_experts: Sequence[int], top_k: int, *,
                 ranks: str = "all", pos_bucket: int = 256, batch_rows: int = 1 << 20) -> ShareTables:
    """E_i(g) count tables of a trace for one grouping, in one streaming pass."""
    acc = ShareAccumulator(group, num_experts, top_k, ranks=ranks, pos_bucket=pos_bucket)
    consume(iter_input(trace_like, acc.columns, batch_rows), [acc])
    return acc.result()
