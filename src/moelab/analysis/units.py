"""A document label's null: the label shuffled over whole documents, not over single tokens.

A domain or a language belongs to a document, and a model routes the tokens of one document alike: they
share a topic, a style and the context the router reads. Shuffling such a label over single tokens
breaks that tie and gives a null far narrower than the label's real chance variation, so a label the
routing ignores reads as specialisation. On planted traces whose routing follows a per-sequence topic
and not the domain, the token shuffle called domain specialisation significant (p <= 0.05) in 80% of
runs and the expert-label MI in all of them (tests/analysis/test_units.py). The null here keeps every
document's routing whole and moves only the labels: the documents' labels are permuted among them, which
keeps the expert load exactly and each label's number of documents (its tokens vary with the lengths of
the documents it draws).

`UnitAccumulator` keeps, for each document of the stream (a run of one (seq, doc, label) in the trace's
row order), its choices per layer and expert, all ranks and rank 0 apart. Every document while the
stream has at most `size` of them (the null is then an exact permutation); past that the `size` of
smallest hash, a uniform sample, from which each label then draws as many documents as it has, with
replacement. `size` follows the layers and experts so the table stays near UNIT_BUDGET bytes.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

from moelab.analysis.common import LabelIndex, Result, check_experts, require_columns
from moelab.analysis.resample import mix64

UNIT_BUDGET = 32 << 20  # bytes of per-document counts kept (both tables), before the 1.5x trimming slack
MIN_UNITS, MAX_UNITS = 256, 8192
NULL = ("label shuffled across documents (keeps each document's routing whole, the expert load and each "
        "label's number of documents)")


def unit_capacity(num_layers: int, num_experts: int, budget: int = UNIT_BUDGET) -> int:
    """Documents kept in full: as many as two int32 layer x expert tables each fit in `budget`."""
    return int(np.clip(budget // max(1, 8 * num_layers * num_experts), MIN_UNITS, MAX_UNITS))


@dataclasses.dataclass
class UnitTable(Result):
    """Documents' counts: code_U their label codes (into names), all_ULE their choices (all ranks) and
    top_ULE their rank-0 choices per layer and expert; seen_G the documents of each label in the stream;
    complete when every document is here (else a uniform sample of them)."""

    label: str
    names: list[str]
    code_U: np.ndarray
    all_ULE: np.ndarray
    top_ULE: np.ndarray
    seen_G: np.ndarray
    complete: bool


class UnitAccumulator:
    """Streams rows into per-document count tables for one label (see the module's docstring)."""

    def __init__(self, label: str, num_experts: Sequence[int], top_k: int, *, size: int | None = None,
                 seed: int = 0):
        self.label, self.top_k, self.seed = label, top_k, seed
        self.num_experts = list(num_experts)
        L, E = len(self.num_experts), max(self.num_experts)
        self.size = size or unit_capacity(L, E)
        self.labels = LabelIndex()
        self.seq, self.doc, self.code = (np.zeros(0, np.int64) for _ in range(3))
        self.prio = np.zeros(0, np.uint64)
        self.all_ULE, self.top_ULE = (np.zeros((0, L, E), np.int32) for _ in range(2))
        self.seen_G = np.zeros(0, np.int64)
        self.threshold = np.iinfo(np.uint64).max  # a document hashed above it was pushed out: stays out
        self.trimmed = False
        self._first: tuple | None = None  # the stream's first and last documents: a document cut by a
        self._last: tuple | None = None   # batch or a part boundary counts once
        self.columns = ("seq", "doc", "layer", "rank", "expert", label)

    def _prio(self, seq: np.ndarray, doc: np.ndarray) -> np.ndarray:
        return mix64(mix64(seq, self.seed).view(np.int64) ^ doc, self.seed + 0xD0C)

    def update(self, batch: dict[str, np.ndarray]) -> None:
        require_columns(batch, ("seq", "layer", "rank", "expert", self.label), f"the {self.label} null")
        check_experts(batch, self.num_experts)
        seq = np.asarray(batch["seq"], np.int64)
        if not len(seq):
            return
        doc = np.asarray(batch["doc"], np.int64) if "doc" in batch else seq
        code = self.labels.encode(batch, self.label)
        change = (seq[1:] != seq[:-1]) | (doc[1:] != doc[:-1]) | (code[1:] != code[:-1])
        new = np.concatenate(([True], change))
        starts, run = np.flatnonzero(new), np.cumsum(new) - 1
        keys = (seq[starts], doc[starts], code[starts])
        self._count_seen(keys)
        L, E, R = len(self.num_experts), max(self.num_experts), len(starts)
        cell = (run * L + batch["layer"].astype(np.int64)) * E + batch["expert"].astype(np.int64)
        all_RLE = np.bincount(cell, minlength=R * L * E).reshape(R, L, E).astype(np.int32)
        top_RLE = np.bincount(cell[batch["rank"] == 0], minlength=R * L * E).reshape(R, L, E).astype(np.int32)
        prio = self._prio(keys[0], keys[1])
        ok = prio <= self.threshold
        self._absorb(keys[0][ok], keys[1][ok], keys[2][ok], prio[ok], all_RLE[ok], top_RLE[ok])

    def _count_seen(self, keys: tuple[np.ndarray, ...]) -> None:
        first = tuple(int(k[0]) for k in keys)
        counts = np.bincount(keys[2], minlength=len(self.labels.code))
        if self._last is not None and first == self._last:
            counts[first[2]] -= 1  # the previous batch's last document goes on
        self._add_seen(counts)
        self._first = first if self._first is None else self._first
        self._last = tuple(int(k[-1]) for k in keys)

    def _add_seen(self, counts_G: np.ndarray) -> None:
        if len(counts_G) > len(self.seen_G):
            self.seen_G = np.concatenate([self.seen_G, np.zeros(len(counts_G) - len(self.seen_G), np.int64)])
        self.seen_G[:len(counts_G)] += counts_G

    def _absorb(self, seq, doc, code, prio, all_ULE, top_ULE) -> None:
        """Add documents (one already here adds its counts to it), then keep the `size` of smallest hash
        once the table passes 1.5 x `size`."""
        seq, doc, code = (np.concatenate([a, b]) for a, b in ((self.seq, seq), (self.doc, doc), (self.code, code)))
        prio = np.concatenate([self.prio, prio])
        all_ULE, top_ULE = np.concatenate([self.all_ULE, all_ULE]), np.concatenate([self.top_ULE, top_ULE])
        order = np.lexsort((code, doc, seq, prio))
        seq, doc, code, prio = seq[order], doc[order], code[order], prio[order]
        first = np.concatenate(([True], (seq[1:] != seq[:-1]) | (doc[1:] != doc[:-1]) | (code[1:] != code[:-1])))
        starts = np.flatnonzero(first)
        self.seq, self.doc, self.code, self.prio = seq[starts], doc[starts], code[starts], prio[starts]
        if len(starts) < len(order):
            self.all_ULE = np.add.reduceat(all_ULE[order], starts, axis=0).astype(np.int32)
            self.top_ULE = np.add.reduceat(top_ULE[order], starts, axis=0).astype(np.int32)
        else:
            self.all_ULE, self.top_ULE = all_ULE[order], top_ULE[order]
        if len(self.prio) > self.size + self.size // 2:
            self._trim()

    def _trim(self) -> None:
        if len(self.prio) <= self.size:
            return
        n = self.size  # sorted by hash: the first `size` are the smallest
        self.threshold = min(self.threshold, self.prio[n - 1])
        self.seq, self.doc, self.code, self.prio = self.seq[:n], self.doc[:n], self.code[:n], self.prio[:n]
        self.all_ULE, self.top_ULE = self.all_ULE[:n], self.top_ULE[:n]
        self.trimmed = True

    def merge(self, other: "UnitAccumulator") -> None:
        """Take in a later part of the stream: the documents of both, the `size` of smallest hash kept, as
        one pass keeps them (a document's hash does not depend on the batch or the part)."""
        lut = self.labels.merge(other.labels)
        seen = np.zeros(len(self.labels.code), np.int64)
        np.add.at(seen, lut[:len(other.seen_G)], other.seen_G)
        if other._first is not None and self._last is not None:
            if (other._first[0], other._first[1], int(lut[other._first[2]])) == self._last:
                seen[self._last[2]] -= 1
        self._add_seen(seen)
        if other._first is not None:
            self._first = self._first or (other._first[0], other._first[1], int(lut[other._first[2]]))
            self._last = (other._last[0], other._last[1], int(lut[other._last[2]]))
        self.threshold = min(self.threshold, other.threshold)
        self.trimmed |= other.trimmed
        ok = other.prio <= self.threshold
        self._absorb(other.seq[ok], other.doc[ok], lut[other.code[ok]] if len(other.code) else other.code[ok],
                     other.prio[ok], other.all_ULE[ok], other.top_ULE[ok])
        keep = self.prio <= self.threshold
        if not keep.all():
            self.seq, self.doc, self.code, self.prio = self.seq[keep], self.doc[keep], self.code[keep], self.prio[keep]
            self.all_ULE, self.top_ULE = self.all_ULE[keep], self.top_ULE[keep]

    def result(self) -> UnitTable:
        self._trim()
        complete = not self.trimmed and int(self.seen_G.sum()) == len(self.code)
        return UnitTable(label=self.label, names=self.labels.names, code_U=self.code.copy(),
                         all_ULE=self.all_ULE, top_ULE=self.top_ULE, seen_G=self.seen_G.copy(), complete=complete)


def assignments(units: UnitTable, n_permutations: int, seed: int) -> list[np.ndarray]:
    """One G x U weight matrix per permutation: how many times each label takes each document. Complete:
    the labels permuted over the documents (0/1 weights). A sample of m documents stands for all N the
    stream had, each as N/m copies (the integer parts, the remainder one more copy to the first by hash):
    the labels are permuted over those copies, label by label a multivariate hypergeometric draw of as
    many as the label had documents. Like the exact permutation, the labels then split the documents
    between them (a label that takes more of a kind leaves less of it to the others), which a draw with
    replacement per label does not: for the mean over labels of each label's largest expert share, that
    dependence is most of the null's spread. The same draws serve every layer, so the null of a mean over
    layers keeps the layers' dependence through their shared documents."""
    G, U = len(units.names), len(units.code_U)
    seen = np.zeros(G, np.int64)
    seen[:len(units.seen_G)] = units.seen_G
    copies = np.full(U, seen.sum() // max(U, 1), np.int64)
    copies[:int(seen.sum() % max(U, 1))] += 1
    out = []
    for p in range(n_permutations):
        rng = np.random.default_rng([seed, 0x1AB3, p])
        w = np.zeros((G, U))
        if U == 0:
            pass
        elif units.complete:
            w[rng.permutation(units.code_U), np.arange(U)] = 1.0
        else:
            left = copies.copy()
            for g in np.argsort(-seen, kind="stable"):
                take = left if seen[g] >= left.sum() else rng.multivariate_hypergeometric(left, int(seen[g]))
                w[g], left = take, left - take
        out.append(w)
    return out


def unit_null(units: UnitTable, layer: int, num_experts: int, ranks: str,
              stat: Callable[[np.ndarray], float], n_permutations: int, seed: int,
              total_E: np.ndarray | None = None) -> np.ndarray:
    """Null draws of `stat` (a function of one layer's G x E count table, labels that have documents as
    its rows) under the document shuffle (`unit_tables`)."""
    return np.asarray([stat(t) for t in unit_tables(units, layer, num_experts, ranks, n_permutations, seed,
                                                    total_E)], np.float64)


def unit_tables(units: UnitTable, layer: int, num_experts: int, ranks: str, n_permutations: int, seed: int,
                total_E: np.ndarray | None = None) -> list[np.ndarray]:
    """One layer's G x E count table per permutation of the document shuffle, labels that have documents
    as its rows; ranks "all" counts every choice, "top1" rank 0 only.

    `total_E`, the layer's counts over the whole stream, re-centres a sample: each sampled document's
    counts are shifted by (total / N - the sample's mean document), so the copies add up to the stream's
    own load, not the sample's (a sample of m documents misses it by ~1/sqrt(m), more than the spread of
    a statistic whose labels split the documents between them)."""
    table = (units.all_ULE if ranks == "all" else units.top_ULE)[:, layer, :num_experts].astype(np.float64)
    if not units.complete and total_E is not None and len(table):
        table = table + (np.asarray(total_E, np.float64)[:num_experts] / max(int(units.seen_G.sum()), 1)
                         - table.mean(axis=0))
    out = []
    for w_GU in assignments(units, n_permutations, seed):
        t_GE = np.maximum(w_GU @ table, 0.0)
        out.append(t_GE[t_GE.sum(axis=1) > 0])
    return out
