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


def sign_flip_p(means_S: np.ndarray, n_perm: int = 2000, seed: int = 0) -> float:
    """Two-sided p of 'the mean effect is zero': under that null each sequence's mean effect is as likely
    to carry either sign, so the observed |mean| is compared with sign-flipped ones. All zeros: p = 1."""
    means_S = means_S[np.isfinite(means_S)]
    if not len(means_S) or not np.any(means_S):
        return 1.0
    observed = abs(means_S.mean())
    rng = np.random.default_rng(seed)
    signs_PS = rng.choice(np.array([-1.0, 1.0]), size=(n_perm, len(means_S)))
    flipped_P = np.abs((signs_PS * means_S).mean(1))
    # An exceedance within rounding of the observed value counts: ties must not make p too small.
    hits = int(np.sum(flipped_P >= observed * (1 - 1e-12)))
    return (hits + 1) / (n_perm + 1)


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
