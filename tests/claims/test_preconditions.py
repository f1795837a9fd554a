"""The 'not testable here' state: planted learning curves with a known regime, checked against scipy."""

import numpy as np
import pytest
from scipy.stats import linregress

from moelab.claims.preconditions import beyond_null, gap_settled, late_slope, settled, snapshot_near_final
from moelab.claims.record import ClaimResult
from moelab.claims.verdict import Claim, Measure

STEPS = np.arange(10, 410, 10.0)


def _curve(rng, floor, scale, tau, noise=0.01):
    return np.column_stack([STEPS, floor + scale * np.exp(-STEPS / tau) + noise * rng.standard_normal(len(STEPS))])


def test_late_slope_matches_linregress_and_finds_nothing_in_a_flat_curve():
    rng = np.random.default_rng(0)
    flat = np.column_stack([STEPS, 4.0 + 0.01 * rng.standard_normal(len(STEPS))])
    slope, lo, hi = late_slope(flat)
    ref = linregress(flat[STEPS >= 330, 0] / 1000, flat[STEPS >= 330, 1])
    assert slope == pytest.approx(ref.slope) and hi - slope == pytest.approx(ref.stderr * 2.446912, rel=1e-5)  # 8 points, t(6)
    assert lo <= 0 <= hi
    assert np.isnan(late_slope(flat[:2])[0])


EVERY = np.arange(1, 401, 1.0)  # the claims runs log the training loss at every step


def _noisy(rng, floor, scale, tau, noise=0.02, steps=EVERY):
    return np.column_stack([steps, floor + scale * np.exp(-steps / tau) + noise * rng.standard_normal(len(steps))])


def test_planted_under_trained_pair_is_not_testable():
    rng = np.random.default_rng(1)
    # The GRU model learns slower: its deficit is still shrinking at the last step (the audit's RMoE case).
    slow = [_noisy(rng, 4.4, 3.0, 400) for _ in range(3)]
    fast = [_noisy(rng, 4.4, 3.0, 60) for _ in range(3)]
    pre = gap_settled(slow, fast, 0.02)
    assert not pre.met and "moved -" in pre.measured and "tolerance 0.0200" in pre.measured
    # The same pair after both have converged (taus far below the run): the gap is flat.
    done_a = [_noisy(rng, 4.4, 3.0, 30) for _ in range(3)]
    done_b = [_noisy(rng, 4.5, 3.0, 20) for _ in range(3)]
    assert gap_settled(done_a, done_b, 0.02).met
    # Flat but logged every 10 steps with per-step noise: 9 points in the window cannot show it stopped.
    sparse = [c[9::10] for c in done_a], [c[9::10] for c in done_b]
    assert not gap_settled(*sparse, 0.02).met
    r = ClaimResult(row="planted", paper="RMoE", claim="c", paper_number="p", measured="m",
                    measure=Measure(-0.2, -0.3, -0.1, 0.0), test=Claim("greater", 0.02), setup="s", seeds=3,
                    seed_values=[-0.25, -0.2, -0.15], precondition=pre)
    assert r.verdict == "not testable here" and pre.measured in r.reason
    assert ClaimResult(**{**r.__dict__, "precondition": gap_settled(done_a, done_b, 0.02), "verdict": "",
                          "reason": ""}).verdict == "not reproduced"


def test_settled_by_hand_and_its_size_and_power_in_simulation():
    """The equivalence test: the 90% slope interval times the window inside the tolerance. By hand on a
    noiseless line; then simulated, a curve moving exactly the tolerance over the window passes at most 5%
    of the time (the test's size), a moving one (the audit's 1 nat per 1000 steps) never, and a flat one
    logged every step nearly always; a flat one whose noise is too large for the tolerance fails (it cannot
    be shown to have stopped)."""
    line = np.column_stack([EVERY, 2.0 - EVERY / 1000])  # falls 0.08 over steps 320.2-400
    pre = settled(line, "x", 0.1)
    assert pre.met and "moved -0.0798 nats over steps 320-400" in pre.measured  # window 79.8 steps, exact slope
    assert not settled(line, "x", 0.07).met
    rng = np.random.default_rng(7)
    tol, sims = 0.02, 2000
    window = 0.2 * (EVERY[-1] - EVERY[0]) / 1000
    passed = {"boundary": 0, "moving": 0, "flat": 0, "too noisy": 0}
    for _ in range(sims):
        noise = 0.01 * rng.standard_normal(len(EVERY))
        for name, slope, scale in (("boundary", tol / window, 1), ("moving", 1.0, 1), ("flat", 0.0, 1),
                                   ("too noisy", 0.0, 5)):
            curve = np.column_stack([EVERY, 3.0 + slope * EVERY / 1000 + scale * noise])
            passed[name] += settled(curve, "x", tol).met
    assert passed["boundary"] / sims <= 0.06 and passed["moving"] == 0, passed
    assert passed["flat"] / sims >= 0.95 and passed["too noisy"] / sims <= 0.2, passed


def test_snapshot_and_null_preconditions_with_hand_numbers():
    # The audit's numbers: 5.93 at step 80 against 4.41 at the end, from 8.3 at the start: 61% of the drop.
    pre = snapshot_near_final(5.93, 4.41, 8.3)
    assert not pre.met and "61% of the drop" in pre.measured
    assert snapshot_near_final(4.5, 4.41, 8.3).met
    assert beyond_null(Measure(0.3, 0.25, 0.35, 0.2), "routing").met
    assert not beyond_null(Measure(0.21, 0.19, 0.23, 0.2), "routing").met


def test_dense_reference_regime_by_the_same_rule():
    """closer-dense-reference's precondition: the upcycled MoE's mean training curve settled (the rule of the
    loss rows, on one curve) and enough layers; a curve still falling, or too few layers, is unmet."""
    from moelab.claims.rows_denseref import MIN_LAYERS, converged

    rng = np.random.default_rng(3)
    falling = [_noisy(rng, 4.4, 3.0, 400) for _ in range(3)]
    done = [_noisy(rng, 4.4, 3.0, 30) for _ in range(3)]
    mean = np.column_stack([EVERY, np.mean([c[:, 1] for c in falling], axis=0)])
    final = mean[EVERY > 360, 1].mean()  # the last 10% of steps
    ref = settled(mean, "the upcycled MoE's training loss (mean over seeds)", 0.01 * final)
    pre = converged(falling, 8)
    assert not pre.met and pre.measured == f"8 MoE layers; {ref.measured}" and f"tolerance {0.01 * final:.4f}" in ref.measured
    assert converged(done, 8).met and not converged(done, MIN_LAYERS - 1).met
    assert converged(done, 8).needs.startswith(f">= {MIN_LAYERS} MoE layers and the upcycled MoE's training loss")


def test_every_row_declares_its_regime_or_says_why_it_needs_none():
    from moelab.claims.preconditions import DECLARED, NONE_NEEDED
    from moelab.claims.registry import all_rows

    rows = set(all_rows())
    assert not set(DECLARED) & set(NONE_NEEDED)
    assert set(DECLARED) | set(NONE_NEEDED) == rows, rows ^ (set(DECLARED) | set(NONE_NEEDED))


def test_upcycle_regime_is_the_scratch_models_specialisation_beyond_its_null():
    from moelab.claims.rows_upcycle import scratch_specialises

    def seed(value, null):
        return {"vocab_specialisation": {"scratch": {"value": value, "null_mean": null}}}

    learned = scratch_specialises([seed(0.5, 0.2), seed(0.51, 0.21), seed(0.49, 0.19)])  # paired: 0.5 each
    assert learned.met and "0.5 [0.5, 0.5] against null 0.2" in learned.measured
    nothing = scratch_specialises([seed(0.2, 0.2), seed(0.25, 0.25), seed(0.15, 0.15)])  # each at its own null
    assert not nothing.met
