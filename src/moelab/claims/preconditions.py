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
    "openmoe-moe-beats-dense": "the training-loss gap settled (moved less than the margin over the last 20%)",
    "rmoe-beats-linear": "the training-loss gap settled (moved less than the margin over the last 20%)",
    "rmoe-np-ablation": "the training-loss gap settled (moved less than the margin over the last 20%)",
    "rmoe-detach-ablation": "the training-loss gap settled (moved less than the margin over the last 20%)",
    "openmoe-early-routing": "the snapshot's training loss has made >= 90% of the run's drop",
    "openmoe-drop-towards-end": "sequences of >= 2048 tokens (the paper's rise starts near position 750)",
    "intervene-one-expert-suffices": "the loss cost of removing every routed expert (shared kept) beyond its null",
    "openmoe-chat-vs-pretraining-drops": "sequences of >= 2048 tokens (the paper's rise starts near position 750)",
    "rmoe-depth-scan": "the training-loss gap settled at every depth (moved less than the margin over the last 20%)",
    "olmoe-layer-specialisation": ">= 4 MoE layers and vocabulary specialisation beyond its null",
    "closer-dense-reference": ">= 4 MoE layers and the upcycled MoE's training loss settled (moved less than 1% over "
                              "the last 20%)",
    "olmoe-coactivation": "vocabulary specialisation beyond its null (a router that learned nothing passes trivially)",
    "upcycle-specialises-less": "the from-scratch MoE's vocabulary specialisation beyond its null",
}

# Rows that declare no precondition, and why none is needed: each row is in DECLARED or here (a test checks).
NONE_NEEDED = {
    "openmoe-context-independent": "the claim compares two specialisations of one trained model, each against its "
                                   "own load-keeping null; a model that learned nothing sits at both nulls and "
                                   "reads 0, short of the margin",
    "olmoe-saturation": "OLMoE measures it at 1% of pretraining, long before the loss settles: the claim is about "
                        "early training itself",
    "olmoe-vocab-specialisation": "a property of the final model against its load-keeping null; no comparison "
                                  "between runs that could still move",
    "olmoe-domain-specialisation": "a property of the final model against its load-keeping null; no comparison "
                                   "between runs that could still move",
    "rmoe-cross-layer-mi": "the paper's statistic compares the binned MI of two routers trained alike at the end of "
                           "training; whether their losses settled is the loss rows' precondition",
    "closer-norm-preference": "a property of the final model (top-1 choice vs largest output norm) against a "
                              "load-keeping null",
    "closer-neurons-fine-grained": "a property of the final weights (router rows vs gate neurons) against a "
                                   "permutation null",
    "closer-diversity-depth": "a trend over the layers of the final model against a random order of the layers",
    "intervene-observational-vs-causal": "a property of the final model: observational scores against the causal "
                                         "effect of removing each expert, on the same tokens",
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


def settled(curve_T2: np.ndarray, what: str, tol: float, frac: float = 0.2, unit: str = " nats") -> Precondition:
    """`what`, a (step, value) curve, has stopped moving: over the last `frac` of its steps it moved by less
    than `tol`. An equivalence test (two one-sided tests at 5%): the 90% t-interval of the late least-squares
    slope, times the window's length, lies inside [-tol, +tol]. A slope interval that merely holds 0 cannot
    show a curve has stopped (few or noisy points pass anything); this one fails when the data cannot tell."""
    slope, lo, hi = late_slope(curve_T2, frac, level=0.90)
    steps = np.asarray(curve_T2, np.float64)[:, 0] if len(curve_T2) else np.zeros(1)
    end = float(steps.max())
    start = end - frac * (end - float(steps.min()))
    win = (end - start) / 1000.0  # late_slope's slope is per 1000 steps
    move, low, high = slope * win, lo * win, hi * win
    return Precondition(
        needs=f"{what} that has stopped moving: over the last {frac:.0%} of steps it moved by less than "
              f"{tol:.4f}{unit} either way (90% interval of the late least-squares slope times the window inside "
              "the tolerance: two one-sided tests at 5%)",
        measured=(f"moved {move:+.4f}{unit} over steps {start:.0f}-{end:.0f}, 90% [{low:+.4f}, {high:+.4f}]; "
                  f"tolerance {tol:.4f}" if math.isfinite(slope) else "too few logged steps to fit a slope"),
        met=bool(math.isfinite(low) and -tol <= low and high <= tol))


def gap_settled(worse: Sequence[np.ndarray], better: Sequence[np.ndarray], tol: float,
                frac: float = 0.2) -> Precondition:
    """The compared models' training-loss gap (worse minus better, per step, mean over seeds) moved by less
    than `tol` nats over the last `frac` of training (`settled`): the comparison is not still moving. The
    rows pass their margin: a gap that can still move by the effect they count is not where it ends."""
    steps = _common_steps([*worse, *better])
    gap = np.mean([_values(w, steps) - _values(b, steps) for w, b in zip(worse, better)], axis=0)
    return settled(np.column_stack([steps, gap]), "a training-loss gap", tol, frac)


# The wording of the rule `settled` replaced (a late-slope interval holding 0), as stored results carry it.
OLD_SETTLED = "interval holding 0"


def superseded(pre: Precondition | None) -> Precondition | None:
    """A stored precondition decided by the older "slope interval holds 0" rule counts as unmet: that rule
    could not show a curve had stopped (simulated, a gap moving 1 nat per 1000 steps passed it 57% of the time
    at the CPU scale). Its numbers are kept; a rerun measures the equivalence test."""
    if pre is None or OLD_SETTLED not in pre.needs:
        return pre
    return Precondition(pre.needs, f"{pre.measured} (decided by the older rule, which a moving curve passes; a "
                        "rerun measures the equivalence test)", False)


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
