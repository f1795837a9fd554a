"""A verdict from an interval and a null, decided the same way for every row.

A claim says the value lies above (or below) a null by at least a margin: the smallest excess that the
paper's statement needs (e.g. "well above", or a loss gain worth reporting). With the 95% interval [lo, hi]:

- reproduced: the interval lies beyond the null in the claimed direction and the value's excess over
  the null reaches the margin;
- not reproduced: the interval excludes an effect of the margin's size (for "greater", hi - null < margin;
  this includes an interval on the wrong side of the null);
- inconclusive: neither: the interval holds the null and effects of the margin's size, or it excludes
  the null while the value falls short of the margin and the interval still reaches it.

An interval that excludes the null but stays below the margin is "not reproduced": the effect exists
but is smaller than what the claim needs; the reason says so.

Two states come before the interval is read (`decide`):

- too few seeds: the claim is about trained models, and fewer than MIN_SEEDS of them were trained. One
  run's interval covers held-out text, not training runs, and a t-interval over 2 seeds is too wide to
  rule anything out (t at 1 degree of freedom is 12.7), so neither verdict is signed;
- not testable here: the row's declared precondition (the regime the claim is about: a converged run,
  routing beyond its null, ...) was measured and is unmet; the reason gives the numbers.
"""

from __future__ import annotations

import dataclasses
import math

REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE = "reproduced", "not reproduced", "inconclusive"
TOO_FEW_SEEDS, NOT_TESTABLE = "too few seeds", "not testable here"
VERDICTS = (REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE, TOO_FEW_SEEDS, NOT_TESTABLE)
MIN_SEEDS = 3


@dataclasses.dataclass(frozen=True)
class Measure:
    """value [ci_low, ci_high] against `null` (null_sd: its spread where the null is drawn)."""

    value: float
    ci_low: float
    ci_high: float
    null: float
    null_sd: float | None = None

    def __post_init__(self) -> None:
        for name in ("value", "ci_low", "ci_high", "null"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                raise TypeError(f"Measure.{name} must be a number, not {v!r}")


@dataclasses.dataclass(frozen=True)
class Claim:
    direction: str  # "greater": value above the null; "less": below it
    margin: float = 0.0  # smallest excess over the null that the claim needs (>= 0, in the value's units)

    def __post_init__(self) -> None:
        if self.direction not in ("greater", "less"):
            raise ValueError(f"direction must be 'greater' or 'less', not {self.direction!r}")
        if not self.margin >= 0:
            raise ValueError(f"margin must be >= 0, not {self.margin!r}")


def verdict(m: Measure, claim: Claim) -> tuple[str, str]:
    """(verdict, reason) for a measure against a claim; a missing number is inconclusive."""
    if not all(math.isfinite(v) for v in (m.value, m.ci_low, m.ci_high, m.null)):
        return INCONCLUSIVE, "no finite value, interval or null to decide on"
    sign = 1.0 if claim.direction == "greater" else -1.0
    # Excess over the null in the claimed direction: near = the interval end closest to "no effect".
    near, far = sorted((sign * (m.ci_low - m.null), sign * (m.ci_high - m.null)))
    side = "above" if claim.direction == "greater" else "below"
    if far < claim.margin:
        if far <= 0:
            return NOT_REPRODUCED, f"the interval is not {side} the null"
        if near > 0:
            return NOT_REPRODUCED, (f"{side} the null, but the whole interval is within the margin "
                                    f"{claim.margin:g} that the claim needs")
        return NOT_REPRODUCED, f"the interval excludes an effect of the margin {claim.margin:g}"
    if near > 0 and sign * (m.value - m.null) >= claim.margin:
        return REPRODUCED, f"the whole interval is {side} the null and the value clears the margin {claim.margin:g}"
    if near > 0:
        return INCONCLUSIVE, f"{side} the null, but the value falls short of the margin {claim.margin:g}"
    return INCONCLUSIVE, "the interval holds both the null and an effect of the margin's size"


@dataclasses.dataclass(frozen=True)
class Precondition:
    """The regime a claim needs, stated before measuring (`needs`), and what the run shows (`measured`)."""

    needs: str
    measured: str
    met: bool


def decide(m: Measure, claim: Claim, n_seeds: int, precondition: Precondition | None = None) -> tuple[str, str]:
    """The verdict of a row over `n_seeds` trained models: too few seeds, then an unmet precondition, then
    `verdict` on the interval."""
    if n_seeds == 0:
        return TOO_FEW_SEEDS, "no per-seed values stored to put an interval over"
    if n_seeds < MIN_SEEDS:
        return TOO_FEW_SEEDS, (f"{n_seeds} trained model{'s' if n_seeds != 1 else ''} (seed{'s' if n_seeds != 1 else ''}); "
                               f"a claim about trained models needs an interval over at least {MIN_SEEDS}")
    if precondition is not None and not precondition.met:
        return NOT_TESTABLE, f"needs {precondition.needs}; measured {precondition.measured}"
    return verdict(m, claim)
