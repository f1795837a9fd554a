import dataclasses

import pytest

from moelab.claims.verdict import (INCONCLUSIVE, NOT_REPRODUCED, NOT_TESTABLE, REPRODUCED, TOO_FEW_SEEDS, Claim,
                                   Measure, Precondition, decide, verdict)


@pytest.mark.parametrize("lo, value, hi, direction, margin, want", [
    (0.2, 0.3, 0.4, "greater", 0.1, REPRODUCED),       # whole interval above, value clears the margin
    (0.02, 0.05, 0.08, "greater", 0.1, NOT_REPRODUCED),  # above the null but within the margin
    (-0.3, -0.2, -0.1, "greater", 0.0, NOT_REPRODUCED),  # wrong side
    (-0.05, 0.1, 0.25, "greater", 0.1, INCONCLUSIVE),    # holds 0 and the margin
    (0.01, 0.08, 0.2, "greater", 0.1, INCONCLUSIVE),     # above 0, value short of the margin, reaches it
    (-0.4, -0.3, -0.2, "less", 0.1, REPRODUCED),         # "less": mirror image
    (-0.05, 0.0, 0.05, "less", 0.1, NOT_REPRODUCED),     # equivalence: rules out an effect of 0.1
])
def test_verdict_hand_cases(lo, value, hi, direction, margin, want):
    assert verdict(Measure(value, lo, hi, 0.0), Claim(direction, margin))[0] == want


def test_null_shifts_the_decision():
    m = Measure(0.5, 0.45, 0.55, null=0.48)
    assert verdict(m, Claim("greater"))[0] == INCONCLUSIVE
    assert verdict(Measure(0.5, 0.45, 0.55, null=0.3), Claim("greater", 0.1))[0] == REPRODUCED


def test_nan_is_inconclusive_and_bad_claims_refused():
    assert verdict(Measure(float("nan"), 0.0, 1.0, 0.0), Claim("greater"))[0] == INCONCLUSIVE
    with pytest.raises(ValueError):
        Claim("bigger")
    with pytest.raises(ValueError):
        Claim("greater", -0.1)


def test_decide_seeds_then_precondition_then_interval():
    m, c = Measure(0.3, 0.2, 0.4, 0.0), Claim("greater", 0.1)
    assert decide(m, c, 2)[0] == TOO_FEW_SEEDS and decide(m, c, 0)[0] == TOO_FEW_SEEDS
    assert decide(m, c, 3) == verdict(m, c)
    unmet = Precondition("loss within 0.1 nats of the final", "5.93 vs 4.41 (1.52 away)", False)
    v, reason = decide(m, c, 3, unmet)
    assert v == NOT_TESTABLE and "5.93 vs 4.41" in reason
    assert decide(m, c, 3, dataclasses.replace(unmet, met=True))[0] == REPRODUCED
