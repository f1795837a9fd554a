"""Whole sequences' chosen sets, for a token-level label's null: the label shuffled within each sequence.

The token ID and position nulls shuffle the label across a layer's tokens. That ignores how a sequence
routes its tokens alike (one topic, one style): a token ID seen mostly in one document inherits that
document's routing, and the token shuffle reads it as the ID's own. On planted bursty text (each sequence
drawing its tokens from 40 IDs of 2,000) routed by a per-sequence topic alone, vocabulary specialisation
and the token-ID std score came out significant (p <= 0.05) in every run (tests/analysis/test_seqpool.py).
Shuffling the labels among the tokens of each sequence keeps each sequence's routing and its labels
together and breaks only the link between a token's label and its own routing: the question "does the
label predict the routing beyond the sequence it sits in". It keeps the expert load and every group's
size exactly (each sequence keeps its multiset of labels).

`SequencePool` holds every token of whole sequences per layer (sequence, position, token ID, chosen
set): all of them while a layer has at most `size` tokens, else the sequences of smallest hash up to
`size` tokens. Past `size` the test runs on that sample of whole sequences (`within_sequence_null`
with `value`): the statistic is recomputed on the sample and compared with the labels shuffled within
each sampled sequence, so the p-value is an exact permutation test on the sample (which sequences are in
it depends on their hash, not their labels or routing). The null reported beside the full stream's
value is that value less the sample's excess over its own shuffle. A token shuffle instead would read a
sequence's likeness as the label's (what this module replaces).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from moelab.analysis.resample import POOL_SIZE, mix64

SEQ_NULL = ("group label shuffled among the tokens of each sequence (keeps each sequence's routing and its "
            "labels, the expert load and group sizes)")
SAMPLE_NULL = ("group label shuffled among the tokens of each sequence, on a hash sample of whole sequences (the "
               "trace has more tokens than the null holds): the null is the value less the sample's excess over "
               "its own shuffle; p and z are the sample's")


class SequencePool:
    """Per layer: seq, pos, token (-1 where the trace has none) and the chosen set of each kept token, in
    (hash of seq, seq, pos) order, so each sequence's tokens are contiguous."""

    def __init__(self, num_layers: int, top_k: int, size: int = POOL_SIZE, seed: int = 0):
        self.size, self.seed, self.top_k = size, seed, top_k
        self.seq = [np.zeros(0, np.int64) for _ in range(num_layers)]
        self.pos = [np.zeros(0, np.int32) for _ in range(num_layers)]
        self.token = [np.zeros(0, np.int64) for _ in range(num_layers)]
        self.sets = [np.zeros((0, top_k), np.int16) for _ in range(num_layers)]  # expert ids < 2^15
        self.seen = np.zeros(num_layers, np.int64)
        self.threshold = [np.iinfo(np.uint64).max] * num_layers  # a sequence hashed above it stays out
        self.ordered = [True] * num_layers  # in (hash of seq, seq, pos) order: nothing added since the last sort
        # (seq, pos, token, sets) added since the last trim, joined once there: joining every batch or part
        # as it came copied the whole pool each time (0.27 s of a 16-part merge at 33.5M rows)
        self.added: list[list[tuple[np.ndarray, ...]]] = [[] for _ in range(num_layers)]

    def _prio(self, seq: np.ndarray) -> np.ndarray:
        return mix64(seq, self.seed + 0x5E9)

    def add(self, layer: int, seq: np.ndarray, pos: np.ndarray, token: np.ndarray, sets_TK: np.ndarray) -> None:
        self.seen[layer] += len(seq)
        ok = self._prio(seq) <= self.threshold[layer]
        self._put(layer, seq[ok], pos[ok], token[ok], np.asarray(sets_TK, np.int16)[ok])

    def _put(self, layer: int, seq, pos, token, sets) -> None:
        self.added[layer].append((np.asarray(seq, np.int64), np.asarray(pos, np.int32), np.asarray(token, np.int64),
                                  np.asarray(sets, np.int16)))
        self.ordered[layer] = False
        if len(self.seq[layer]) + sum(len(a[0]) for a in self.added[layer]) > self.size + self.size // 2:
            self._trim(layer)

    def _join(self, layer: int) -> None:
        """The arrays with what was added since the last trim (unordered)."""
        if self.added[layer]:
            parts = [(self.seq[layer], self.pos[layer], self.token[layer], self.sets[layer])] + self.added[layer]
            self.seq[layer], self.pos[layer], self.token[layer], self.sets[layer] = (
                np.concatenate([p[i] for p in parts]) for i in range(4))
            self.added[layer] = []

    def _trim(self, layer: int) -> None:
        """Order by (hash of seq, seq, pos); past `size` tokens keep the whole sequences of smallest hash
        that fit (at least one), and keep out every sequence hashed at or above the first one left out."""
        self._join(layer)
        seq = self.seq[layer]
        prio = self._prio(seq)
        order = np.lexsort((self.pos[layer], seq, prio))
        seq, prio = seq[order], prio[order]
        n = len(seq)
        if n > self.size:
            starts = np.flatnonzero(np.concatenate(([True], seq[1:] != seq[:-1])))
            ends = np.append(starts[1:], n)
            fits = np.flatnonzero(ends <= self.size)
            n = int(ends[fits[-1]] if len(fits) else ends[0])
            # The first sequence left out, and any hashed above it, can never be in the pool (it and the kept
            # ones already pass `size`); one hashed between it and the last kept still may, if short enough.
            # (A 64-bit tie between the two is the one case where parts could disagree with one pass.)
            if n < len(seq):  # else one sequence, kept whole though it passes `size`: nothing left out
                self.threshold[layer] = min(self.threshold[layer], np.uint64(max(int(prio[n]), 1) - 1))
            order = order[:n]
        self.seq[layer], self.pos[layer] = self.seq[layer][order], self.pos[layer][order]
        self.token[layer], self.sets[layer] = self.token[layer][order], self.sets[layer][order]
        self.ordered[layer] = True

    def merge(self, other: "SequencePool") -> None:
        """Take in another part of the stream: the sequences of smallest hash of the union are one pass's.
        Each side's tokens are at or under its own threshold; the union keeps those under the lower one."""
        for l in range(len(self.seq)):
            self.seen[l] += other.seen[l]
            other._join(l)
            seq, pos, token, sets = other.seq[l], other.pos[l], other.token[l], other.sets[l]
            if other.threshold[l] < self.threshold[l]:
                self.threshold[l] = other.threshold[l]
                self._join(l)
                keep = self._prio(self.seq[l]) <= self.threshold[l]
                self.seq[l], self.pos[l] = self.seq[l][keep], self.pos[l][keep]
                self.token[l], self.sets[l] = self.token[l][keep], self.sets[l][keep]
            elif self.threshold[l] < other.threshold[l]:
                keep = self._prio(seq) <= self.threshold[l]
                seq, pos, token, sets = seq[keep], pos[keep], token[keep], sets[keep]
            self._put(l, seq, pos, token, sets)

    def layer(self, layer: int) -> tuple[np.ndarray, bool]:
        """(sets, complete), as `resample.SetPool.layer`: complete when every token of the layer is here.
        Sorted once after the last addition, not at every call (each finalisation job asks)."""
        if not self.ordered[layer]:
            self._trim(layer)
        return self.sets[layer], bool(self.seen[layer] == len(self.seq[layer]))

    def within_sequence(self, layer: int) -> bool:
        """Every token of the layer in the pool (after the pending trim: past `size`, whole sequences only):
        the exact within-sequence null; else `within_sequence_null` needs the full value (the sample test)."""
        return bool(self.layer(layer)[1])


class SequencePoolAccumulator:
    """Fills a `SequencePool` from token-complete batches."""

    columns = ("seq", "pos", "layer", "rank", "expert")

    def __init__(self, num_experts: Sequence[int], top_k: int, *, size: int = POOL_SIZE, seed: int = 0):
        self.num_experts, self.top_k = list(num_experts), top_k
        self.pool = SequencePool(len(self.num_experts), top_k, size, seed)

    def update(self, batch: dict[str, np.ndarray]) -> None:
        from moelab.analysis.common import layer_choices

        names = ("expert", "seq", "pos") + (("token",) if "token" in batch else ())
        for l in range(len(self.num_experts)):
            tk = layer_choices(batch, l, self.top_k, names, len(self.num_experts))
            if len(tk["expert"]):
                token = tk["token"][:, 0] if "token" in tk else np.full(len(tk["seq"]), -1)
                self.pool.add(l, tk["seq"][:, 0].astype(np.int64), tk["pos"][:, 0].astype(np.int64),
                              np.asarray(token, np.int64), tk["expert"])

    def merge(self, other: "SequencePoolAccumulator") -> None:
        self.pool.merge(other.pool)

    def for_transfer(self) -> "SequencePoolAccumulator":
        """This part with its pool's additions joined (a few arrays to send rather than one per batch)."""
        for l in range(len(self.num_experts)):
            self.pool._join(l)
        return self

    def result(self) -> SequencePool:
        for l in range(len(self.num_experts)):  # the canonical order (hash of seq, seq, pos), whatever the parts
            self.pool.layer(l)
        return self.pool


def group_values(pool: SequencePool, layer: int, group: str, pos_bucket: int = 256) -> np.ndarray | None:
    """Each pooled token's value of a token-level grouping, or None where the pool cannot give it."""
    if group == "token":
        return pool.token[layer]
    if group == "pos":
        return pool.pos[layer].astype(np.int64)
    if group == "pos_bucket":
        return pool.pos[layer].astype(np.int64) // pos_bucket
    return None


def group_index(values_T: np.ndarray, groups_G: np.ndarray) -> np.ndarray:
    """Each token's index into `groups_G` (any order), -1 where its value is not one of them."""
    groups_G = np.asarray(groups_G)
    if not len(groups_G):
        return np.full(len(values_T), -1, np.int64)
    by_value = np.argsort(groups_G, kind="stable")
    where = np.minimum(np.searchsorted(groups_G[by_value], values_T), len(groups_G) - 1)
    return np.where(groups_G[by_value][where] == values_T, by_value[where], -1).astype(np.int64)


def _group_rows(index_T: np.ndarray, num_groups: int, num_experts: int) -> np.ndarray:
    """Each token's first cell in a (G + 1) x E table: its group's row, or row G for tokens in no group."""
    return np.where(index_T >= 0, index_T, num_groups) * num_experts


def _count(row_T: np.ndarray, sets_TK: np.ndarray, num_groups: int, num_experts: int) -> np.ndarray:
    """counts_GE of the tokens' chosen sets, each token counted in the row `row_T` gives (`_group_rows`)."""
    cells = (row_T[:, None] + sets_TK).reshape(-1)
    table = np.bincount(cells, minlength=(num_groups + 1) * num_experts)[:num_groups * num_experts]
    return table.reshape(num_groups, num_experts)


def pooled_counts(pool: SequencePool, layer: int, index_T: np.ndarray, num_groups: int,
                  num_experts: int) -> np.ndarray:
    """counts_GE of the pooled tokens' chosen sets, grouped by `index_T` (-1: in no group)."""
    return _count(_group_rows(index_T, num_groups, num_experts), pool.sets[layer].astype(np.int64), num_groups,
                  num_experts)


def sample_groups(pool: SequencePool, layer: int, values_T: np.ndarray, groups_G: np.ndarray,
                  min_count: int) -> np.ndarray:
    """Which of `groups_G` the sample test uses: those with at least min_count x (the sample's share of the
    layer's tokens) tokens in the pool, and at least 2 (one token cannot move within its sequence)."""
    pool.layer(layer)
    frac = len(pool.seq[layer]) / max(int(pool.seen[layer]), 1)
    index_T = group_index(values_T, groups_G)
    n_G = np.bincount(index_T[index_T >= 0], minlength=len(groups_G))
    return n_G >= max(2.0, np.ceil(min_count * frac))


def within_sequence_null(pool: SequencePool, layer: int, values_T: np.ndarray, groups_G: np.ndarray,
                         num_experts: int, stat_G: Callable[[np.ndarray, np.ndarray], np.ndarray],
                         n_permutations: int, seed: int, *, value: float | None = None,
                         min_count: int = 2) -> np.ndarray:
    """Null draws of mean over `groups_G` of stat_G(counts_GE, n_G), the group values permuted among the
    tokens of each sequence.

    A complete layer (every token of the stream in the pool) gives the draws themselves. Otherwise the
    pool is a hash sample of whole sequences and `value` (the statistic on the full stream) is needed:
    the groups with enough tokens in the sample (`sample_groups`) are tested there, and each draw is
    returned as value - (the sample's statistic - the sample's draw)."""
    pool.layer(layer)  # its sequences contiguous, in the canonical order
    complete = pool.within_sequence(layer)
    if not complete:
        if value is None:
            raise ValueError("the pool holds a sample of the layer's sequences: the sample test needs the full value")
        groups_G = np.asarray(groups_G)[sample_groups(pool, layer, values_T, groups_G, min_count)]
    seq, sets = pool.seq[layer], pool.sets[layer].astype(np.int64)
    index_T = group_index(values_T, groups_G)
    G, E = len(groups_G), num_experts
    if not G:
        return np.full(n_permutations, np.nan)
    n_G = np.bincount(index_T[index_T >= 0], minlength=G).astype(np.float64)
    row_T = _group_rows(index_T, G, E)
    block = np.cumsum(np.concatenate(([0], seq[1:] != seq[:-1])))  # sequences are contiguous in the pool
    draws = np.empty(n_permutations)
    for p in range(n_permutations):
        rng = np.random.default_rng([seed, 0x5E9, p])
        order = np.argsort(block + rng.random(len(seq)))  # a shuffle within each sequence (blocks < 2^52)
        table = _count(row_T[order], sets, G, E)  # token t carries the label of token order[t]
        draws[p] = float(np.mean(stat_G(table, n_G)))
    if complete:
        return draws
    return value - (float(np.mean(stat_G(_count(row_T, sets, G, E), n_G))) - draws)
