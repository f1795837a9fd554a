"""Expert load per MoE layer: tokens per expert, imbalance, dead experts, router entropy, dropped share.

Null: uniform routing. Its load is flat (max/mean -> 1 as tokens grow; the finite-sample value is
simulated), no expert is dead, and the router's entropy is log E.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from moelab.analysis.common import (
    OrderedSum, Result, check_experts, consume, iter_input, layer_entropy, require_columns,
)
from moelab.analysis.null import uniform_imbalance
from moelab.analysis.resample import Estimate, fold_of, layer_estimates

BOOT = "95% bootstrap over sequences"


@dataclasses.dataclass
class LoadResult(Result):
    """Per MoE layer l (lists indexed by l; arrays of length E_l)."""

    num_experts: list[int]
    top_k: int
    tokens: list[int]                   # (token, layer) pairs seen = rank-0 rows
    routed: list[np.ndarray]            # choices per expert, before dropping, all ranks
    kept: list[np.ndarray]              # choices per expert that were not dropped
    share: list[np.ndarray]             # routed / all choices of the layer
    max_over_mean: list[float]          # max_e routed / mean_e routed
    null_max_over_mean: list[float]     # the same under uniform routing at this many tokens (simulated)
    dead_experts: list[list[int]]       # experts with no choice at all
    dropped_share: list[float]          # dropped choices / all choices
    router_entropy: list[float] | None  # mean over tokens of H(probs), nats; None without `probs`
    null_router_entropy: list[float]    # log E_l: the uniform router
    uniform_share: list[float]          # 1 / E_l
    imbalance: list[Estimate] | None = None      # max/mean per layer with interval (null: uniform routing)
    imbalance_overall: Estimate | None = None
    dropped: list[Estimate] | None = None        # dropped share per layer with interval
    dropped_overall: Estimate | None = None

    @property
    def mean_max_over_mean(self) -> float:
        return float(np.nanmean(self.max_over_mean))


class LoadAccumulator:
    """Streams batches into per-layer expert counts; rows need not be grouped."""

    def __init__(self, num_experts: Sequence[int], top_k: int, *, null_seed: int = 0, folds: int = 1):
        self.num_experts = list(num_experts)
        self.top_k = top_k
        self.null_seed = null_seed
        self.folds = folds
        L, E = len(self.num_experts), max(self.num_experts)
        self.routed_FLE = np.zeros((folds, L, E), np.int64)
        self.kept_FLE = np.zeros((folds, L, E), np.int64)
        self.entropy_sum_L = OrderedSum(L)
        self.entropy_n_L = np.zeros(L, np.int64)
        self.has_probs = True

    columns = ("seq", "layer", "rank", "expert", "dropped", "probs")

    def update(self, batch: dict[str, np.ndarray]) -> None:
        require_columns(batch, ("layer", "rank", "expert", "dropped"), "load")
        check_experts(batch, self.num_experts)
        F, L, E = self.routed_FLE.shape
        key = batch["layer"].astype(np.int64) * E + batch["expert"]
        if F > 1:
            key = key + L * E * fold_of(batch["seq"], F)
        self.routed_FLE += np.bincount(key, minlength=F * L * E).reshape(F, L, E)
        self.kept_FLE += np.bincount(key[~batch["dropped"]], minlength=F * L * E).reshape(F, L, E)
        self.has_probs = self.has_probs and "probs" in batch
        if self.has_probs:
            self._update_entropy(batch)

    def _update_entropy(self, batch: dict[str, np.ndarray]) -> None:
        L = len(self.num_experts)
        sum_L = np.zeros(L)
        for l in range(L):
            ent_T = layer_entropy(batch, l, L, self.top_k)
            sum_L[l] = ent_T.sum()
            self.entropy_n_L[l] += len(ent_T)
        self.entropy_sum_L.add(sum_L)

    def merge(self, other: "LoadAccumulator") -> None:
        """Add the counts of a later part of the stream (parallel.py)."""
        self.routed_FLE += other.routed_FLE
        self.kept_FLE += other.kept_FLE
        self.entropy_sum_L.merge(other.entropy_sum_L)
        self.entropy_n_L += other.entropy_n_L
        self.has_probs = self.has_probs and other.has_probs

    def result(self, weights: np.ndarray | None = None, **_: Any) -> LoadResult:
        routed, kept, tokens, mom, null_mom, dead, dropped = [], [], [], [], [], [], []
        routed_LE, kept_LE = self.routed_FLE.sum(axis=0), self.kept_FLE.sum(axis=0)
        for l, E in enumerate(self.num_experts):
            r, kp = routed_LE[l, :E], kept_LE[l, :E]
            routed.append(r)
            kept.append(kp)
            tokens.append(int(r.sum()) // self.top_k)
            mom.append(float(r.max() / r.mean()) if r.sum() else float("nan"))
            null_mom.append(uniform_imbalance(tokens[-1], E, self.top_k, self.null_seed + l))
            dead.append([int(e) for e in np.flatnonzero(r == 0)])
            dropped.append(float(1 - kp.sum() / r.sum()) if r.sum() else float("nan"))
        ent = None
        if self.has_probs:
            ent = [float(s / n) if n else float("nan") for s, n in zip(self.entropy_sum_L.total(), self.entropy_n_L)]
        out = LoadResult(
            num_experts=self.num_experts, top_k=self.top_k, tokens=tokens, routed=routed, kept=kept,
            share=[r / max(r.sum(), 1) for r in routed], max_over_mean=mom, null_max_over_mean=null_mom,
            dead_experts=dead, dropped_share=dropped, router_entropy=ent,
            null_router_entropy=[float(np.log(E)) for E in self.num_experts],
            uniform_share=[1.0 / E for E in self.num_experts],
        )
        self._intervals(out, weights)
        return out

    def _intervals(self, out: LoadResult, weights: np.ndarray | None) -> None:
        """Bootstrap replicates of max/mean and the dropped share from the fold-weighted counts."""
        boot_mom = boot_drop = None
        if weights is not None and self.folds > 1:
            routed_RLE = np.einsum("rf,fle->rle", weights, self.routed_FLE)
            kept_RLE = np.einsum("rf,fle->rle", weights, self.kept_FLE)
            boot_mom, boot_drop = [], []
            for l, E in enumerate(self.num_experts):
                r, kp = routed_RLE[:, l, :E], kept_RLE[:, l, :E]
                with np.errstate(invalid="ignore", divide="ignore"):
                    boot_mom.append(r.max(axis=1) / r.mean(axis=1))
                    boot_drop.append(1 - kp.sum(axis=1) / r.sum(axis=1))
        out.imbalance, out.imbalance_overall = layer_estimates(out.max_over_mean, boot_mom, None, interval=BOOT)
        out.dropped, out.dropped_overall = layer_estimates(out.dropped_share, boot_drop, None, interval=BOOT)


def expert_load(trace_like: Any, num_experts: Sequence[int], top_k: int, *,
                batch_rows: int = 1 << 20, null_seed: int = 0) -> LoadResult:
    """Load statistics of a trace (or iterable of batches) in one streaming pass."""
    acc = LoadAccumulator(num_experts, top_k, null_seed=null_seed)
    consume(iter_input(trace_like, LoadAccumulator.columns, batch_rows), [acc])
    return acc.result()
