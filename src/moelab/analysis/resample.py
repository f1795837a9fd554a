"""Intervals and margin-keeping nulls, shared by every routing analysis.

Intervals: a bootstrap over sequences, streamed. Each sequence falls into one of F folds by a hash of its
index, and every accumulator keeps its counts split by fold (a leading F axis, or a fold field in its
sparse key). A bootstrap replicate weights the folds by Multinomial(F, 1/F) counts and recomputes the
statistic from the weighted counts: a cluster bootstrap whose clusters are random sets of whole
sequences, so it needs one pass and no trace in memory. F (32) bounds the degrees of freedom of the
interval: its width is itself uncertain by about 1/sqrt(2F), 12%.

Nulls (co-activation aside: see `fit_load_weights`): a permutation that keeps each layer's expert load
and each group's size. The group label (token ID, position, domain) is shuffled across the tokens of a
layer while each token's chosen set stays whole.
The shuffled table only needs the layer's pool of chosen sets: a group of n(g) tokens gets n(g) sets
drawn from it without replacement. A `SetPool` keeps every set while the layer has at most `size` tokens
(the null is then exact) and otherwise the `size` sets of smallest hash (a uniform sample, drawn with
replacement).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

from moelab.analysis.common import Result

FOLDS = 32
REPLICATES = 64
POOL_SIZE = 1 << 18
MAX_NULL_TOKENS = 1 << 18  # tokens drawn per layer and permutation; more groups are subsampled
GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def mix64(x: np.ndarray, seed: int = 0) -> np.ndarray:
    """splitmix64 finaliser: a well-spread uint64 hash of int64 keys (the same on every batch cut)."""
    with np.errstate(over="ignore"):
        z = np.asarray(x).astype(np.uint64) * GOLDEN + np.uint64(seed & 0xFFFFFFFF)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


_FOLD_CACHE: list = [None, None, None]  # (seq array, (folds, seed), folds): the last batch's, computed once


def fold_of(seq: np.ndarray, folds: int = FOLDS, seed: int = 0) -> np.ndarray:
    """The bootstrap fold (0..folds-1) of each row's sequence. Every accumulator asks for the folds of the
    same batch column in turn: the last answer is kept (the array itself, so its identity stays valid)."""
    if _FOLD_CACHE[0] is seq and _FOLD_CACHE[1] == (folds, seed):
        return _FOLD_CACHE[2]
    seq_N = np.asarray(seq)
    starts = np.flatnonzero(seq_N[1:] != seq_N[:-1]) + 1 if seq_N.ndim == 1 and len(seq_N) > 64 else None
    if starts is not None and len(starts) < len(seq_N) // 8:  # rows come in runs of a sequence: hash each once
        starts = np.r_[0, starts]
        fold_S = (mix64(seq_N[starts], seed) % np.uint64(folds)).astype(np.int64)
        out = np.repeat(fold_S, np.diff(np.r_[starts, len(seq_N)]))
    else:
        out = (mix64(seq_N, seed) % np.uint64(folds)).astype(np.int64)
    _FOLD_CACHE[:] = [seq, (folds, seed), out]
    return out


def replicate_weights(folds: int = FOLDS, replicates: int = REPLICATES, seed: int = 0) -> np.ndarray:
    """R x F fold weights: each replicate draws F folds with replacement."""
    rng = np.random.default_rng([seed, 0xB007])
    return rng.multinomial(folds, np.full(folds, 1.0 / folds), size=replicates).astype(np.float64)


# ---- a number with its interval and null -------------------------------------------------------------
@dataclasses.dataclass
class Estimate(Result):
    """value [ci_low, ci_high] (null_mean +- null_sd); p: one-sided permutation p-value in the direction
    of `alternative` ("greater": specialisation, "less": divergence), z: (value - null_mean) / null_sd.

    The interval is the bootstrap's 2.5-97.5% percentiles shifted by its bias (mean of the replicates minus
    the value): a replicate repeats some sequences, which inflates noise-driven statistics (a std or a max
    over few tokens); the shift keeps that bias out of the interval, `bias` reports it."""

    value: float
    ci_low: float
    ci_high: float
    null_mean: float
    null_sd: float
    p: float
    z: float
    n_permutations: int
    n_bootstrap: int
    bias: float = float("nan")  # mean of the bootstrap replicates minus the value
    null: str = ""      # what the null keeps and shuffles
    interval: str = ""  # what the interval resamples


def _finite(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, np.float64).reshape(-1)
    return a[np.isfinite(a)]


def estimate(value: float, boot_R: np.ndarray | None = None, null_P: np.ndarray | None = None, *,
             alternative: str = "greater", null: str = "", interval: str = "") -> Estimate:
    """Summarise a value, its bootstrap replicates (95% percentile interval) and its null draws."""
    nan = float("nan")
    b = _finite(boot_R) if boot_R is not None else np.zeros(0)
    n = _finite(null_P) if null_P is not None else np.zeros(0)
    lo = hi = bias = nan
    if b.size and value == value:
        bias = float(b.mean() - value)
        lo, hi = float(np.percentile(b, 2.5)) - bias, float(np.percentile(b, 97.5)) - bias
    mean, sd = (float(n.mean()), float(n.std(ddof=1)) if n.size > 1 else 0.0) if n.size else (nan, nan)
    p = z = nan
    if n.size and value == value:
        beyond = np.sum(n >= value) if alternative == "greater" else np.sum(n <= value)
        p = float((1 + beyond) / (1 + n.size))
        z = float((value - mean) / sd) if sd > 0 else (0.0 if value == mean else float(np.sign(value - mean) * np.inf))
    return Estimate(value=float(value), ci_low=lo, ci_high=hi, null_mean=mean, null_sd=sd, p=p, z=z,
                    n_permutations=int(n.size), n_bootstrap=int(b.size), bias=bias, null=null, interval=interval)


def stack_ragged(parts: Sequence[np.ndarray]) -> np.ndarray | None:
    """Per-layer replicate or null arrays as one (layers, width) array, a layer with fewer (none: no
    interval or no null there) padded with NaN; None when no layer has any."""
    width = max((len(p) for p in parts), default=0)
    if width == 0:
        return None
    return np.stack([p if len(p) == width else np.full(width, np.nan) for p in parts])


def layer_estimates(values_L: Sequence[float], boot_LR: np.ndarray | None, null_LP: np.ndarray | None,
                    **kw) -> tuple[list[Estimate], Estimate]:
    """Per-layer estimates and the mean over layers (layers without a value left out, per replicate too)."""
    values = np.asarray(values_L, np.float64)
    L = len(values)
    boot = None if boot_LR is None else np.asarray(boot_LR, np.float64).reshape(L, -1)
    nulls = None if null_LP is None else np.asarray(null_LP, np.float64).reshape(L, -1)
    per = [estimate(values[l], None if boot is None else boot[l], None if nulls is None else nulls[l], **kw)
           for l in range(L)]
    ok = np.isfinite(values)
    if not ok.any():
        return per, estimate(float("nan"), **kw)
    mean_boot = None if boot is None else _nanmean_cols(boot[ok])
    mean_null = None if nulls is None else _nanmean_cols(nulls[ok])
    return per, estimate(float(values[ok].mean()), mean_boot, mean_null, **kw)


def _nanmean_cols(a: np.ndarray) -> np.ndarray:
    if a.shape[1] == 0:
        return np.zeros(0)
    with np.errstate(invalid="ignore"):
        counts = np.isfinite(a).sum(axis=0)
        return np.where(counts > 0, np.nansum(a, axis=0) / np.maximum(counts, 1), np.nan)


# ---- the pool of chosen sets, and group tables under the permutation null ----------------------------
class SetPool:
    """Each layer's chosen sets (T x K expert ids), complete up to `size` tokens, else a hash sample."""

    def __init__(self, num_layers: int, top_k: int, size: int = POOL_SIZE, seed: int = 0):
        self.size, self.seed, self.top_k = size, seed, top_k
        self.sets = [np.zeros((0, top_k), np.int16) for _ in range(num_layers)]  # expert ids < 2^15
        self.prio = [np.zeros(0, np.uint64) for _ in range(num_layers)]
        self.seen = np.zeros(num_layers, np.int64)

    def add(self, layer: int, token_key_T: np.ndarray, ids_TK: np.ndarray) -> None:
        self.seen[layer] += len(ids_TK)
        prio = mix64(token_key_T, self.seed + 7 * layer)
        self.sets[layer] = np.concatenate([self.sets[layer], np.asarray(ids_TK, np.int16)])
        self.prio[layer] = np.concatenate([self.prio[layer], prio])
        if len(self.prio[layer]) > 2 * self.size:
            self._trim(layer)

    def _trim(self, layer: int) -> None:
        if len(self.prio[layer]) > self.size:
            keep = np.argpartition(self.prio[layer], self.size - 1)[:self.size]
            self.sets[layer], self.prio[layer] = self.sets[layer][keep], self.prio[layer][keep]
        order = np.argsort(self.prio[layer], kind="stable")  # batch-independent order
        self.sets[layer], self.prio[layer] = self.sets[layer][order], self.prio[layer][order]

    def merge(self, other: "SetPool") -> None:
        """Take in another part of the stream's sets: the smallest hashes of the union are those of one pass,
        and `_trim` orders them by hash, so the pool is the one-pass pool."""
        for l in range(len(self.sets)):
            self.seen[l] += other.seen[l]
            self.sets[l] = np.concatenate([self.sets[l], other.sets[l]])
            self.prio[l] = np.concatenate([self.prio[l], other.prio[l]])
            if len(self.prio[l]) > 2 * self.size:
                self._trim(l)

    def layer(self, layer: int) -> tuple[np.ndarray, bool]:
        """(sets, complete): complete when every token of the layer is in the pool."""
        self._trim(layer)
        return self.sets[layer], bool(self.seen[layer] == len(self.sets[layer]))


def permuted_tables(n_G: np.ndarray, pool_MK: np.ndarray, complete: bool, num_experts: int,
                    n_permutations: int, seed: int,
                    max_tokens: int = MAX_NULL_TOKENS) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """(groups used, their sizes as drawn, one G' x E count table per permutation) with the group label
    shuffled across tokens.

    When the groups hold more than `max_tokens` tokens a seeded random subset of groups is drawn (the
    same subset in every permutation): the null's mean per group is unchanged, its spread over the mean
    of all groups is rescaled by the caller (`subset_scale`). A single group larger than `max_tokens`
    (a domain on a long trace) is drawn at `max_tokens` tokens, which overstates its null's noise by
    sqrt(n(g) / max_tokens) at most.
    """
    rng = np.random.default_rng([seed, 0x9E11])
    n_G = np.asarray(n_G, np.int64)
    groups = np.arange(len(n_G))
    if n_G.sum() > max_tokens:
        order = rng.permutation(len(n_G))
        groups = np.sort(order[np.cumsum(n_G[order]) <= max_tokens])
        if len(groups) == 0:
            groups = order[:1]
    n_sub = np.minimum(n_G[groups], max_tokens)
    total, M, E = int(n_sub.sum()), len(pool_MK), num_experts
    owner = np.repeat(np.arange(len(groups)), n_sub)
    tables = []
    for _ in range(n_permutations):
        if complete and total <= M:
            pick = rng.permutation(M)[:total]
        else:
            pick = rng.integers(0, M, size=total) if M else np.zeros(0, np.int64)
        keys = (owner[:, None] * E + pool_MK[pick].astype(np.int64)).reshape(-1)
        tables.append(np.bincount(keys, minlength=len(groups) * E).reshape(len(groups), E))
    return groups, n_sub, tables


def subset_scale(null_P: np.ndarray, used: int, total: int) -> np.ndarray:
    """Shrink the spread of a null mean over `used` of `total` independent groups to that over all."""
    null_P = np.asarray(null_P, np.float64)
    if used >= total or used == 0 or null_P.size < 2:
        return null_P
    m = null_P.mean()
    return m + (null_P - m) * np.sqrt(used / total)


def group_null(n_G: np.ndarray, pool: tuple[np.ndarray, bool], num_experts: int,
               stat_G: Callable[[np.ndarray, np.ndarray], np.ndarray], n_permutations: int,
               seed: int) -> np.ndarray:
    """Null draws of mean over groups of stat_G(counts_GE, n_G), one per permutation."""
    if len(n_G) == 0 or n_permutations == 0 or len(pool[0]) == 0:
        return np.full(n_permutations, np.nan)
    used, n_used, tables = permuted_tables(n_G, pool[0], pool[1], num_experts, n_permutations, seed)
    draws = np.array([float(np.mean(stat_G(t, n_used))) for t in tables])
    return subset_scale(draws, len(used), len(n_G))


class SetPoolAccumulator:
    """Collects each layer's chosen sets into a `SetPool`; needs token-complete batches."""

    columns = ("seq", "pos", "layer", "rank", "expert")

    def __init__(self, num_experts: Sequence[int], top_k: int, *, size: int = POOL_SIZE, seed: int = 0):
        self.num_experts, self.top_k = list(num_experts), top_k
        self.pool = SetPool(len(self.num_experts), top_k, size, seed)

    def update(self, batch: dict[str, np.ndarray]) -> None:
        from moelab.analysis.common import layer_choices

        for l in range(len(self.num_experts)):
            tk = layer_choices(batch, l, self.top_k, ("expert", "seq", "pos"), len(self.num_experts))
            if len(tk["expert"]):
                key = (tk["seq"][:, 0].astype(np.int64) << 32) | tk["pos"][:, 0].astype(np.int64)
                self.pool.add(l, key, tk["expert"])

    def merge(self, other: "SetPoolAccumulator") -> None:
        self.pool.merge(other.pool)

    def result(self) -> SetPool:
        return self.pool


def fit_load_weights(load_E: np.ndarray, top_k: int, rng: np.random.Generator, iters: int = 24,
                     fit_tokens: int = 1 << 13) -> np.ndarray:
    """Log-weights whose Gumbel-top-k draws (k distinct experts, without replacement) include every
    expert at the rate `load_E` gives it (its share of choices x k): the router whose only structure is
    its load. A damped fixed-point iteration on simulated inclusion rates."""
    load = np.asarray(load_E, np.float64)
    target = np.log(np.maximum(load / max(load.sum(), 1e-300) * top_k, 1e-12))
    logw = target.copy()
    for _ in range(iters if top_k > 1 else 0):
        incl = np.bincount(draw_sets(logw, top_k, fit_tokens, rng).reshape(-1), minlength=len(load)) / fit_tokens
        logw += 0.5 * (target - np.log(np.maximum(incl, 0.5 / fit_tokens)))
    return logw


def draw_sets(logw_E: np.ndarray, top_k: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """n x k distinct experts per token, drawn without replacement in proportion to exp(logw): the k
    smallest of Exp(1) / w_e, an exponential race. It is the Gumbel-top-k draw (-log Exp(1) is a Gumbel)
    without the two logarithms per entry, which made the co-activation null the slowest part of the
    finalisation. In float32 (twice as fast to draw and to partition): a tie between two experts' times,
    about one token in 10^4 at E = 64, is broken by position instead of by chance."""
    # Divided by the largest weight: a common scale leaves the race as it is and keeps float32 in range.
    # An expert of weight ~0 is as good as last (its time x 1e30) without overflowing float32
    # (exponential times stay below ~1e2).
    inv_w = np.minimum(np.exp(-(np.asarray(logw_E, np.float64) - np.max(logw_E))), 1e30)
    inv_w = inv_w.astype(np.float32)
    out = np.empty((n, top_k), np.int64)
    for start in range(0, n, 1 << 16):
        m = min(n, start + (1 << 16)) - start
        race = rng.standard_exponential(size=(m, len(inv_w)), dtype=np.float32) * inv_w
        out[start:start + m] = smallest_k(race, top_k)
    return out


def smallest_k(values_NE: np.ndarray, k: int) -> np.ndarray:
    """Each row's k smallest entries' columns, in column order: the set np.argpartition(values, k-1)[:, :k]
    gives, row for row (rows with a tie at the k-th value go to argpartition itself). The k-th value by
    np.partition and a mask is 2x faster than argpartition at top-8 of 64."""
    N, E = values_NE.shape
    if k >= E or N == 0:
        return np.argpartition(values_NE, k - 1, axis=1)[:, :k] if k < E else np.tile(np.arange(E), (N, 1))
    kth_N1 = np.partition(values_NE, k - 1, axis=1)[:, k - 1:k]
    mask_NE = values_NE <= kth_N1  # at least k a row: exactly k where no tie sits at the k-th value
    if np.count_nonzero(mask_NE) == N * k:
        return np.nonzero(mask_NE)[1].reshape(N, k)
    tied = np.flatnonzero(mask_NE.sum(axis=1) != k)
    mask_NE[tied] = False
    out = np.empty((N, k), np.int64)
    clean = np.ones(N, bool)
    clean[tied] = False
    out[clean] = np.nonzero(mask_NE)[1].reshape(-1, k)
    out[tied] = np.argpartition(values_NE[tied], k - 1, axis=1)[:, :k]
    return out


def estimate_from_moments(value: float, boot_R: np.ndarray | None, null_mean: float, null_sd: float, *,
                          alternative: str = "greater", null: str = "", interval: str = "") -> Estimate:
    """An estimate whose null is known in closed form (mean, sd); p from the normal approximation."""
    from math import erfc, sqrt

    out = estimate(value, boot_R, None, alternative=alternative, null=null, interval=interval)
    out.null_mean, out.null_sd = float(null_mean), float(null_sd)
    if value == value and null_mean == null_mean and null_sd > 0:
        out.z = float((value - null_mean) / null_sd)
        out.p = 0.5 * erfc((out.z if alternative == "greater" else -out.z) / sqrt(2))
    return out
