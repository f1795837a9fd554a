"""Statistics the rows compute themselves (the analyses give the rest): the gap between two excesses over
their nulls, and rank correlations between observational and causal expert scores pooled over layers and
seeds with a two-level bootstrap. Pure functions on arrays; each has a planted-input test."""

from __future__ import annotations

import math

import numpy as np

from moelab.claims.verdict import Measure

Z95 = 1.959963984540054


def excess_gap(a: Measure, b: Measure, scale: float = 1.0) -> Measure:
    """(a - a's null) - (b - b's null), divided by `scale`; null 0.

    The two estimates come from separate bootstraps, so the interval combines their distances in quadrature
    (each side from the side of each interval that moves the gap that way), plus the nulls' own spread;
    treating them as independent is conservative when, as here, they share sequences and move together."""
    value = (a.value - a.null) - (b.value - b.null)
    null_var = sum((Z95 * m.null_sd) ** 2 for m in (a, b) if m.null_sd is not None and math.isfinite(m.null_sd))
    down = math.sqrt((a.value - a.ci_low) ** 2 + (b.ci_high - b.value) ** 2 + null_var)
    up = math.sqrt((a.ci_high - a.value) ** 2 + (b.value - b.ci_low) ** 2 + null_var)
    return Measure(value / scale, (value - down) / scale, (value + up) / scale, 0.0)


def spearman_rows(x_AE: np.ndarray, y_AE: np.ndarray) -> np.ndarray:
    """Spearman's rho between matching rows (average ranks for ties; NaN for a constant row)."""
    from scipy.stats import rankdata

    rx, ry = rankdata(x_AE, axis=-1), rankdata(y_AE, axis=-1)
    rx = rx - rx.mean(-1, keepdims=True)
    ry = ry - ry.mean(-1, keepdims=True)
    den = np.sqrt((rx**2).sum(-1) * (ry**2).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (rx * ry).sum(-1) / np.where(den > 0, den, 1), np.nan)


def pooled_rho(score_num_NSLE: np.ndarray, score_den_NSLE: np.ndarray | None, effect_sum_NSLE: np.ndarray,
               effect_cnt_NSLE: np.ndarray, n_boot: int = 1000,
               seed: int = 0) -> tuple[float, float, float, np.ndarray]:
    """Mean over seeds N and layers L of Spearman(score, causal effect) over a layer's E experts.

    Inputs are per-sequence (S) sums, so that a redraw of sequences recomputes both sides: the score is
    sum(num) / sum(den) over sequences (den None: sum(num), e.g. a frequency), the effect sum / count of
    the loss change. Interval: percentiles of a two-level bootstrap that redraws seeds, then sequences
    (one draw of sequences for all seeds: they read the same held-out text). Returns (value, lo, hi,
    per-(seed, layer) rho at the point estimate)."""
    N, S = score_num_NSLE.shape[:2]

    def rho_NL(seeds: np.ndarray, seqs: np.ndarray) -> np.ndarray:
        def total(a: np.ndarray) -> np.ndarray:
            return a[seeds][:, seqs].sum(1)

        score = total(score_num_NSLE)
        if score_den_NSLE is not None:
            score = score / np.maximum(total(score_den_NSLE), 1e-12)
        return spearman_rows(score, total(effect_sum_NSLE) / np.maximum(total(effect_cnt_NSLE), 1))

    point_NL = rho_NL(np.arange(N), np.arange(S))
    rng = np.random.default_rng(seed)
    boot = np.array([np.nanmean(rho_NL(rng.integers(0, N, N), rng.integers(0, S, S))) for _ in range(n_boot)])
    boot = boot[np.isfinite(boot)]
    lo, hi = np.percentile(boot, [2.5, 97.5]) if len(boot) else (np.nan, np.nan)
    return float(np.nanmean(point_NL)), float(lo), float(hi), point_NL
