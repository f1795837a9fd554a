"""Per-batch checks of a trace as it streams: value widths and the documented rules (docs/TRACE.md).

A file from another writer may store `expert` as int64 or `probs` as doubles: values are narrowed to the
canonical dtype only after checking they fit (never wrapped). The rules the analyses rely on are checked on
every batch, vectorised, so that a bad file stops with one line instead of a silently wrong number:
expert ids within 0..E_l-1, layers within 0..L-1, ranks within 0..top_k-1, distinct experts within one
(token, layer), list columns of the declared length, no NaN in probabilities or weights; a top-N trace's
`topn_experts` within 0..E_l-1 and as long as its `topn_probs` (N, when the sidecar records `top:N`).
"""

from __future__ import annotations

import numpy as np

from moelab.config import MoelabError
from moelab.trace.schema import TraceMeta, field_type, numpy_dtype, probs_topn


def fit_dtype(values: np.ndarray, name: str, where: str) -> np.ndarray:
    """Values of any integer / float width -> the column's canonical dtype, refusing what does not fit."""
    dtype = numpy_dtype(field_type(name))
    if values.dtype == dtype:
        return values
    if values.dtype.kind in "iu" and dtype.kind == "i" and len(values):
        lo, hi, info = values.min(), values.max(), np.iinfo(dtype)
        if lo < info.min or hi > info.max:
            bad = lo if lo < info.min else hi
            raise MoelabError(f"{where} column {name!r} holds {int(bad)}, which does not fit {dtype} "
                              f"({info.min}..{info.max})")
    with np.errstate(over="ignore"):  # overflow to inf is detected just below and named
        out = values.astype(dtype)
    if dtype.kind == "f" and len(values) and np.isinf(out).any() and not np.isinf(values).any():
        raise MoelabError(f"{where} column {name!r} holds values beyond {dtype}'s range")
    return out


class BatchValidator:
    """Checks one numpy batch (as Trace.iter_batches yields it) against the trace's meta.

    The duplicate check compares each row with the rows up to top_k - 1 before it: in (seq, pos, layer,
    rank) order, row i and row i - d belong to one (token, layer) exactly when their ranks differ by d.
    The last top_k - 1 rows of a batch are carried to the next, so a token split between batches is seen.
    """

    def __init__(self, meta: TraceMeta, where: str, proven: frozenset[str] = frozenset()):
        self.proven = proven  # columns the file's statistics already show in range (filemeta.proven_in_range)
        self.E_L = np.asarray(meta.num_experts, np.int64)
        self.uniform_E = int(self.E_L[0]) if len(set(meta.num_experts)) == 1 else None
        self.K, self.where = meta.top_k, where
        self.N = probs_topn(meta.probs_mode)
        self.tail: tuple[np.ndarray, np.ndarray] | None = None

    def fail(self, message: str) -> None:
        raise MoelabError(f"{self.where} {message}")

    def check(self, batch: dict[str, np.ndarray]) -> None:
        layer, expert, rank = batch.get("layer"), batch.get("expert"), batch.get("rank")
        unproven = layer is not None and len(layer) and "layer" not in self.proven
        if unproven and _unsigned_max(layer) >= len(self.E_L):
            bad = int(layer.min() if layer.min() < 0 else layer.max())
            self.fail(f"holds layer {bad} but declares {len(self.E_L)} MoE layers (num_experts has one per layer)")
        if expert is not None and len(expert) and "expert" not in self.proven:
            self._check_experts(expert, layer)
        whole = False  # batches of whole (token, layer) groups have ranks 0..K-1 by construction
        if rank is not None and expert is not None:
            whole = self._check_distinct(expert, rank)
        known = whole or "rank" in self.proven
        if rank is not None and len(rank) and not known and (rank.min() < 0 or rank.max() >= self.K):
            self.fail(f"holds rank {int(rank.max() if rank.min() >= 0 else rank.min())} but declares "
                      f"top_k={self.K} (ranks 0..{self.K - 1})")
        for name in ("prob", "weight"):
            if name in batch and len(batch[name]) and not np.isfinite(batch[name].sum()):
                if np.isnan(batch[name]).any():
                    self.fail(f"column {name!r} holds NaN")
        for name in ("probs", "expert_norms", "expert_density", "expert_cos", "topn_probs", "topn_experts"):
            if name in batch:
                self._check_list(name, batch[name], batch[f"{name}.rows"], layer)
        if "topn_experts" in batch:
            self._check_topn(batch, layer)

    def _check_experts(self, expert: np.ndarray, layer: np.ndarray | None) -> None:
        if self.uniform_E is not None or layer is None:
            E = self.uniform_E if self.uniform_E is not None else int(self.E_L.max())
            if _unsigned_max(expert) < E:
                return
        if expert.min() < 0:
            self.fail(f"holds expert {int(expert.min())}: expert ids start at 0")
        if self.uniform_E is not None or layer is None:
            if expert.max() >= E:
                self.fail(f"declares num_experts={E} but holds expert {int(expert.max())}")
            return
        over = expert >= self.E_L[layer]
        if over.any():
            i = int(np.argmax(over))
            self.fail(f"declares num_experts={int(self.E_L[layer[i]])} for layer {int(layer[i])} "
                      f"but holds expert {int(expert[i])}")

    def _check_distinct(self, expert: np.ndarray, rank: np.ndarray) -> bool:
        """Returns whether the batch was whole groups (then its ranks are known to be 0..K-1)."""
        if self.K == 1:
            return False
        e, r = expert, rank
        if self.tail is not None:
            e, r = np.concatenate([self.tail[0], expert]), np.concatenate([self.tail[1], rank])
        if len(e) % self.K == 0 and _whole_groups(r, self.K):
            self.tail = None
            self._distinct_in_groups(e)
            return True
        self.tail = (e[-(self.K - 1):], r[-(self.K - 1):])
        for d in range(1, min(self.K, len(e))):
            same = np.flatnonzero(e[d:] == e[:-d])  # cheap pass first: most batches have few candidates
            if len(same):
                hit = same[(r[d:][same].astype(np.int64) - r[:-d][same]) == d]
                if len(hit):
                    self._duplicate(e[hit[0] + d], r[hit[0]], r[hit[0] + d])
        return False

    def _distinct_in_groups(self, e: np.ndarray) -> None:
        """Batches of whole (token, layer) groups: compare rank columns pairwise, each contiguous."""
        e_KG = np.ascontiguousarray(e.reshape(-1, self.K).T)
        for d in range(1, self.K):  # rank i against rank i + d, for every i at once
            eq = e_KG[: self.K - d] == e_KG[d:]
            if eq.any():
                i, g = np.unravel_index(np.argmax(eq), eq.shape)
                self._duplicate(e_KG[i, g], i, i + d)

    def _duplicate(self, expert, rank_a, rank_b) -> None:
        self.fail(f"holds expert {int(expert)} twice within one (token, layer) (ranks {int(rank_a)} and "
                  f"{int(rank_b)}): top-k experts must be distinct")

    def _check_list(self, name: str, values: np.ndarray, rows: np.ndarray, layer: np.ndarray | None) -> None:
        if values.dtype == object:
            lengths = np.fromiter(map(len, values), np.int64, len(values))
            flat = np.concatenate(list(values)) if len(values) else np.zeros(0, np.float32)
        else:
            lengths, flat = np.full(len(values), values.shape[1] if values.ndim == 2 else 0), values
        if layer is not None:
            E_R = self.E_L[layer[rows]]
        elif self.uniform_E is not None:
            E_R = np.full(len(rows), self.uniform_E)
        else:
            E_R = None
        if name.startswith("topn_"):
            E_R = None if self.N is None else np.full(len(rows), self.N)  # N, not E, values per list
        if E_R is not None and len(E_R):
            want = E_R * (E_R - 1) // 2 if name == "expert_cos" else E_R
            wrong = lengths != want
            if wrong.any():
                i = int(np.argmax(wrong))
                need = f"top:{self.N}" if name.startswith("topn_") else f"the layer's E={int(E_R[i])}"
                self.fail(f"column {name!r} has a list of length {int(lengths[i])} where {need} needs {int(want[i])}")
        if flat.size and not np.isfinite(flat.sum()) and np.isnan(flat).any():
            self.fail(f"column {name!r} holds NaN")


    def _check_topn(self, batch: dict[str, np.ndarray], layer: np.ndarray | None) -> None:
        """Top-N ids: one per stored probability, each an expert of its layer."""
        ids, probs = batch["topn_experts"], batch.get("topn_probs")
        if probs is not None and not np.array_equal(batch["topn_experts.rows"], batch["topn_probs.rows"]):
            self.fail("columns 'topn_experts' and 'topn_probs' are filled on different rows")
        if ids.dtype == object or (probs is not None and (probs.dtype == object or probs.shape != ids.shape)):
            same = probs is None or all(len(a) == len(b) for a, b in zip(ids, probs))
            if not same:
                self.fail("columns 'topn_experts' and 'topn_probs' have lists of different lengths")
            flat = [np.asarray(a) for a in ids]
            E_P = np.repeat(self.E_L[layer[batch["topn_experts.rows"]]] if layer is not None
                            else np.full(len(ids), int(self.E_L.max())), [len(a) for a in flat])
            ids_flat = np.concatenate(flat) if flat else np.zeros(0, np.int16)
        else:
            E_R = (self.E_L[layer[batch["topn_experts.rows"]]] if layer is not None
                   else np.full(len(ids), int(self.E_L.max())))
            E_P, ids_flat = np.repeat(E_R, ids.shape[1] if ids.ndim == 2 else 0), ids.reshape(-1)
        bad = (ids_flat < 0) | (ids_flat >= E_P)
        if bad.any():
            i = int(np.argmax(bad))
            self.fail(f"column 'topn_experts' holds expert {int(ids_flat[i])} in a layer of {int(E_P[i])} experts")


WORDS = {2: np.uint16, 4: np.uint32, 8: np.uint64}


def _unsigned_max(a: np.ndarray) -> int:
    """max over the values read as unsigned: negatives become huge, so one pass checks both ends."""
    if a.dtype.kind == "i" and a.flags.c_contiguous:
        return int(a.view(a.dtype.str.replace("i", "u")).max())
    return int(a.max()) if a.min() >= 0 else np.iinfo(np.uint64).max


def _whole_groups(rank: np.ndarray, K: int) -> bool:
    """Whether the ranks read 0..K-1, 0..K-1, ...; for K of 2, 4 or 8 one int8 group is one 2-, 4- or
    8-byte word, so the whole check is a single comparison per group."""
    word = WORDS.get(K)
    if word is not None and rank.dtype == np.int8 and rank.flags.c_contiguous:
        return bool((rank.view(word) == np.arange(K, dtype=np.int8).view(word)[0]).all())
    return bool((rank.reshape(-1, K) == np.arange(K)).all())
