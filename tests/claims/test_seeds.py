"""The seed-level interval: hand-worked spreads, the one-seed case, a naive bootstrap, and "no effect"."""

import json
import math

import numpy as np
import pytest

from moelab.claims.seeds import Z95, SeedValue, minus, seed_bootstrap


def test_minus_adds_spreads_in_quadrature():
    a = SeedValue(1.0, 1.0 - 0.2 * Z95, 1.0 + 0.2 * Z95)  # sd 0.2
    b = SeedValue(0.5, 0.5 - 0.15 * Z95, 0.5 + 0.15 * Z95)  # sd 0.15
    d = minus(a, b)
    assert d.value == pytest.approx(0.5) and d.sd == pytest.approx(0.25)  # sqrt(0.2^2 + 0.15^2)
    assert minus(a, a, shift=1.0).value == pytest.approx(-1.0)
    assert SeedValue.of({"value": 0.3, "ci_low": None, "ci_high": 0.4}).sd == 0.0  # no interval: no spread


def test_one_seed_gives_back_its_own_interval():
    value, lo, hi = seed_bootstrap([SeedValue(0.1, 0.05, 0.15)], n_boot=20000)
    assert value == 0.1 and lo == pytest.approx(0.05, abs=0.003) and hi == pytest.approx(0.15, abs=0.003)


def test_many_exact_seeds_match_a_naive_bootstrap_of_the_mean():
    rng = np.random.default_rng(3)
    values = rng.normal(0.4, 0.1, 40)
    value, lo, hi = seed_bootstrap([SeedValue(v, v, v) for v in values], n_boot=20000)
    naive = [np.mean(rng.choice(values, len(values))) for _ in range(20000)]  # an independent loop
    assert value == pytest.approx(values.mean())
    assert lo == pytest.approx(np.percentile(naive, 2.5), abs=0.004)
    assert hi == pytest.approx(np.percentile(naive, 97.5), abs=0.004)


def test_no_effect_holds_zero_and_a_planted_effect_excludes_it():
    nothing = [SeedValue(v, v - 0.02, v + 0.02) for v in (0.01, -0.012, 0.002)]
    _, lo, hi = seed_bootstrap(nothing)
    assert lo < 0 < hi
    planted = [SeedValue(v, v - 0.02, v + 0.02) for v in (0.10, 0.12, 0.11)]
    value, lo, hi = seed_bootstrap(planted)
    assert value == pytest.approx(0.11) and 0.05 < lo < value < hi < 0.17


def test_seeds_without_a_value_are_left_out():
    nan = float("nan")
    assert seed_bootstrap([SeedValue(nan, nan, nan), SeedValue(0.2, 0.2, 0.2)]) == (0.2, 0.2, 0.2)
    assert all(math.isnan(x) for x in seed_bootstrap([SeedValue(nan, nan, nan)]))


def test_null_paired_by_hand_and_a_routing_at_its_own_null_is_decided():
    """Each seed's value minus its own null plus the mean null: by hand, then the planted "nothing": three
    models each sitting exactly at its own (different) null. Raw values against the mean null leave the
    question open; paired, the interval sits on the null and rules the margin out."""
    from moelab.claims.record import ClaimResult, from_json
    from moelab.claims.routing import over_seeds
    from moelab.claims.seeds import null_paired
    from moelab.claims.verdict import Claim

    paired, null = null_paired([0.9, 0.8, 0.85], [0.3, 0.1, 0.2])
    assert null == pytest.approx(0.2) and paired == pytest.approx([0.8, 0.9, 0.85])
    nulls = [0.10, 0.20, 0.30]
    # Three models' metrics.json headlines, each at its own null; the row pairs them (routing.over_seeds).
    models = [{"headline": {"vocab": {"estimate": {"value": n, "ci_low": n - 0.01, "ci_high": n + 0.01,
                                                   "null_mean": n, "null_sd": 0.001}}}} for n in nulls]
    first, paired, per_seed = over_seeds(models, "vocab")
    assert paired == pytest.approx([0.2, 0.2, 0.2]) and first.null == pytest.approx(0.2)
    assert [p["null"] for p in per_seed] == pytest.approx(nulls)

    def result(values):
        return ClaimResult(row="olmoe-vocab-specialisation", paper="OLMoE", claim="c", paper_number="p",
                           measured="m", measure=first, test=Claim("greater", 0.05),
                           setup="s", seeds=3, details={"per_seed": per_seed}, seed_values=list(values))

    assert result(nulls).verdict == "inconclusive"  # raw values against the mean null: the question stays open
    at_null = result(paired)
    assert at_null.verdict == "not reproduced"
    back = from_json(json.loads(json.dumps(at_null.to_json())))
    assert back.seed_values == pytest.approx([0.2] * 3) and back.verdict == "not reproduced"  # read back as is


def test_norm_preference_seed_values_pair_the_stored_per_seed_nulls():
    from moelab.claims.seedvals import seed_values

    d = {"per_seed_per_layer": [[0.5, 0.7], [0.4, 0.4]]}  # seed means 0.6, 0.4
    assert seed_values("closer-norm-preference", d, 2, 0.5) == pytest.approx([0.6, 0.4])  # stored before: raw
    d["null_per_seed_per_layer"] = [[0.3, 0.3], [0.1, 0.1]]  # nulls 0.3, 0.1: mean 0.2
    assert seed_values("closer-norm-preference", d, 2, 0.5) == pytest.approx([0.5, 0.5])
