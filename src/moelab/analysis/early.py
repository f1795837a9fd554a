"""Early routing learning: how close each checkpoint's routing already is to the final one's, on the same
tokens. Per MoE layer and checkpoint t vs final: top-1 agreement, top-k overlap |TopK_t & TopK_final| / k
(OLMoE's router saturation), and the Jensen-Shannon divergence (nats) between per-token-ID expert
distributions E_i(token).

Nulls: unrelated checkpoints with their own loads, i.e. the token identity shuffled between the
checkpoint and the final one. Agreement then has mean sum_e a_e b_e (a, b: the two rank-0 load shares)
and overlap sum_e a_e b_e / k (a, b: share of tokens with e in their top-k), with the variance from each
checkpoint's pair co-occurrence (closed form, normal p-value). The JSD null shuffles the checkpoint's
token IDs among the tokens of each sequence (`seqpool.py`, like the specialisation nulls): two
checkpoints that route by context alike share their token tables through the sequences, not through the
IDs. Past the pool's 2^18 tokens a layer the test runs on a hash sample of whole sequences (the final
trace's sets of the same tokens pooled beside the checkpoint's), and the null beside the full JSD is
that JSD less the sample's departure from its own shuffle. Independent uniform routing (1/E, k/E, the
JSD of two uniform routings) stays as a reference: it is the noise floor of identical routers, not the
chance level of unrelated ones.
Intervals: bootstrap over sequences.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Sequence

import numpy as np

from moelab.analysis.common import (
    Batch, Result, check_experts, iter_input, layer_choices, regroup, slice_batch, token_key,
)
from moelab.analysis.coactivation import coactivation_counts
from moelab.analysis.null import random_topk_counts
from moelab.analysis.rankorder import require_rank_order
from moelab.analysis.resample import (
    FOLDS, REPLICATES, Estimate, estimate_from_moments, fold_of, layer_estimates,
    permuted_tables, replicate_weights, subset_scale,
)
from moelab.analysis.seqpool import SequencePool, group_index, pooled_counts, sample_groups, within_sequence_null
from moelab.analysis.specialization import ShareAccumulator
from moelab.config import MoelabError

ALIGN = ("seq", "pos", "layer", "rank", "token")


def top1_agreement(ids_t_TK: np.ndarray, ids_final_TK: np.ndarray) -> float:
    """Share of tokens whose rank-0 expert is the same at t and at the final checkpoint."""
    return float(np.mean(np.asarray(ids_t_TK)[:, 0] == np.asarray(ids_final_TK)[:, 0]))


def topk_overlap_T(ids_t_TK: np.ndarray, ids_final_TK: np.ndarray) -> np.ndarray:
    """|TopK_t(x) & TopK_final(x)| / k per token (the k ids of a token are distinct)."""
    a, b = np.asarray(ids_t_TK), np.asarray(ids_final_TK)
    return (a[:, :, None] == b[:, None, :]).sum(axis=(1, 2)) / a.shape[1]


def topk_overlap(ids_t_TK: np.ndarray, ids_final_TK: np.ndarray) -> float:
    return float(topk_overlap_T(ids_t_TK, ids_final_TK).mean())


def jensen_shannon(p_GE: np.ndarray, q_GE: np.ndarray) -> np.ndarray:
    """JS divergence (natural log, in [0, log 2]) between matching rows of two count/probability tables."""
    p = np.asarray(p_GE, np.float64)
    q = np.asarray(q_GE, np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):  # an empty row (a bootstrap replicate) gives NaN
        p = p / p.sum(axis=-1, keepdims=True)
        q = q / q.sum(axis=-1, keepdims=True)
    m = (p + q) / 2

    def kl(a: np.ndarray) -> np.ndarray:
        ratio = np.divide(a, m, out=np.ones_like(a), where=a > 0)
        return np.sum(np.where(a > 0, a * np.log(ratio), 0.0), axis=-1)

    return (kl(p) + kl(q)) / 2


@dataclasses.dataclass
class EarlyRouting(Result):
    """Arrays indexed [checkpoint, layer]; checkpoints in the order given, the final one excluded."""

    steps: list[Any]
    top1_agreement: np.ndarray
    topk_overlap: np.ndarray
    jsd: np.ndarray              # mean over token IDs with n(v) >= min_count
    null_top1: np.ndarray        # [c, l] shuffled token identity: sum_e a_e b_e
    null_overlap: np.ndarray     # [c, l] shuffled token identity: sum_e a_e b_e / k
    null_jsd: np.ndarray         # [c, l] the checkpoint's token IDs shuffled across its tokens
    uniform_top1: list[float]    # reference: 1/E
    uniform_overlap: list[float]  # reference: k/E
    uniform_jsd: list[float]     # reference: two independent uniform routings at the same n(v)
    min_count: int
    first: dict[str, Estimate]   # the first checkpoint, mean over layers: top1 / overlap / jsd with
    #                              interval and null


class EarlyRoutingAccumulator:
    """Consumes merged, token-complete batches: `expert` of the final trace and `expert@c` of checkpoint c."""

    def __init__(self, num_checkpoints: int, num_experts: Sequence[int], top_k: int, folds: int = FOLDS):
        self.C, self.num_experts, self.top_k, self.folds = num_checkpoints, list(num_experts), top_k, folds
        L = len(self.num_experts)
        self.tokens_FL = np.zeros((folds, L), np.int64)
        self.agree_CFL = np.zeros((self.C, folds, L), np.int64)
        self.overlap_CFL = np.zeros((self.C, folds, L))
        self.top1_CLE = [np.zeros((self.C + 1, E), np.int64) for E in self.num_experts]  # index C: final
        self.pairs_CLEE = [np.zeros((self.C + 1, E, E), np.int64) for E in self.num_experts]
        self.tables = [ShareAccumulator("token", num_experts, top_k, folds=folds) for _ in range(self.C + 1)]
        self.pools = [SequencePool(L, top_k) for _ in range(self.C + 1)]  # index C: final, the sample test's

    def update(self, batch: Batch) -> None:
        check_experts(batch, self.num_experts)
        names = [f"expert@{c}" for c in range(self.C)] + ["expert"]
        for l, E in enumerate(self.num_experts):
            tk = layer_choices(batch, l, self.top_k, names + ["seq", "pos"] + ["token"] * ("token" in batch),
                               len(self.num_experts))
            final, seq_T = tk["expert"], tk["seq"][:, 0].astype(np.int64)
            fold_T = fold_of(seq_T, self.folds)
            self.tokens_FL[:, l] += np.bincount(fold_T, minlength=self.folds)
            token_T = tk["token"][:, 0].astype(np.int64) if "token" in tk else np.full(len(seq_T), -1)
            for c, name in enumerate(names):
                self.top1_CLE[l][c] += np.bincount(tk[name][:, 0], minlength=E)
                self.pairs_CLEE[l][c] += coactivation_counts(tk[name], E)
                self.pools[c].add(l, seq_T, tk["pos"][:, 0].astype(np.int64), token_T, tk[name])
                if c == self.C:
                    continue
                self.agree_CFL[c, :, l] += np.bincount(fold_T, weights=tk[name][:, 0] == final[:, 0],
                                                       minlength=self.folds).astype(np.int64)
                self.overlap_CFL[c, :, l] += np.bincount(fold_T, weights=topk_overlap_T(tk[name], final),
                                                         minlength=self.folds)
        self.tables[-1].update(batch)
        for c, name in enumerate(names[:-1]):
            self.tables[c].update(dict(batch, expert=batch[name]))

    def result(self, steps: list[Any], min_count: int, null_seed: int, n_permutations: int = 16,
               n_bootstrap: int = REPLICATES) -> EarlyRouting:
        weights = replicate_weights(self.folds, n_bootstrap, null_seed) if self.folds > 1 and n_bootstrap else None
        final = self.tables[-1].result()
        ckpts = [t.result() for t in self.tables[:-1]]
        L, k = len(self.num_experts), self.top_k
        T_L = np.maximum(self.tokens_FL.sum(axis=0), 1)
        jsd, null_jsd, null_top1, null_overlap = (np.full((self.C, L), np.nan) for _ in range(4))
        sd_top1, sd_overlap = np.full((self.C, L), np.nan), np.full((self.C, L), np.nan)
        R = 0 if weights is None else len(weights)
        boot = {name: np.full((L, R), np.nan) for name in ("top1", "overlap", "jsd")}
        jsd_null_draws = np.full((L, n_permutations), np.nan)
        uniform = []
        for l, E in enumerate(self.num_experts):
            keep = final.tokens(l) >= min_count
            n_G = final.tokens(l)[keep]
            for c, tab in enumerate(ckpts):
                null_top1[c, l], sd_top1[c, l], null_overlap[c, l], sd_overlap[c, l] = self._moments(c, l, T_L[l])
                if not keep.any():
                    continue
                jsd[c, l] = jensen_shannon(tab.counts[l][keep], final.counts[l][keep]).mean()
                draws = self._jsd_null(c, l, n_G, final.counts[l][keep], n_permutations, null_seed,
                                       final.groups[l][keep], jsd[c, l], min_count)
                null_jsd[c, l] = np.nanmean(draws) if np.isfinite(draws).any() else np.nan
                if c == 0:
                    jsd_null_draws[l] = draws
                    if weights is not None:
                        pairs = zip(tab.replicate_tables(l, weights, keep), final.replicate_tables(l, weights, keep))
                        boot["jsd"][l] = [np.nanmean(jensen_shannon(a, b)) for a, b in pairs]
            a = random_topk_counts(n_G, E, k, null_seed + 2 * l)
            b = random_topk_counts(n_G, E, k, null_seed + 2 * l + 1)
            uniform.append(float(jensen_shannon(a, b).mean()) if keep.any() else float("nan"))
        if weights is not None:
            tok_RL = weights @ self.tokens_FL
            boot["top1"] = ((weights @ self.agree_CFL[0]) / np.maximum(tok_RL, 1)).T
            boot["overlap"] = ((weights @ self.overlap_CFL[0]) / np.maximum(tok_RL, 1)).T
        top1 = self.agree_CFL.sum(axis=1) / T_L
        overlap = self.overlap_CFL.sum(axis=1) / T_L
        first = self._first(top1[0], overlap[0], jsd[0], boot, (null_top1[0], sd_top1[0]),
                            (null_overlap[0], sd_overlap[0]), jsd_null_draws)
        return EarlyRouting(steps=steps, top1_agreement=top1, topk_overlap=overlap, jsd=jsd, null_top1=null_top1,
                            null_overlap=null_overlap, null_jsd=null_jsd,
                            uniform_top1=[1 / E for E in self.num_experts],
                            uniform_overlap=[k / E for E in self.num_experts], uniform_jsd=uniform,
                            min_count=min_count, first=first)

    def _moments(self, c: int, l: int, T: int) -> tuple[float, float, float, float]:
        """Mean and sd (of the mean over T tokens) of agreement and overlap under shuffled token identity."""
        a1, b1 = self.top1_CLE[l][c] / T, self.top1_CLE[l][self.C] / T
        q1 = float(a1 @ b1)
        pa, pb = self.pairs_CLEE[l][c] / T, self.pairs_CLEE[l][self.C] / T  # P(e and f both chosen)
        mean_x = float(np.diag(pa) @ np.diag(pb))  # E|A & B| for independent tokens
        var_x = max(float((pa * pb).sum()) - mean_x**2, 0.0)
        k = self.top_k
        return q1, float(np.sqrt(q1 * (1 - q1) / T)), mean_x / k, float(np.sqrt(var_x / T)) / k

    def _jsd_null(self, c: int, l: int, n_G: np.ndarray, final_GE: np.ndarray, n_permutations: int,
                  seed: int, groups_G: np.ndarray, value: float, min_count: int) -> np.ndarray:
        pool = self.pools[c]
        sets, complete = pool.layer(l)
        if not len(sets) or n_permutations == 0:
            return np.full(n_permutations, np.nan)
        seed = seed + 11 * l + c
        if pool.within_sequence(l):  # the token IDs shuffled within each sequence (seqpool.py)
            return within_sequence_null(pool, l, pool.token[l], groups_G, self.num_experts[l],
                                        lambda counts, _: jensen_shannon(counts, final_GE), n_permutations, seed)
        if (pool.token[l] >= 0).any():  # a sample of whole sequences: both tables on the sample's tokens
            final = self.pools[self.C]
            final.layer(l)
            if not np.array_equal(final.seq[l], pool.seq[l]) or not np.array_equal(final.pos[l], pool.pos[l]):
                raise MoelabError("early routing: the checkpoint's and the final trace's pools hold different tokens")
            used = sample_groups(pool, l, pool.token[l], groups_G, min_count)
            final_UE = pooled_counts(final, l, group_index(pool.token[l], groups_G[used]), int(used.sum()),
                                     self.num_experts[l])
            return within_sequence_null(pool, l, pool.token[l], groups_G[used], self.num_experts[l],
                                        lambda counts, _: jensen_shannon(counts, final_UE), n_permutations, seed,
                                        value=value, min_count=0)
        used, _, tables = permuted_tables(n_G, sets, complete, self.num_experts[l], n_permutations, seed)
        draws = np.array([jensen_shannon(t, final_GE[used]).mean() for t in tables])
        return subset_scale(draws, len(used), len(n_G))

    def _jsd_null_text(self) -> str:
        L = len(self.num_experts)
        if all(p.within_sequence(l) for p in self.pools for l in range(L)):
            return "the checkpoint's token IDs shuffled among the tokens of each sequence (keeps its load and each "\
                "sequence's routing)"
        if all((p.token[l] >= 0).any() or not len(p.token[l]) for p in self.pools for l in range(L)):
            return ("the checkpoint's token IDs shuffled among the tokens of each sequence, on a hash sample of whole "
                    "sequences (the trace has more tokens than the null holds): the null is the JSD less the "
                    "sample's departure from its own shuffle; p and z are the sample's")
        return "the checkpoint's token IDs shuffled across its tokens (keeps its load; the trace holds no token IDs)"

    def _first(self, top1_L, overlap_L, jsd_L, boot, m_top1, m_overlap, jsd_null_LP) -> dict[str, Estimate]:
        out = {}
        for name, values, moments in (("top1", top1_L, m_top1), ("overlap", overlap_L, m_overlap)):
            ok = np.isfinite(values)
            mean_boot = np.nanmean(boot[name][ok], axis=0) if ok.any() and boot[name].shape[1] else None
            sd = float(np.sqrt(np.sum(moments[1][ok] ** 2)) / max(ok.sum(), 1))  # mean of independent layers
            out[name] = estimate_from_moments(float(np.mean(values[ok])) if ok.any() else np.nan, mean_boot,
                                              float(np.mean(moments[0][ok])) if ok.any() else np.nan, sd,
                                              null="token identity shuffled between checkpoints (keeps both loads)",
                                              interval="95% bootstrap over sequences")
        _, out["jsd"] = layer_estimates(jsd_L, boot["jsd"] if boot["jsd"].shape[1] else None, jsd_null_LP,
                                        alternative="less", interval="95% bootstrap over sequences",
                                        null=self._jsd_null_text())
        return out


def _zip_aligned(streams: Sequence[Any], batch_rows: int) -> Iterator[list[Batch]]:
    """The streams' batches cut at common row boundaries (their files may have different row groups)."""
    iters = [iter(iter_input(s, ALIGN + ("expert",), batch_rows)) for s in streams]
    bufs: list[Batch | None] = [None] * len(iters)
    while True:
        bufs = [b if b is not None and len(b["expert"]) else next(it, None) for b, it in zip(bufs, iters)]
        if all(b is None for b in bufs):
            return
        if any(b is None for b in bufs):
            raise MoelabError("checkpoint traces differ in row count: they must trace the same tokens")
        n = min(len(b["expert"]) for b in bufs)
        yield [slice_batch(b, 0, n) for b in bufs]
        bufs = [slice_batch(b, n, len(b["expert"])) for b in bufs]


def merge_checkpoints(streams: Sequence[Any], batch_rows: int) -> Iterator[Batch]:
    """Zip the checkpoints' batches (final last), check they cover the same rows, merge their experts."""
    for batches in _zip_aligned(streams, batch_rows):
        final = batches[-1]
        for c, b in enumerate(batches[:-1]):
            for col in ALIGN:
                if not np.array_equal(b[col], final[col]):
                    what = "different tokens" if col in ("token", "seq", "pos") else "different layers/ranks"
                    raise MoelabError(f"checkpoint trace {c} differs from the final one in column {col!r} ({what})")
        merged = {col: final[col] for col in ALIGN + ("expert",)}
        merged.update({f"expert@{c}": b["expert"] for c, b in enumerate(batches[:-1])})
        yield merged


def _check_metas(streams: Sequence[Any]) -> None:
    metas = [getattr(s, "meta", None) for s in streams]
    if any(m is None for m in metas):
        return
    for c, m in enumerate(metas[:-1]):
        if m.num_experts != metas[-1].num_experts:
            raise MoelabError(f"checkpoint trace {c} has num_experts {m.num_experts}, the final one {metas[-1].num_experts}")
        if m.top_k != metas[-1].top_k:
            raise MoelabError(f"checkpoint trace {c} has top_k {m.top_k}, the final one {metas[-1].top_k}")
    rows = [getattr(s, "num_rows", None) for s in streams]
    if len(set(rows)) != 1:
        raise MoelabError(f"checkpoint traces differ in row count {rows}: they must trace the same tokens")


def early_routing(traces: Sequence[Any], *, num_experts: Sequence[int] | None = None,
                  top_k: int | None = None, steps: list[Any] | None = None, min_count: int = 10,
                  null_seed: int = 0, n_permutations: int = 16, n_bootstrap: int = REPLICATES,
                  batch_rows: int = 1 << 20) -> EarlyRouting:
    """Compare every trace in `traces` to the last one (the final checkpoint), layer by layer.

    Traces are opened `Trace`s (num_experts / top_k / steps then come from their sidecars) or iterables
    of batches; they must hold the same rows in the same order.
    """
    if len(traces) < 2:
        raise MoelabError("early routing needs at least two traces (checkpoints and the final one)")
    _check_metas(traces)
    for t in traces:
        require_rank_order(t, "early routing (top-1 agreement)")
    meta = getattr(traces[-1], "meta", None)
    num_experts = list(num_experts if num_experts is not None else meta.num_experts)
    top_k = top_k if top_k is not None else meta.top_k
    if steps is None:
        steps = [getattr(getattr(t, "meta", None), "checkpoint_step", i) for i, t in enumerate(traces[:-1])]
    acc = EarlyRoutingAccumulator(len(traces) - 1, num_experts, top_k, folds=FOLDS if n_bootstrap else 1)
    for batch in regroup(merge_checkpoints(traces, batch_rows), token_key):
        acc.update(batch)
    return acc.result(steps, min_count, null_seed, n_permutations, n_bootstrap)
