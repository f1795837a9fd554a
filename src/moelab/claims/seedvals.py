"""Each row's statistic per trained model (seed), read from the details the row stores.

The table's interval is a t-interval over these values (`seeds.t_interval`), so every row must say what its
per-seed value is; it is computed here from the row's details, in the measure's units, the same way for a
fresh result and for one read back from docs/claims/ (which lets the committed results be re-decided
under a new rule without retraining). A row missing here has no per-seed values: a one-model row gives
its single value; a row of several seeds without an extractor gives none, and cannot be decided.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np

from moelab.claims.seeds import null_paired


def _loss_gap(worse: str, better: str) -> Callable[[Mapping[str, Any]], list[float]]:
    return lambda d: [s[worse] - s[better] for s in d["per_seed"]]


def _mean_rows(key: str) -> Callable[[Mapping[str, Any]], list[float]]:
    return lambda d: [float(np.mean(r)) for r in d[key]]


def norm_preference(d: Mapping[str, Any]) -> list[float]:
    """Each seed's share, paired with its own null when the result stores the per-seed nulls (results
    stored before kept their mean only)."""
    shares = _mean_rows("per_seed_per_layer")(d)
    if "null_per_seed_per_layer" not in d:
        return shares
    return null_paired(shares, _mean_rows("null_per_seed_per_layer")(d))[0]


def mi_relative(d: Mapping[str, Any]) -> list[float]:
    """The paper's statistic: the binned cross-layer MI itself (not its excess over a null), GRU over
    linear minus 1, per seed; results stored before the row kept it for seed 0 only (analysis_seed0)."""
    if d["per_seed"] and "gru_mi" in d["per_seed"][0]:
        return [s["gru_mi"] / s["linear_mi"] - 1 for s in d["per_seed"]]
    a = d["analysis_seed0"]
    return [a["gru"]["mi"] / a["linear"]["mi"] - 1]


EXTRACT: dict[str, Callable[[Mapping[str, Any]], list[float]]] = {
    "openmoe-moe-beats-dense": _loss_gap("dense", "moe"),
    "rmoe-beats-linear": _loss_gap("linear", "gru"),
    "rmoe-np-ablation": _loss_gap("np", "gru"),
    "rmoe-detach-ablation": _loss_gap("detach", "gru"),
    "rmoe-cross-layer-mi": lambda d: mi_relative(d),
    # the k=1 cost as a share of the all-routed-experts-removed control's (results before the control: none)
    "intervene-one-expert-suffices": lambda d: [s["k1_share_of_control"] for s in d["per_seed"]],
    # the raw late-position rise (results that stored only the excess over the queue's rise: none)
    "openmoe-drop-towards-end": lambda d: [s["rise"]["value"] for s in d["per_seed"]],
    "closer-diversity-depth": lambda d: list(d["per_seed_trend"]),
    "closer-neurons-fine-grained": _mean_rows("gate_r2_per_seed_per_layer"),
    "closer-norm-preference": norm_preference,
    "intervene-observational-vs-causal": lambda d: [float(np.nanmean(r))
                                                    for r in d["scores"][d["best_score"]]["per_seed_layer"]],
    "upcycle-specialises-less": lambda d: [s["vocab_specialisation"]["difference"]["value"]
                                           for s in d["per_seed"]],
}


def seed_values(row: str, details: Mapping[str, Any], seeds: int, value: float) -> list[float]:
    """The row's per-seed values; [] when a row of several seeds stores none that this module can read."""
    if row in EXTRACT:
        try:
            return [float(v) for v in EXTRACT[row](details)]
        except (KeyError, TypeError, ValueError, IndexError):
            return []
    return [float(value)] if seeds == 1 else []
