"""Early routing learning: how close each checkpoint's routing already is to the final one's, on the same
tokens. Per MoE layer and checkpoint t vs final: top-1 agreement, top-k overlap |TopK_t & TopK_final| / k
(OLMoE's router saturation), and the Jensen-Shannon divergence (nats) between per-token-ID expert
distributions E_i(token). Nulls: independent uniform routing gives 1/E, k/E, and a simulated JSD.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Sequence

import numpy as np

from moelab.analysis.common import (
    Batch, Result, check_experts, iter_input, layer_choices, regroup, slice_batch, token_key,
)
from moelab.analysis.null import random_topk_counts
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
    null_top1: list[float]       # 1/E per layer
    null_overlap: list[float]    # k/E per layer
    null_jsd: list[float]        # two independent uniform routings at the same n(v) (simulated)
    min_count: int


class EarlyRoutingAccumulator:
    """Consumes merged, token-complete batches: `expert` of the final trace and `expert@c` of checkpoint c."""

    def __init__(self, num_checkpoints: int, num_experts: Sequence[int], top_k: int):
        self.C, self.num_experts, self.top_k = num_checkpoints, list(num_experts), top_k
        L = len(self.num_experts)
        self.tokens_L = np.zeros(L, np.int64)
        self.agree_CL = np.zeros((self.C, L), np.int64)
        self.overlap_CL = np.zeros((self.C, L))
        self.tables = [ShareAccumulator("token", num_experts, top_k) for _ in range(self.C + 1)]

    def update(self, batch: Batch) -> None:
        check_experts(batch, self.num_experts)
        names = [f"expert@{c}" for c in range(self.C)]
        for l in range(len(self.num_experts)):
            tk = layer_choices(batch, l, self.top_k, ["expert"] + names)
            final = tk["expert"]
            self.tokens_L[l] += len(final)
            for c, name in enumerate(names):
                self.agree_CL[c, l] += int(np.sum(tk[name][:, 0] == final[:, 0]))
                self.overlap_CL[c, l] += topk_overlap_T(tk[name], final).sum()
        self.tables[-1].update(batch)
        for c, name in enumerate(names):
            self.tables[c].update(dict(batch, expert=batch[name]))

    def result(self, steps: list[Any], min_count: int, null_seed: int) -> EarlyRouting:
        final = self.tables[-1].result()
        ckpts = [t.result() for t in self.tables[:-1]]
        L = len(self.num_experts)
        jsd, null = np.full((self.C, L), np.nan), []
        for l, E in enumerate(self.num_experts):
            keep = final.tokens(l) >= min_count
            for c, tab in enumerate(ckpts):
                if keep.any():
                    jsd[c, l] = jensen_shannon(tab.counts[l][keep], final.counts[l][keep]).mean()
            n_G = final.tokens(l)[keep]
            a = random_topk_counts(n_G, E, self.top_k, null_seed + 2 * l)
            b = random_topk_counts(n_G, E, self.top_k, null_seed + 2 * l + 1)
            null.append(float(jensen_shannon(a, b).mean()) if keep.any() else float("nan"))
        tokens = np.maximum(self.tokens_L, 1)
        return EarlyRouting(steps=steps, top1_agreement=self.agree_CL / tokens,
                            topk_overlap=self.overlap_CL / tokens, jsd=jsd,
                            null_top1=[1 / E for E in self.num_experts],
                            null_overlap=[self.top_k / E for E in self.num_experts], null_jsd=null,
                            min_count=min_count)


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
                  null_seed: int = 0, batch_rows: int = 1 << 20) -> EarlyRouting:
    """Compare every trace in `traces` to the last one (the final checkpoint), layer by layer.

    Traces are opened `Trace`s (num_experts / top_k / steps then come from their sidecars) or iterables
    of batches; they must hold the same rows in the same order.
    """
    if len(traces) < 2:
        raise MoelabError("early routing needs at least two traces (checkpoints and the final one)")
    _check_metas(traces)
    meta = getattr(traces[-1], "meta", None)
    num_experts = list(num_experts if num_experts is not None else meta.num_experts)
    top_k = top_k if top_k is not None else meta.top_k
    if steps is None:
        steps = [getattr(getattr(t, "meta", None), "checkpoint_step", i) for i, t in enumerate(traces[:-1])]
    acc = EarlyRoutingAccumulator(len(traces) - 1, num_experts, top_k)
    for batch in regroup(merge_checkpoints(traces, batch_rows), token_key):
        acc.update(batch)
    return acc.result(steps, min_count, null_seed)
