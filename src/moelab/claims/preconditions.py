"""The regime a claim is about, measured: a row whose models never reached it says "not testable here".

A claim about trained models (one router beats another, routing is settled early relative to the end)
is a claim about runs near convergence; a few hundred steps of a tiny model may not be there. Each check
is a pure function of a learning curve or a measure, returning a `Precondition` with its numbers.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from moelab.claims.verdict import Measure, Precondition

# Rows that measure a precondition, and what it is; a stored result without one predates the check.
DECLARED = {
    "rmoe-beats-linear": "the training-loss gap settled (last-20% slope interval holding 0)",
    "rmoe-np-ablation": "the training-loss gap settled (last-20% slope interval holding 0)",
    "rmoe-detach-ablation": "the training-loss gap settled (last-20% slope interval holding 0)",
    "openmoe-early-routing": "the snapshot's training loss has made >= 90% of the run's drop",
    "openmoe-drop-towards-end": "sequences of >= 2048 tokens (the paper's rise starts near position 750)",
    "intervene-one-expert-suffices": "the loss cost of removing every routed expert (shared kept) beyond its null",
    "openmoe-chat-vs-pretraining-drops": "sequences of >= 2048 tokens (the paper's rise starts near position 750)",
    "rmoe-depth-scan": "the training-loss gap settled at every depth (last-20% slope interval holding 0)",
    "olmoe-layer-specialisation": ">= 4 MoE layers and vocabulary specialisation beyond its null",
    "closer-dense-reference": ">= 4 MoE layers and the upcycled MoE's training loss settled (last-20% slope interval holding 0)",
    "olmoe-coactivation": "vocabulary specialisation beyond its null (a router that learned nothing passes trivially)",
}


def unmeasured(row: str) -> Precondition | None:
    """For a stored result of a row that declares a precondition but carries none (it predates the check):
    unmet, since a verdict without the regime check is what the check exists to prevent."""
    if row not in DECLARED:
        return None
    return Precondition(DECLARED[row], "nothing: the stored result predates the check (a rerun measures it)", False)


def late_slope(curve_T2: np.ndarray, frac: float = 0.2, level: float = 0.95) -> tuple[float, float, float]:
    """(slope, low, high) of a (step, value) curve over its last `frac` of steps, per 1000 steps: least
    squares with a t-interval on the slope. Fewer than 3 points in the window: NaNs."""
    from scipy.stats import t as student_t

    curve_T2 = np.asarray(curve_T2, np.float64)
    if curve_T2.ndim != 2 or len(curve_T2) == 0:
        return float("nan"), float("nan"), float("nan")
    last = curve_T2[:, 0].max()
    win = curve_T2[curve_T2[:, 0] >= last - frac * (last - curve_T2[:, 0].min())]
    n = len(win)
    if n < 3:
        return float("nan"), float("nan"), float("nan")
    x, y = win[:, 0] / 1000.0, win[:, 1]
    sxx = ((x - x.mean()) ** 2).sum()
    slope = float(((x - x.mean()) * (y - y.mean())).sum() / sxx)
    resid = y - y.mean() - slope * (x - x.mean())
    se = math.sqrt((resid ** 2).sum() / (n - 2) / sxx)
    half = float(student_t.ppf(0.5 + level / 2, n - 2) * se)
    return slope, slope - half, slope + half


def _common_steps(curves: Sequence[np.ndarray]) -> np.ndarray:
    return np.array(sorted(set.intersection(*[set(c[:, 0]) for c in curves])), np.float64)


def _values(curve_T2: np.ndarray, steps: np.ndarray) -> np.ndarray:
    at = dict(map(tuple, curve_T2))
    return np.array([at[s] for s in steps], np.float64)


def mean_curve(curves: Sequence[np.ndarray]) -> np.ndarray:
    """(step, mean value over the curves) on the steps every curve logged."""
    steps = _common_steps(curves)
    return np.column_stack([steps, np.mean([_values(c, steps) for c in curves], axis=0)])


def settled(curve_T2: np.ndarray, what: str, frac: float = 0.2) -> Precondition:
    """`what`, a (step, value) curve, has a slope over the last `frac` of its steps whose 95% interval
    holds 0: it is not still moving. One rule for every row that asks for a settled run."""
    slope, lo, hi = late_slope(curve_T2, frac)
    steps = curve_T2[:, 0]
    return Precondition(
        needs=f"{what} that has stopped moving (slope over the last {frac:.0%} of steps with a 95% interval "
              "holding 0)",
        measured=(f"slope {slope:+.3f} nats per 1000 steps [{lo:+.3f}, {hi:+.3f}] over steps >= "
                  f"{steps[-1] - frac * (steps[-1] - steps[0]):.0f}" if math.isfinite(slope)
                  else "too few logged steps to fit a slope"),
        met=bool(math.isfinite(lo) and lo <= 0 <= hi))


def gap_settled(worse: Sequence[np.ndarray], better: Sequence[np.ndarray], frac: float = 0.2) -> Precondition:
    """The compared models' training-loss gap (worse minus better, per step, mean over seeds) has a slope
    over the last `frac` of training whose interval holds 0: the comparison is not still moving."""
    steps = _common_steps([*worse, *better])
    gap = np.mean([_values(w, steps) - _values(b, steps) for w, b in zip(worse, better)], axis=0)
    return settled(np.column_stack([steps, gap]), "a training-loss gap", frac)


def snapshot_near_final(snap_loss: float, final_loss: float, first_loss: float, share: float = 0.9) -> Precondition:
    """The snapshot's training loss has made at least `share` of the run's whole drop (first to final): the
    regime of a checkpoint at 20% of a long run, whose loss curve is flat by then."""
    drop = first_loss - final_loss
    made = (first_loss - snap_loss) / drop if drop > 0 else float("nan")
    return Precondition(
        needs=f"a snapshot whose training loss has made >= {share:.0%} of the run's drop",
        measured=f"loss {snap_loss:.3f} at the snapshot vs {final_loss:.3f} at the end (from {first_loss:.3f}): "
                 f"{made:.0%} of the drop" if math.isfinite(made) else "no drop in training loss",
        met=bool(math.isfinite(made) and made >= share))


def beyond_null(m: Measure, what: str) -> Precondition:
    """`what` (e.g. the final routing's specialisation) lies above its null: there is something to compare."""
    return Precondition(needs=f"{what} beyond its null", measured=f"{m.value:.3g} [{m.ci_low:.3g}, {m.ci_high:.3g}] "
                        f"against null {m.null:.3g}", met=bool(m.ci_low > m.null))


def loss_near(curve_T2: np.ndarray, step: float, width: float) -> float:
    """Mean training loss over the `width` steps up to `step` (one step's loss is noisy)."""
    sel = (curve_T2[:, 0] > step - width) & (curve_T2[:, 0] <= step)
    return float(curve_T2[sel, 1].mean()) if sel.any() else float("nan")


def snapshot_regime(curve_T2: np.ndarray, step: int, total: int) -> Precondition:
    """`snapshot_near_final` on a run's logged training loss: first logged, around the snapshot, at the end."""
    width = max(total / 10, 1)
    return snapshot_near_final(loss_near(curve_T2, step, width), loss_near(curve_T2, total, width),
                               float(curve_T2[0, 1]))
