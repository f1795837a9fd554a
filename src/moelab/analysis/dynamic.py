"""A Closer Look's dynamic analyses, from an all-experts trace (every expert run on the real hidden state).

- Score rank vs norm rank: per (token, layer) rank the experts by router probability and by output norm;
  C[score_rank, norm_rank] counts experts (null: independent ranks, T/E in every cell). The share of
  (token, layer) whose top-1 expert has the largest output norm is C[0, 0] / T (null 1/E).
- Output similarity from `expert_cos`: mean cosine and angular similarity 1 - arccos(cos)/pi over expert
  pairs (null: unrelated outputs, cosine 0, angular 0.5).
- Activation sparsity from `expert_density`: mean share of |act(W_gate x)| > 1e-3 (baseline 1: dense).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from moelab.analysis.common import Batch, OrderedSum, Result, consume, iter_input, rank0_list, require_columns
from moelab.analysis.resample import Estimate, fold_of, layer_estimates
from moelab.config import MoelabError


def angular_similarity(cos: np.ndarray) -> np.ndarray:
    """1 - arccos(cos) / pi: 1 for parallel, 0.5 for orthogonal, 0 for opposite vectors."""
    return 1.0 - np.arccos(np.clip(cos, -1.0, 1.0)) / np.pi  # float32 in, float32 out (NumPy 2 scalars)


def rank_desc_TE(values_TE: np.ndarray) -> np.ndarray:
    """Rank of each entry within its row, 0 = largest (ties to the lower expert index)."""
    order = np.argsort(-values_TE, axis=1, kind="stable")
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(values_TE.shape[1])[None, :], axis=1)
    return ranks


def rank_table(probs_TE: np.ndarray, norms_TE: np.ndarray) -> np.ndarray:
    """C[score_rank, norm_rank]: how many experts sit at each pair of ranks."""
    E = probs_TE.shape[1]
    key = rank_desc_TE(probs_TE) * E + rank_desc_TE(norms_TE)
    return np.bincount(key.reshape(-1), minlength=E * E).reshape(E, E)


@dataclasses.dataclass
class DynamicResult(Result):
    rank_counts: list[np.ndarray] | None  # per layer E x E C[score_rank, norm_rank]
    top1_is_largest_norm: list[float] | None
    null_top1_is_largest_norm: list[float]  # 1 / E
    mean_cosine: list[float] | None         # mean over tokens and expert pairs i < j
    mean_angular: list[float] | None
    null_cosine: float                      # 0.0
    null_angular: float                     # 0.5
    density: list[np.ndarray] | None        # per layer, per expert: mean share of active units
    mean_density: list[float] | None
    dense_baseline: float                   # 1.0
    top1_estimates: list[Estimate] | None = None   # per layer, 95% bootstrap interval
    top1_overall: Estimate | None = None
    angular_estimates: list[Estimate] | None = None
    angular_overall: Estimate | None = None


class DynamicAccumulator:
    """Uses whichever of probs + expert_norms, expert_cos, expert_density the batches carry."""

    columns = ("seq", "layer", "rank", "probs", "expert_norms", "expert_cos", "expert_density")

    def __init__(self, num_experts: Sequence[int], folds: int = 1):
        self.num_experts, self.folds = list(num_experts), folds
        L = len(self.num_experts)
        # Counts (whole numbers, exact in float64) add; float sums keep their order (OrderedSum).
        self.top1_FL, self.tok_FL = np.zeros((folds, L)), np.zeros((folds, L))  # for the intervals
        self.ang_FL, self.pairs_FL = OrderedSum((folds, L)), np.zeros((folds, L))
        self.rank_counts = [np.zeros((E, E), np.int64) for E in self.num_experts]
        self.cos_sum, self.ang_sum, self.cos_n = OrderedSum(L), OrderedSum(L), np.zeros(L, np.int64)
        self.density_sum = OrderedSum((L, max(self.num_experts)))
        self.density_n = np.zeros(L, np.int64)
        self.seen: set[str] | None = None  # list columns present in every batch

    def update(self, batch: Batch) -> None:
        require_columns(batch, ("layer", "rank"), "dynamic analysis")
        have = {c for c in ("probs", "expert_norms", "expert_cos", "expert_density") if c in batch}
        self.seen = have if self.seen is None else self.seen & have
        rank0 = batch["rank"] == 0
        L = len(self.num_experts)
        ang_FL, cos_L, ang_L = np.zeros((self.folds, L)), np.zeros(L), np.zeros(L)
        density_LE = np.zeros(self.density_sum.open.shape)
        for l, E in enumerate(self.num_experts):
            rows = rank0 & (batch["layer"] == l)
            if not rows.any():
                continue
            fold = fold_of(batch["seq"][rows], self.folds) if "seq" in batch else np.zeros(int(rows.sum()), np.int64)
            if {"probs", "expert_norms"} <= have:
                probs, norms = rank0_list(batch, "probs", rows), rank0_list(batch, "expert_norms", rows)
                if probs.shape[1] != E or norms.shape[1] != E:
                    raise MoelabError(f"layer {l}: probs / expert_norms have {probs.shape[1]} / {norms.shape[1]} entries, expected E={E}")
                self.rank_counts[l] += rank_table(probs, norms)
                same = np.argmax(probs, axis=1) == np.argmax(norms, axis=1)  # first maximum, as rank_desc_TE
                self.top1_FL[:, l] += np.bincount(fold, weights=same, minlength=self.folds)
                self.tok_FL[:, l] += np.bincount(fold, minlength=self.folds)
            if "expert_cos" in have:
                cos = rank0_list(batch, "expert_cos", rows)  # float32: the widest column, kept narrow
                if cos.shape[1] != E * (E - 1) // 2:
                    raise MoelabError(f"layer {l}: expert_cos has {cos.shape[1]} entries, expected E(E-1)/2={E * (E - 1) // 2}")
                cos_L[l] = cos.sum(dtype=np.float64)
                ang_T = angular_similarity(cos).sum(axis=1, dtype=np.float64)
                ang_L[l] = ang_T.sum()
                self.cos_n[l] += cos.size
                ang_FL[:, l] = np.bincount(fold, weights=ang_T, minlength=self.folds)
                self.pairs_FL[:, l] += np.bincount(fold, minlength=self.folds) * cos.shape[1]
            if "expert_density" in have:
                dens = rank0_list(batch, "expert_density", rows)
                density_LE[l, :E] = dens.sum(axis=0, dtype=np.float64)  # float32 sums would depend on the batch
                self.density_n[l] += len(dens)
        for total, part in ((self.ang_FL, ang_FL), (self.cos_sum, cos_L), (self.ang_sum, ang_L),
                            (self.density_sum, density_LE)):
            total.add(part)

    def merge(self, other: "DynamicAccumulator") -> None:
        """Append a later part of the stream (parallel.py)."""
        for name in ("top1_FL", "tok_FL", "pairs_FL", "cos_n", "density_n"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for name in ("ang_FL", "cos_sum", "ang_sum", "density_sum"):
            getattr(self, name).merge(getattr(other, name))
        for mine, theirs in zip(self.rank_counts, other.rank_counts):
            mine += theirs
        self.seen = other.seen if self.seen is None else self.seen if other.seen is None else self.seen & other.seen

    def _intervals(self, out: DynamicResult, weights: np.ndarray | None) -> None:
        boot = "95% bootstrap over sequences"
        ok = weights is not None and self.folds > 1
        with np.errstate(invalid="ignore", divide="ignore"):
            top1 = ((weights @ self.top1_FL) / (weights @ self.tok_FL)).T if ok else None
            ang = ((weights @ self.ang_FL.total()) / (weights @ self.pairs_FL)).T if ok else None
        if out.top1_is_largest_norm is not None:
            out.top1_estimates, out.top1_overall = layer_estimates(out.top1_is_largest_norm, top1, None, interval=boot)
        if out.mean_angular is not None:
            out.angular_estimates, out.angular_overall = layer_estimates(out.mean_angular, ang, None, interval=boot)

    def result(self, weights: np.ndarray | None = None, **_: Any) -> DynamicResult:
        seen = self.seen or set()
        ranked = {"probs", "expert_norms"} <= seen
        has_cos, has_dens = "expert_cos" in seen, "expert_density" in seen
        n_cos = np.where(self.cos_n > 0, self.cos_n, np.nan)  # a one-expert layer has no pairs: NaN, not 0
        density = [s[:E] / max(n, 1) for s, n, E in zip(self.density_sum.total(), self.density_n, self.num_experts)]
        out = DynamicResult(
            rank_counts=self.rank_counts if ranked else None,
            top1_is_largest_norm=[float(c[0, 0] / max(c[0].sum(), 1)) for c in self.rank_counts] if ranked else None,
            null_top1_is_largest_norm=[1.0 / E for E in self.num_experts],
            mean_cosine=[float(v) for v in self.cos_sum.total() / n_cos] if has_cos else None,
            mean_angular=[float(v) for v in self.ang_sum.total() / n_cos] if has_cos else None,
            null_cosine=0.0, null_angular=0.5,
            density=density if has_dens else None,
            mean_density=[float(d.mean()) for d in density] if has_dens else None,
            dense_baseline=1.0,
        )
        self._intervals(out, weights)
        return out


def dynamic_analysis(trace_like: Any, num_experts: Sequence[int], *, batch_rows: int = 1 << 18) -> DynamicResult:
    """Score/norm ranks, output similarity and activation density of an all-experts trace."""
    acc = DynamicAccumulator(num_experts)
    consume(iter_input(trace_like, acc.columns, batch_rows), [acc])
    return acc.result()
