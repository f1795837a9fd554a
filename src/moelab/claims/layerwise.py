"""Statistics the RMoE and Closer Look rows need per held-out sequence, so that seeds and sequences can be
redrawn together (`two_level_bootstrap`), and the nulls that keep expert load.

Pure functions over arrays read from traces or weights. Legend: L MoE layers, T tokens, E experts,
P expert pairs (E(E-1)/2), N seeds, S sequences.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from scipy.stats import spearmanr

from moelab.analysis.dynamic import angular_similarity
from moelab.analysis.gates import bin_gates, binned_mi_T, token_pairs
from moelab.analysis.weights import r_squared, upper


def per_sequence(values_T: np.ndarray, seq_T: np.ndarray, seqs_S: np.ndarray) -> np.ndarray:
    """Sum of a per-token value within each sequence of `seqs_S` (sequence ids, sorted)."""
    idx = np.searchsorted(seqs_S, seq_T)
    return np.bincount(idx, weights=values_T, minlength=len(seqs_S))


def cross_layer_excess_T(probs_LTE: np.ndarray, rng: np.random.Generator, bins: int = 100) -> np.ndarray:
    """Per token: RMoE's binned MI between its gate vectors at layers i < j, minus the same MI with layer j
    taken from another token (the analyses' load-keeping null), averaged over the pairs of layers."""
    binned = [bin_gates(p, bins) for p in probs_LTE]
    L, T = len(binned), len(binned[0])
    out_T = np.zeros(T)
    for i in range(L):
        for j in range(i + 1, L):
            a, b = token_pairs(T, T, rng)
            null_T = np.empty(T)
            null_T[a] = binned_mi_T(binned[i][a], binned[j][b], bins)
            out_T += binned_mi_T(binned[i], binned[j], bins) - null_T
    return out_T / max(L * (L - 1) // 2, 1)


def top1_largest_norm(probs_LTE: np.ndarray, norms_LTE: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(same_LT, null_L): whether each token's top-1 expert has the largest output norm, and per layer the
    share expected if the top-1 choice were shuffled across tokens (each expert's top-1 load kept):
    sum_e P(top-1 = e) P(largest norm = e). It is 1/E only when one of the two is uniform over experts."""
    top_LT, big_LT = probs_LTE.argmax(axis=2), norms_LTE.argmax(axis=2)
    E = probs_LTE.shape[2]
    null_L = np.array([(np.bincount(t, minlength=E) / len(t)) @ (np.bincount(n, minlength=E) / len(n))
                       for t, n in zip(top_LT, big_LT)])
    return top_LT == big_LT, null_L


def diversity_LT(cos_LTP: np.ndarray) -> np.ndarray:
    """Per (layer, token): 1 - mean angular similarity of the experts' outputs over expert pairs."""
    return 1.0 - angular_similarity(cos_LTP).astype(np.float64).mean(axis=2)


def depth_trend(div_L: np.ndarray) -> float:
    """Spearman correlation of diversity with depth over all layers but the last (the paper's exception)."""
    d = np.asarray(div_L[:-1], np.float64)
    if len(d) < 3 or np.ptp(d) == 0:
        return float("nan")
    return float(spearmanr(np.arange(len(d)), d).statistic)


def bootstrap_stat(sums_NLS: np.ndarray, counts_S: np.ndarray, stat: Callable[[np.ndarray], float],
                   n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """stat(per-layer means) with a percentile interval that redraws seeds and sequences with replacement
    (the two-level bootstrap of `heldout`, for a statistic that is not a mean)."""
    sums_NLS = np.asarray(sums_NLS, np.float64)
    N, L, S = sums_NLS.shape
    value = stat(sums_NLS.sum(axis=(0, 2)) / (N * counts_S.sum()))
    rng = np.random.default_rng(seed)
    boot = np.empty(n_boot)
    for b in range(n_boot):
        rows, cols = rng.integers(0, N, N), rng.integers(0, S, S)
        boot[b] = stat(sums_NLS[rows][:, :, cols].sum(axis=(0, 2)) / (N * counts_S[cols].sum()))
    tail = (1 - level) / 2 * 100
    lo, hi = np.nanpercentile(boot, [tail, 100 - tail])
    return value, float(lo), float(hi)


def mantel_r2(a_EE: np.ndarray, b_EE: np.ndarray, rng: np.random.Generator,
              n_perm: int = 200) -> tuple[float, float, float]:
    """(R^2, null mean, null sd) of b's pairwise entries on a's, the null relabelling a's experts (a
    Mantel permutation): it keeps each matrix's own structure and breaks only which expert is which."""
    r2 = r_squared(upper(a_EE), upper(b_EE))
    E = len(a_EE)
    null = np.empty(n_perm)
    for k in range(n_perm):
        p = rng.permutation(E)
        null[k] = r_squared(upper(a_EE[np.ix_(p, p)]), upper(b_EE))
    return r2, float(null.mean()), float(null.std())
