"""Intervals and tests for per-token effects: pure numpy (scipy's ranks), sequences as the unit of resampling.

Tokens of one sequence are not independent (they share a context), so every interval resamples whole
sequences and every test flips the sign of whole sequences' mean effects.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata


def seq_totals(seq_N: np.ndarray, values_N: np.ndarray, num_seqs: int) -> tuple[np.ndarray, np.ndarray]:
    """Per sequence: sum of values, number of tokens (sequences are 0..num_seqs-1)."""
    sums_S = np.bincount(seq_N, weights=values_N.astype(np.float64), minlength=num_seqs)
    counts_S = np.bincount(seq_N, minlength=num_seqs).astype(np.float64)
    return sums_S, counts_S


def bootstrap_mean(sums_S: np.ndarray, counts_S: np.ndarray, n_boot: int = 1000, seed: int = 0,
                   level: float = 0.95) -> tuple[float, float, float]:
    """Token mean (sum / count) and its percentile interval over sequences drawn with replacement.
    Sequences without tokens are left out, so a domain's interval comes from the sequences holding it."""
    has_S = counts_S > 0
    sums_S, counts_S = sums_S[has_S], counts_S[has_S]
    if not len(sums_S):
        return float("nan"), float("nan"), float("nan")
    mean = float(sums_S.sum() / counts_S.sum())
    rng = np.random.default_rng(seed)
    draws_BS = rng.integers(0, len(sums_S), size=(n_boot, len(sums_S)))
    boot_B = sums_S[draws_BS].sum(1) / counts_S[draws_BS].sum(1)
    tail = (1.0 - level) / 2 * 100
    lo, hi = np.percentile(boot_B, [tail, 100 - tail])
    return mean, float(lo), float(hi)


def flips_for_family(num_tests: int, alpha: float = 0.05, floor: int = 2000) -> int:
    """Sign flips enough for Holm over `num_tests`: the smallest Monte-Carlo p is 1/(n+1), so the smallest
    Holm p is num_tests/(n+1); n = 20 * num_tests / alpha puts that floor at alpha/20, well below alpha."""
    return max(floor, int(np.ceil(20 * num_tests / alpha)))


def sign_flip_p(values_S: np.ndarray, n_perm: int = 2000, seed: int = 0) -> float:
    """Two-sided p of 'the per-sequence values sum to zero in expectation': under that null each sequence's
    value is as likely to carry either sign, so the observed |sum| is compared with sign-flipped ones. Pass
    per-sequence sums of token effects to test the token-weighted mean (the mean the bootstrap intervals
    are for: the token count is fixed under flips). With 2^S <= n_perm every sign pattern is enumerated and
    p is exact; otherwise n_perm random patterns, p = (hits + 1) / (n_perm + 1). All zeros: p = 1.
    Non-finite values are left out."""
    values_S = np.asarray(values_S, np.float64)
    return float(sign_flip_p_many(values_S[np.isfinite(values_S)][:, None], n_perm, seed)[0])


def sign_flip_p_many(values_SM: np.ndarray, n_perm: int = 2000, seed: int = 0) -> np.ndarray:
    """sign_flip_p of every column, all columns against one stream of sign patterns: the patterns a column
    alone would draw with this seed (they depend on S only), so M targets cost one set of flips, not M (an
    ablation of all 1,024 experts of OLMoE drew 409,600 flips per target: 46 minutes). A column holding a
    non-finite value is tested alone, without it."""
    V_SM = np.asarray(values_SM, np.float64)
    S, M = V_SM.shape
    p_M = np.ones(M)
    finite_M = np.isfinite(V_SM).all(0)
    for m in np.flatnonzero(~finite_M):
        p_M[m] = sign_flip_p(V_SM[:, m], n_perm, seed)
    live = np.flatnonzero(finite_M & np.any(V_SM != 0, axis=0))
    if not live.size:
        return p_M
    V_SM = V_SM[:, live]
    observed_M = np.abs(V_SM.sum(0))
    exact = S <= 30 and 2 ** S <= n_perm
    total = 2 ** S if exact else n_perm
    rng = np.random.default_rng(seed)
    hits_M = np.zeros(len(live), np.int64)
    chunk = max(1, 2 ** 22 // S)  # bounded memory for large families of flips (and the draws' order)
    cols = max(1, 2 ** 22 // chunk)
    for start in range(0, total, chunk):
        n = min(chunk, total - start)
        if exact:  # pattern i: bit s of i set = sequence s flipped
            bits_PS = (np.arange(start, start + n)[:, None] >> np.arange(S)[None, :]) & 1
            signs_PS = 1.0 - 2.0 * bits_PS
        else:
            signs_PS = rng.choice(np.array([-1.0, 1.0]), size=(n, S))
        for c in range(0, len(live), cols):
            # An exceedance within rounding of the observed value counts: ties must not make p too small.
            flipped_PC = np.abs(signs_PS @ V_SM[:, c:c + cols])
            hits_M[c:c + cols] += np.sum(flipped_PC >= observed_M[c:c + cols] * (1 - 1e-12), axis=0)
    p_M[live] = hits_M / total if exact else (hits_M + 1) / (n_perm + 1)
    return p_M


def holm(p_M: np.ndarray) -> np.ndarray:
    """Holm's step-down adjusted p-values (family-wise error control over the M tests)."""
    p_M = np.asarray(p_M, dtype=np.float64)
    m = len(p_M)
    order = np.argsort(p_M, kind="stable")
    scaled = (m - np.arange(m)) * p_M[order]
    adjusted_sorted = np.minimum(np.maximum.accumulate(scaled), 1.0)
    out = np.empty(m)
    out[order] = adjusted_sorted
    return out


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Rank correlation; nan when either side is constant (no order to correlate)."""
    ra, rb = rankdata(np.asarray(a, float)), rankdata(np.asarray(b, float))  # ties share their mean rank
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])
