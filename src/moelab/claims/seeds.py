"""Intervals over seeds for statistics that the analyses give one bootstrap interval per trace.

A row that measures a statistic on several independently trained models (seeds) has, per seed, a value
and a 95% interval over held-out sequences (from `ws.analyze`'s headline estimates). The interval for the
mean over seeds must hold both the spread between training runs and the sequence noise within each, so
it comes from a two-level bootstrap: redraw the seeds with replacement, then redraw each drawn seed's
value from a normal with the spread its own interval implies ((hi - lo) / (2 * 1.96)). With one seed it
reduces to that seed's interval. The sequence level is parametric because the analyses keep no
per-sequence replicates in metrics.json; the seed level is non-parametric as in `heldout.py`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import numpy as np

Z95 = 1.959963984540054


@dataclasses.dataclass(frozen=True)
class SeedValue:
    """One seed's value and 95% interval (the sequence-level uncertainty)."""

    value: float
    ci_low: float
    ci_high: float

    @property
    def sd(self) -> float:
        """The standard error the interval implies (0 when there is no interval)."""
        width = self.ci_high - self.ci_low
        return width / (2 * Z95) if math.isfinite(width) and width > 0 else 0.0

    @classmethod
    def of(cls, estimate: Mapping[str, Any]) -> "SeedValue":
        """From a metrics.json estimate dict (value, ci_low, ci_high; None read as NaN)."""
        get = lambda k: float("nan") if estimate.get(k) is None else float(estimate[k])  # noqa: E731
        return cls(get("value"), get("ci_low"), get("ci_high"))


def minus(a: SeedValue, b: SeedValue, shift: float = 0.0) -> SeedValue:
    """a - b - shift, with the two intervals' spreads added in quadrature (the models are trained apart;
    sharing the held-out sequences could only correlate them, which would narrow the true interval)."""
    value = a.value - b.value - shift
    sd = math.hypot(a.sd, b.sd)
    return SeedValue(value, value - Z95 * sd, value + Z95 * sd)


def seed_bootstrap(per_seed: Sequence[SeedValue], n_boot: int = 4000, seed: int = 0,
                   level: float = 0.95) -> tuple[float, float, float]:
    """(mean over seeds, interval low, interval high): seeds redrawn, then each value redrawn within its
    own interval. No row decides on it any more: its coverage with 2-5 seeds is far below 95% when seeds
    dominate (tests/claims/test_seed_coverage.py shows it); `t_interval` replaced it. Seeds without a finite value are left out; none left gives NaNs."""
    ok = [s for s in per_seed if math.isfinite(s.value)]
    if not ok:
        return float("nan"), float("nan"), float("nan")
    values_N = np.array([s.value for s in ok])
    sd_N = np.array([s.sd for s in ok])
    rng = np.random.default_rng(seed)
    pick_BN = rng.integers(0, len(ok), (n_boot, len(ok)))
    draws_BN = values_N[pick_BN] + sd_N[pick_BN] * rng.standard_normal(pick_BN.shape)
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(draws_BN.mean(axis=1), [tail, 100 - tail])
    return float(values_N.mean()), float(lo), float(hi)


def t_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): Student's t interval over per-seed values (n - 1 degrees of freedom).

    The seed is the unit that was sampled, so the interval is over seeds alone; the held-out text noise
    within each seed is already in each seed's value's spread. Unlike `seed_bootstrap`'s percentiles,
    whose coverage with 2-5 seeds falls to 55-83% when seeds dominate (tests/claims/test_seed_coverage.py),
    the t quantile widens with few seeds and keeps the nominal coverage for normal seed spreads.
    Fewer than 2 finite values: NaN interval (one training run says nothing about another)."""
    from scipy.stats import t as student_t

    v_N = np.array([float(v) for v in values if v is not None and math.isfinite(float(v))])
    if len(v_N) == 0:
        return float("nan"), float("nan"), float("nan")
    mean = float(v_N.mean())
    if len(v_N) < 2:
        return mean, float("nan"), float("nan")
    half = float(student_t.ppf(0.5 + level / 2, len(v_N) - 1) * v_N.std(ddof=1) / math.sqrt(len(v_N)))
    return mean, mean - half, mean + half


# How a row whose per-seed values come from `null_paired` states its null and interval (after the null).
PAIRED_T = ("mean over seeds; each seed's value paired with its own null (value - null + mean null). 95% interval: "
            "t over seeds (each seed's bootstrap over sequences in details).")


def null_paired(values: Sequence[float], nulls: Sequence[float]) -> tuple[list[float], float]:
    """(each seed's value paired with its own null: value_i - null_i + mean null, the mean null). Each trained
    model has its own load-keeping null; a t-interval over raw values against the mean null counts the
    spread of the nulls as if it were none. The paired values keep the value's units and mean."""
    null = float(np.mean(nulls))
    return [float(v) - float(n) + null for v, n in zip(values, nulls)], null
