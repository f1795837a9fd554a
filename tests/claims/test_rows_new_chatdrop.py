"""openmoe-chat-vs-pretraining-drops on planted traces: a late-position routing shift on the "chat" text
is found, and a text that only drops more everywhere (skewed load, tighter capacity) sits at the null."""

from __future__ import annotations

import numpy as np
import pytest

from moelab.analysis.drops import drop_profile
from moelab.analysis.synthetic import planted_batches
from moelab.claims.registry import all_rows
from moelab.claims.rows_chatdrop import MARGIN, quarters_of, rise_gap
from moelab.claims.seeds import t_interval
from moelab.claims.verdict import REPRODUCED, Claim, Measure, verdict

SEQS, LEN, LAYERS, E, K = 256, 64, 2, 8, 2


def batches(rule: str, cf: float, seed: int) -> list[dict]:
    return list(planted_batches(num_seqs=SEQS, seq_len=LEN, num_layers=LAYERS, num_experts=E, top_k=K, rule=rule,
                                capacity_factor=cf, seed=seed))


def naive_rise(bs: list[dict]) -> float:
    """Dropped share of the last quarter of positions minus the first, one row at a time."""
    hit = {"first": [0, 0], "last": [0, 0]}
    for b in bs:
        for pos, dropped in zip(b["pos"], b["dropped"]):
            part = "first" if pos < LEN // 4 else "last" if pos >= LEN - LEN // 4 else None
            if part:
                hit[part][0] += int(dropped)
                hit[part][1] += 1
    return hit["last"][0] / hit["last"][1] - hit["first"][0] / hit["first"][1]


def gaps(chat: tuple[str, float], pre: tuple[str, float]) -> list[float]:
    out = []
    for seed in range(3):  # three "trained models": each text drawn anew per seed
        c, p = batches(*chat, 2 * seed), batches(*pre, 2 * seed + 1)
        qc = quarters_of(drop_profile(c, [E] * LAYERS, K, bucket_size=LEN // 16))
        qp = quarters_of(drop_profile(p, [E] * LAYERS, K, bucket_size=LEN // 16))
        out.append(rise_gap(qc, qp))
        if seed == 0:
            assert out[-1] == pytest.approx(naive_rise(c) - naive_rise(p), abs=1e-12)
    return out


def test_planted_late_shift_on_chat_is_found():
    g = gaps(("late", 1.0), ("skewed", 1.0))
    mean, lo, hi = t_interval(g)
    assert lo > MARGIN
    assert verdict(Measure(mean, lo, hi, 0.0), Claim("greater", MARGIN))[0] == REPRODUCED


def test_nothing_more_drops_everywhere_sits_at_the_null():
    # "chat" with the same skewed load at a tighter capacity drops far more overall, at every position.
    c, p = quarters_of(drop_profile(batches("skewed", 0.8, 0), [E] * LAYERS, K, bucket_size=4)), \
        quarters_of(drop_profile(batches("skewed", 1.25, 1), [E] * LAYERS, K, bucket_size=4))
    assert c["overall"] - p["overall"] > 0.08
    mean, lo, hi = t_interval(gaps(("skewed", 0.8), ("skewed", 1.25)))
    assert lo < 0 < hi and hi < MARGIN * 1.5


def test_rise_with_a_missing_quarter_is_nan():
    assert np.isnan(rise_gap({"first_quarter": None, "last_quarter": 0.1}, {"first_quarter": 0, "last_quarter": 0}))


def test_registered():
    assert all_rows()["openmoe-chat-vs-pretraining-drops"].paper == "OpenMoE"
