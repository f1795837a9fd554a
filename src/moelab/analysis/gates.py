"""RMoE's routing-distribution analyses: cross-layer mutual information of the gate vectors, gate entropy,
and Inner / Outer Balance.

Cross-layer MI (per token): bin both layers' softmax vectors into 100 bins on [0, 1] (np.digitize on
np.linspace(0, 1, 101)), treat the E experts as E paired samples of (bin at layer i, bin at layer j), and
take the MI of that empirical joint (nats); average over tokens. It needs equal E in both layers (NaN
otherwise). With E samples the estimate is biased upwards (all-distinct bins give log E whatever the
layers), so its null matters: the same MI with each token's layer-i gates paired with ANOTHER token's
layer-j gates. That keeps what is not under test, each layer's gate distribution per expert (its load),
and breaks only the token-level link between the layers. (Shuffling the experts within a token, the
earlier null, also broke the load: with a skewed load, independent layers sat above it, and a router
whose layers favour different experts sat below it.)
Gate entropy -sum g log g (null: log E); Inner Balance = top-1 / top-2 score (null 1); Outer Balance =
sum of the top-k scores (null k/E). Balances use `prob`, entropy and MI need `probs`; medians over tokens.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from moelab.analysis.common import (
    Batch, OrderedSum, Result, check_experts, consume, iter_input, layer_choices, layer_entropy, layer_list,
    regroup, require_columns, token_key,
)
from moelab.analysis.resample import Estimate, estimate, fold_of, layer_estimates
from moelab.config import MoelabError

NULL_TOKENS = 4096  # tokens per batch whose token-shuffled MI estimates the null


def sample_entropy_T(codes_TE: np.ndarray) -> np.ndarray:
    """Entropy (nats) of the empirical distribution of each row's E values: log E - sum_v n_v log n_v / E
    over the runs of equal values in the sorted row (n log n from a table: runs are at most E long)."""
    T, E = codes_TE.shape
    if T == 0 or E == 0:
        return np.zeros(T)
    s = np.sort(codes_TE, axis=1)
    new_TE = np.ones((T, E), dtype=bool)
    np.not_equal(s[:, 1:], s[:, :-1], out=new_TE[:, 1:])
    start = np.flatnonzero(new_TE)
    n = np.arange(E + 1, dtype=np.float64)
    nlogn = n * np.log(np.maximum(n, 1))
    first_run = np.r_[0, np.cumsum(new_TE.sum(axis=1))[:-1]]
    return np.log(E) - np.add.reduceat(nlogn[np.diff(start, append=T * E)], first_run) / E


def bin_gates(gates_TE: np.ndarray, bins: int = 100) -> np.ndarray:
    """Bin index 0..bins+1 per entry; int16 keeps the joint codes ((bins+2)^2) small and sorts fast."""
    if (bins + 2) ** 2 >= 1 << 15:
        raise MoelabError(f"cross-layer MI supports at most 179 bins, got {bins}")
    edges = np.linspace(0.0, 1.0, bins + 1)
    # np.digitize(g, edges) without its binary search: guess floor(g * bins) + 1, then fix the rounding
    # at the edges so the result is exactly digitize's.
    padded = np.concatenate([[-np.inf], edges, [np.inf]])  # padded[i] = edges[i - 1]
    guess = np.clip(np.floor(gates_TE * bins).astype(np.int64) + 1, 0, bins + 1)
    guess -= gates_TE < padded[guess]
    guess += gates_TE >= padded[guess + 1]
    return guess.astype(np.int16)


def binned_mi_T(x_TE: np.ndarray, y_TE: np.ndarray, bins: int = 100) -> np.ndarray:
    """Per-token MI (nats) between two binned gate vectors over the experts as samples (inputs: bins)."""
    joint = x_TE * (bins + 2) + y_TE
    return sample_entropy_T(x_TE) + sample_entropy_T(y_TE) - sample_entropy_T(joint)


def token_pairs(T: int, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """n tokens of T and, for each, a partner that is always a different token (a rotated permutation)."""
    order = rng.permutation(T)[: max(min(n, T), 0)]
    return order, np.roll(order, 1)


def cross_layer_mi_T(gates_i_TE: np.ndarray, gates_j_TE: np.ndarray, bins: int = 100) -> np.ndarray:
    """RMoE's per-token MI between the routing distributions of two layers."""
    return binned_mi_T(bin_gates(gates_i_TE, bins), bin_gates(gates_j_TE, bins), bins)


@dataclasses.dataclass
class GateStats(Result):
    cross_layer_mi: np.ndarray | None       # L x L mean over tokens (NaN where E differs); None without probs
    cross_layer_null: np.ndarray | None     # same with layer j's gates taken from another token
    gate_entropy_median: list[float] | None
    gate_entropy_mean: list[float] | None
    null_gate_entropy: list[float]          # log E
    inner_balance_median: list[float]       # top-1 / top-2 prob (NaN for k = 1)
    outer_balance_median: list[float]       # sum of top-k probs
    null_inner_balance: float               # 1.0
    null_outer_balance: list[float]         # k / E
    cross_layer_overall: Estimate | None = None  # mean over pairs i != j, 95% bootstrap interval
    entropy_estimates: list[Estimate] | None = None  # mean gate entropy per layer, 95% bootstrap interval
    entropy_overall: Estimate | None = None


class GateStatsAccumulator:
    """Needs token-complete batches; keeps one float per (token, layer) per statistic for the medians."""

    columns = ("seq", "pos", "layer", "rank", "prob", "probs")

    def __init__(self, num_experts: Sequence[int], top_k: int, *, bins: int = 100, null_seed: int = 0,
                 folds: int = 1):
        self.num_experts, self.top_k, self.bins, self.folds = list(num_experts), top_k, bins, folds
        L = len(self.num_experts)
        self.mi_FLL = OrderedSum((folds, L, L))
        self.tokens_F = np.zeros(folds, np.int64)
        self.entropy_FL = OrderedSum((folds, L))
        self.null_seed = null_seed
        self.mi_sum, self.null_sum = OrderedSum((L, L)), OrderedSum((L, L))
        self.n_tokens, self.n_null = 0, 0
        self.entropy: list[list[np.ndarray]] = [[] for _ in range(L)]
        self.inner: list[list[np.ndarray]] = [[] for _ in range(L)]
        self.outer: list[list[np.ndarray]] = [[] for _ in range(L)]
        self.has_probs = True

    def update(self, batch: Batch) -> None:
        require_columns(batch, ("seq", "pos", "layer", "rank", "prob"), "gate statistics")
        check_experts(batch, self.num_experts)
        self.has_probs = self.has_probs and "probs" in batch
        binned, first, fold_T = [], None, None
        entropy_FL = np.zeros(self.entropy_FL.open.shape)
        for l in range(len(self.num_experts)):
            tk = layer_choices(batch, l, self.top_k, ("prob", "seq", "pos"), len(self.num_experts))
            p = tk["prob"].astype(np.float64)
            self.outer[l].append(p.sum(axis=1).astype(np.float32))
            if self.top_k > 1:
                self.inner[l].append((p[:, 0] / np.maximum(p[:, 1], 1e-30)).astype(np.float32))
            if not self.has_probs:
                continue
            L = len(self.num_experts)
            probs_TE = layer_list(batch, "probs", l, L, self.top_k)
            ent_T = layer_entropy(batch, l, L, self.top_k)
            self.entropy[l].append(ent_T.astype(np.float32))
            fold_T = fold_of(tk["seq"][:, 0], self.folds) if fold_T is None else fold_T
            entropy_FL[:, l] = np.bincount(fold_T, weights=ent_T, minlength=self.folds)
            key = (tk["seq"][:, 0], tk["pos"][:, 0])
            first = first or key
            if not (np.array_equal(first[0], key[0]) and np.array_equal(first[1], key[1])):
                raise MoelabError(f"layer {l} covers different tokens than layer 0: cross-layer MI needs every layer")
            binned.append(bin_gates(probs_TE, self.bins))
        if self.has_probs and binned:
            self.entropy_FL.add(entropy_FL)
            self._update_mi(binned, fold_T, first)

    def _update_mi(self, binned: list[np.ndarray], fold_T: np.ndarray, key: tuple[np.ndarray, np.ndarray]) -> None:
        """MI(i, j) = H(i) + H(j) - H(i, j); the null pairs token a's layer i with token b's layer j."""
        T = len(binned[0])
        if T == 0:
            return
        # A subsample of each batch stands for the whole batch (weight T / n_null), so that the null is
        # token-weighted like the MI; a batch of one token has no other token to pair with. The pairs'
        # generator is seeded by the batch's first token, not advanced from batch to batch, so a pass split
        # over processes draws the pairs one pass would.
        n_null = min(T, NULL_TOKENS) if T > 1 else 0
        rng = np.random.default_rng([self.null_seed, 0x6A7E, int(key[0][0]), int(key[1][0])])
        L = len(self.num_experts)
        mi_LL, null_LL, mi_FLL = np.zeros((L, L)), np.zeros((L, L)), np.zeros((self.folds, L, L))
        h = [sample_entropy_T(x) for x in binned]
        for i, x in enumerate(binned):
            for j in range(i, len(binned)):
                y = binned[j]
                if x.shape[1] != y.shape[1]:
                    continue
                joint = h[i] if i == j else sample_entropy_T(x * (self.bins + 2) + y)
                mi_T = h[i] + h[j] - joint
                mi_LL[i, j] = mi_T.sum()
                mi_FLL[:, i, j] = np.bincount(fold_T, weights=mi_T, minlength=self.folds)
                if n_null:
                    a, b = token_pairs(T, n_null, rng)
                    joint_null = sample_entropy_T(x[a] * (self.bins + 2) + y[b])
                    null_LL[i, j] = (h[i][a] + h[j][b] - joint_null).sum() * (T / n_null)
        self.mi_sum.add(mi_LL)
        self.null_sum.add(null_LL)
        self.mi_FLL.add(mi_FLL)
        self.n_tokens += T
        self.n_null += T if n_null else 0
        self.tokens_F += np.bincount(fold_T, minlength=self.folds)

    def _intervals(self, out: GateStats, weights: np.ndarray | None) -> None:
        boot = "95% bootstrap over sequences"
        L = len(self.num_experts)
        off = ~np.eye(L, dtype=bool) & np.isfinite(out.cross_layer_mi)
        reps = None
        if weights is not None and self.folds > 1:
            tok_R = np.maximum(weights @ self.tokens_F, 1)
            mi_RLL = np.einsum("rf,fij->rij", weights, self.mi_FLL.total()) / tok_R[:, None, None]
            mi_RLL = mi_RLL + np.triu(mi_RLL, 1).transpose(0, 2, 1)
            reps = mi_RLL[:, off].mean(axis=1) if off.any() else None
            ent_LR = (weights @ self.entropy_FL.total() / tok_R[:, None]).T
        else:
            ent_LR = None
        value = float(out.cross_layer_mi[off].mean()) if off.any() else float("nan")
        out.cross_layer_overall = estimate(value, reps, interval=boot)
        out.entropy_estimates, out.entropy_overall = layer_estimates(out.gate_entropy_mean, ent_LR, None,
                                                                     interval=boot)

    def merge(self, other: "GateStatsAccumulator") -> None:
        """Append a later part of the stream: sums in order (OrderedSum), per-token values after ours."""
        for name in ("mi_FLL", "entropy_FL", "mi_sum", "null_sum"):
            getattr(self, name).merge(getattr(other, name))
        self.tokens_F += other.tokens_F
        self.n_tokens += other.n_tokens
        self.n_null += other.n_null
        for mine, theirs in zip(self.entropy + self.inner + self.outer, other.entropy + other.inner + other.outer):
            mine.extend(theirs)
        self.has_probs = self.has_probs and other.has_probs

    def result(self, weights: np.ndarray | None = None, **_: Any) -> GateStats:
        def med(parts: list[np.ndarray]) -> float:
            return float(np.median(np.concatenate(parts))) if parts else float("nan")

        mi = null = ent_med = ent_mean = None
        if self.has_probs:
            E = np.asarray(self.num_experts)
            same = E[:, None] == E[None, :]
            mi = np.where(same, _symmetric(self.mi_sum.total()) / max(self.n_tokens, 1), np.nan)
            null = np.where(same, _symmetric(self.null_sum.total()) / max(self.n_null, 1), np.nan)
            ent_med = [med(p) for p in self.entropy]
            ent_mean = [float(np.concatenate(p).mean()) if p else float("nan") for p in self.entropy]
        out = GateStats(
            cross_layer_mi=mi, cross_layer_null=null, gate_entropy_median=ent_med, gate_entropy_mean=ent_mean,
            null_gate_entropy=[float(np.log(E)) for E in self.num_experts],
            inner_balance_median=[med(p) for p in self.inner], outer_balance_median=[med(p) for p in self.outer],
            null_inner_balance=1.0, null_outer_balance=[self.top_k / E for E in self.num_experts],
        )
        if self.has_probs and self.n_tokens:
            self._intervals(out, weights)
        return out


def _symmetric(upper: np.ndarray) -> np.ndarray:
    return upper + np.triu(upper, 1).T


def gate_stats(trace_like: Any, num_experts: Sequence[int], top_k: int, *, bins: int = 100,
               null_seed: int = 0, batch_rows: int = 1 << 20) -> GateStats:
    """Cross-layer MI, gate entropy and balances in one streaming pass."""
    acc = GateStatsAccumulator(num_experts, top_k, bins=bins, null_seed=null_seed)
    consume(regroup(iter_input(trace_like, acc.columns, batch_rows), token_key), [acc])
    return acc.result()
