"""A routing index kept in memory, so the first expert view answers before the summaries are built.

The documented row order (seq, pos, layer, rank), with every token holding L layers of K ranks, makes the
expert column a (tokens, layers, ranks) array: one pass over the trace with moelab's reader fills it (2
bytes a row: 20 MB for 10M rows) with each token's labels (taken once per token, checked equal on all
its rows). An expert view is then a few bincounts over one layer's (tokens, K) slice, with the same
counts as the summaries' SQL (expert.LayerCounts). A trace laid out otherwise gets no index (`error`
says why) and the view falls back to expert.direct, one SQL scan of the layer's rows.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from moelab.config import MoelabError
from moelab.explore.expert import CONTEXT_RADIUS, CONTEXTS_PER_TOKEN, LayerCounts
from moelab.trace.io import open_trace

TOKEN_COLUMNS = ("seq", "pos", "token", "domain", "lang", "doc", "doc_pos")
MAX_BYTES = 1 << 30  # past this estimate of the index's memory the summaries alone serve the expert view
# per token: (seq, pos) key 8, doc 8, doc_pos 4, token 4, labels 2 x 4, bucket 1, seq id 4, 3 (seq, label) pairs 12
TOKEN_BYTES = 52


def _pairs(seq_T: np.ndarray, g_T: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(each token's (sequence, group) pair, each pair's group, where each group's pairs start): the pairs
    sorted by (group, sequence), so that a group's pairs are one run."""
    S = int(seq_T.max()) + 1 if len(seq_T) else 1
    uniq_U, inv_T = np.unique(g_T.astype(np.int64) * S + seq_T, return_inverse=True)
    g_U = uniq_U // S
    run_G = np.flatnonzero(np.r_[True, g_U[1:] != g_U[:-1]]) if len(g_U) else np.zeros(0, np.int64)
    return inv_T.astype(np.int32), g_U, run_G


class RoutingIndex:
    def __init__(self, path: Path, num_experts: list[int], top_k: int, with_token: bool):
        self.path, self.L, self.K, self.E = path, len(num_experts), top_k, max(num_experts)
        self.with_token = with_token
        self.ready, self.error = threading.Event(), None
        self.ids_TLK: np.ndarray | None = None

    def build(self) -> None:
        try:
            self._build()
        except MoelabError as e:
            self.error = str(e)
        except Exception as e:  # the direct SQL view still answers
            self.error = f"{type(e).__name__}: {e}"
        finally:
            self.ready.set()

    def _build(self) -> None:
        trace = open_trace(self.path)
        G = self.L * self.K  # rows per token
        need = 2 * trace.num_rows + TOKEN_BYTES * (trace.num_rows // G)
        if need > MAX_BYTES:
            raise MoelabError(f"the index would take {need / 2**30:.1f} GiB (over {MAX_BYTES / 2**30:.0f} GiB)")
        if trace.num_rows % G:
            raise MoelabError(f"{trace.num_rows} rows is not a whole number of tokens of {G} rows")
        cols = ["layer", "rank", "expert", *[c for c in TOKEN_COLUMNS if c != "token" or self.with_token]]
        ids = np.empty(trace.num_rows, np.int16)
        per_token: dict[str, list[np.ndarray]] = {c: [] for c in cols[3:]}
        names: dict[str, np.ndarray] = {}
        pattern_layer = np.repeat(np.arange(self.L), self.K)
        pattern_rank = np.tile(np.arange(self.K), self.L)
        done, carry = 0, {}
        for b in trace.iter_batches(columns=cols, validate=False):
            for c in ("domain", "lang"):
                names[c] = b[f"{c}.names"]
            if carry and len(carry["layer"]):  # a row group that ends inside a token (rare: G divides 2^20)
                b = {c: np.concatenate([carry[c], b[c]]) for c in cols}
            whole = len(b["layer"]) // G * G
            carry = {c: v[whole:] for c, v in b.items()}
            if not whole:
                continue
            shape = (whole // G, G)
            if not (np.array_equal(b["layer"][:whole].reshape(shape), np.broadcast_to(pattern_layer, shape))
                    and np.array_equal(b["rank"][:whole].reshape(shape), np.broadcast_to(pattern_rank, shape))):
                raise MoelabError("rows are not every token's layers and ranks in order")
            for c in cols[3:]:
                v = b[c][:whole].reshape(-1, G)
                if not (v == v[:, :1]).all():
                    raise MoelabError(f"column {c!r} differs within a token's rows")
                per_token[c].append(v[:, 0].copy())
            ids[done:done + whole] = b["expert"][:whole]
            done += whole
        if done != trace.num_rows:
            raise MoelabError("the last token's rows are incomplete")
        tok = {c: np.concatenate(v) for c, v in per_token.items()}
        # one row per token: a token's (seq, pos) may not repeat (a repeat would be two tokens' rows as one)
        key = tok["seq"].astype(np.int64) * (1 << 32) + tok["pos"].astype(np.int64)
        if len(key) > 1 and not np.all(key[1:] > key[:-1]):
            raise MoelabError("tokens are not in (seq, pos) order")
        self.ids_TLK = ids.reshape(-1, self.L, self.K)
        self.key_T, self.doc_T, self.doc_pos_T = key, tok["doc"], tok["doc_pos"]
        self.seq_T = np.unique(tok["seq"], return_inverse=True)[1].astype(np.int32)
        self.domain_T, self.lang_T = tok["domain"], tok["lang"]
        self.domain_names, self.lang_names = list(names["domain"]), list(names["lang"])
        # as summary.BUCKET_SQL: floor(log2(doc_pos + 1) / 2)
        self.bucket_T = np.floor(np.log2(tok["doc_pos"].astype(np.float64) + 1) / 2).astype(np.int8)
        self.token_T = tok.get("token")
        # The (sequence, label) pairs of each grouping, found once: a view then sums over the pairs present,
        # not over a dense sequences x labels table (100k sequences x 100 languages: 320 MB a request).
        self.clusters = {dim: _pairs(self.seq_T, g_T) for dim, g_T in
                         (("domain", self.domain_T), ("lang", self.lang_T), ("bucket", self.bucket_T))}

    def counts(self, layer: int, expert: int) -> LayerCounts:
        """The expert view's counts at one layer (rows = K per token: all ranks, before dropping)."""
        ids_TK = self.ids_TLK[:, layer, :]
        k_T = (ids_TK == expert).sum(1)
        K, T = self.K, len(k_T)
        n_T = np.full(T, K, np.int64)
        nb = int(self.bucket_T.max()) + 1 if T else 1
        nd, ng = len(self.domain_names), len(self.lang_names)
        cell_T = (self.domain_T.astype(np.int64) * ng + self.lang_T) * nb + self.bucket_T
        cells = {}
        n_c, k_c = (np.bincount(cell_T, weights=w, minlength=nd * ng * nb) for w in (n_T, k_T))
        for c in np.flatnonzero(n_c):
            d, rest = divmod(int(c), ng * nb)
            g, bk = divmod(rest, nb)
            cells[(self.domain_names[d], self.lang_names[g], bk)] = (int(n_c[c]), int(k_c[c]))
        sums = {}
        for dim, label in (("domain", self.domain_names), ("lang", self.lang_names), ("bucket", None)):
            inv_T, g_U, run_G = self.clusters[dim]
            # per (sequence, group) pair present: its rows and the expert's, summed per group in int64
            n_U, k_U = (np.bincount(inv_T, weights=w, minlength=len(g_U)).astype(np.int64) for w in (n_T, k_T))
            kk, kn, nn = (np.add.reduceat(v, run_G) if len(v) else v for v in (k_U * k_U, k_U * n_U, n_U * n_U))
            seqs = np.diff(run_G, append=len(g_U))
            sums[dim] = {int(g) if label is None else label[g]: (int(a), int(b), int(c), int(s))
                         for g, a, b, c, s in zip(g_U[run_G], kk, kn, nn, seqs)}
        tokens, token_rows = {}, 0
        if self.token_T is not None:
            hit_T = k_T > 0
            n_v = np.bincount(self.token_T, minlength=int(self.token_T.max()) + 1 if T else 0) * K
            k_v = np.bincount(self.token_T[hit_T], weights=k_T[hit_T], minlength=len(n_v))
            tokens = {int(v): (int(n_v[v]), int(k_v[v])) for v in np.flatnonzero(k_v)}
            token_rows = int(n_v.sum())
        load_E = np.bincount(ids_TK.ravel().astype(np.int64), minlength=self.E)
        load = {int(e): int(load_E[e]) for e in np.flatnonzero(load_E)}
        # pair_counts' count: per token holding the expert, each other rank's expert (the expert's own
        # rank removed once per token)
        hit = ids_TK[k_T > 0].astype(np.int64)
        pairs_E = np.bincount(hit.ravel(), minlength=self.E)
        pairs_E[expert] -= len(hit)
        pairs = {int(j): int(pairs_E[j]) for j in np.flatnonzero(pairs_E)}
        return LayerCounts(cells, sums, tokens, token_rows, load, pairs)

    def load(self, layer: int) -> dict[int, int]:
        load_E = np.bincount(self.ids_TLK[:, layer, :].ravel().astype(np.int64), minlength=self.E)
        return {int(e): int(load_E[e]) for e in np.flatnonzero(load_E)}

    def contexts(self, layer: int, expert: int, tokens: list[int]) -> dict[int, list[dict]]:
        """expert.contexts from the index: the first places (trace order) where each token went to the
        expert, each with the token ids within CONTEXT_RADIUS positions in its sequence. No scan."""
        hit_T = (self.ids_TLK[:, layer, :] == expert).any(1)
        out: dict[int, list[dict]] = {}
        for v in tokens:
            for t in np.flatnonzero(hit_T & (self.token_T == v))[:CONTEXTS_PER_TOKEN]:
                s, p = int(self.key_T[t]) >> 32, int(self.key_T[t]) & 0xFFFFFFFF
                base = s * (1 << 32)
                lo = int(np.searchsorted(self.key_T, base + max(p - CONTEXT_RADIUS, 0), side="left"))
                hi = int(np.searchsorted(self.key_T, base + p + CONTEXT_RADIUS, side="right"))
                out.setdefault(int(v), []).append({"seq": s, "pos": p, "doc": int(self.doc_T[t]),
                                                   "doc_pos": int(self.doc_pos_T[t]),
                                                   "ids": [int(x) for x in self.token_T[lo:hi]], "at": int(t - lo)})
        return out
