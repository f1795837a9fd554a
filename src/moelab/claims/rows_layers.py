"""OLMoE's per-layer routing analyses on models deep enough to have layers to compare: vocabulary (and
domain) specialisation by depth, and co-activation of expert pairs.

The base tiny-moe has 2 MoE layers, too few for a trend, so both rows read the 8-layer linear-router
(SMoE) models of the RMoE rows (rmoe8.py: every block MoE, top-2 of 16, 3 seeds), traced on the main
corpus's held-out split (the trace the RMoE cross-layer MI row makes: one cache entry). Every number is
an excess over the analyses' load-keeping null: token IDs shuffled among the tokens of each sequence
(keeps each expert's load and each ID's count), domain labels across documents (keeps each document's routing whole),
and for co-activation k distinct experts per
token drawn independently with weights fitted to the layer's load.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
from scipy.stats import spearmanr

from moelab.claims.models import final
from moelab.claims.record import ClaimResult
from moelab.claims.registry import row
from moelab.claims.rmoe8 import describe, rmoe8_run, seeds
from moelab.claims.routing import min_count
from moelab.claims.seeds import t_interval
from moelab.claims.verdict import Claim, Measure, Precondition
from moelab.claims.workspace import Workspace

MIN_LAYERS = 4  # a Spearman trend over fewer MoE layers can take only a handful of values
TREND_MARGIN = 0.5  # "rises with depth": a clearly monotone trend (closer-diversity-depth's margin)


def excess_by_layer(analysis: Mapping[str, Any]) -> np.ndarray:
    """Per MoE layer, an analysis's estimate minus its null mean (NaN where either is missing)."""
    return np.array([np.nan if e.get("value") is None or e.get("null_mean") is None
                     else float(e["value"]) - float(e["null_mean"]) for e in analysis["estimates"]])


def depth_spearman(values_L: Sequence[float]) -> float:
    """Spearman correlation of per-layer values with the layer index (all layers); NaN below 3 finite
    layers or for a constant profile."""
    v = np.asarray(values_L, np.float64)
    ok = np.isfinite(v)
    if ok.sum() < 3 or np.ptp(v[ok]) == 0:
        return float("nan")
    return float(spearmanr(np.flatnonzero(ok), v[ok]).statistic)


MIN_PAIR_TOKENS = 1000  # P(j | i) of an expert chosen by fewer tokens is too noisy for a maximum over pairs
SMOKE_MIN_PAIR_TOKENS = 8  # a smoke trace (2k tokens over 16 experts) has no expert at 1000


def pair_excess_by_layer(coactivation: Mapping[str, Any], min_tokens: int = MIN_PAIR_TOKENS) -> np.ndarray:
    """Per layer, the largest off-diagonal P(j | i) minus the same pair's P(j | i) under load-matched
    independent routing (the analysis's null_p), over experts i chosen by >= `min_tokens` tokens.

    Pairwise, not max minus max: a pair of rarely chosen experts that always fire together stands out even
    when popular experts' chance pairs are larger. A maximum over pairs picks up sampling noise (about
    sqrt(p (1 - p) / n_i) per pair), which only raises it; `min_tokens` keeps that noise to a few points."""
    out = []
    for p, null, c in zip(coactivation["p_j_given_i"], coactivation["null_p"], coactivation["counts"]):
        d = np.array(p, np.float64) - np.array(null, np.float64)
        np.fill_diagonal(d, np.nan)
        d[np.diag(np.asarray(c)) < min_tokens] = np.nan
        out.append(float(np.nanmax(d)) if np.isfinite(d).any() else float("nan"))
    return np.array(out)


def strongest_pair_excess(coactivation: Mapping[str, Any], min_tokens: int = MIN_PAIR_TOKENS) -> float:
    """Mean over layers of `pair_excess_by_layer` (NaN when no layer has an expert with enough tokens)."""
    v = pair_excess_by_layer(coactivation, min_tokens)
    return float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")


def min_pair_tokens(ws: Workspace) -> int:
    return MIN_PAIR_TOKENS if ws.scale.steps >= 100 else SMOKE_MIN_PAIR_TOKENS


def layer_metrics(ws: Workspace, seed: int) -> dict[str, Any]:
    """metrics.json's analyses (specialisation and co-activation) of one 8-layer linear-router seed."""
    trace = ws.trace(final(rmoe8_run(ws, "linear", seed)), f"rmoe8-linear-s{seed}")
    m = ws.analyze(f"layers-rmoe8-linear-s{seed}", [trace], names=["linear"],
                   options={"min_count": min_count(ws), "analyses": ["specialisation", "coactivation"]})
    return m["models"]["linear"]


def routing_learned(excess_N: Sequence[float]) -> Precondition:
    """The routing has something to compare: mean vocabulary specialisation beyond its null over seeds."""
    mean, lo, hi = t_interval(excess_N)
    return Precondition(
        needs="vocabulary specialisation (mean over layers) beyond its load-keeping null, t-interval over seeds",
        measured=f"excess {mean:+.3g} [{lo:+.3g}, {hi:+.3g}] (rescaled units)", met=bool(np.isfinite(lo) and lo > 0))


def _setup(ws: Workspace, n: int) -> str:
    return (f"Linear-router (SMoE) models of the RMoE rows, seeds 0-{n - 1}: {describe(rmoe8_run(ws, 'linear', 0))}. "
            f"{ws.scale.describe()}; every held-out token of the main corpus traced.")


@row("olmoe-layer-specialisation", "OLMoE")
def layer_specialisation(ws: Workspace) -> ClaimResult:
    n = seeds(ws, "linear")
    models = [layer_metrics(ws, seed) for seed in range(n)]
    vocab_NL = np.array([excess_by_layer(m["analyses"]["vocab"]) for m in models])
    domain_NL = np.array([excess_by_layer(m["analyses"]["domain_specialisation:domain"]) for m in models])
    trends = [depth_spearman(v) for v in vocab_NL]
    L = vocab_NL.shape[1]
    enough = Precondition(f">= {MIN_LAYERS} MoE layers", f"{L} MoE layers", L >= MIN_LAYERS)
    learned = routing_learned(np.nanmean(vocab_NL, axis=1).tolist())
    pre = Precondition(f"{enough.needs}; {learned.needs}", f"{enough.measured}; {learned.measured}",
                       enough.met and learned.met)
    return ClaimResult(
        row="olmoe-layer-specialisation", paper="OLMoE",
        claim="Vocabulary specialisation grows with depth: later MoE layers route a token ID to the same experts "
              "more than earlier ones.",
        paper_number="OLMoE-1B-7B: vocabulary specialisation plotted per layer, higher in later layers (a figure; the "
                     "reference notes give the definition, no per-layer number).",
        measured="Per seed, Spearman correlation over the MoE layers of layer index with the layer's vocabulary "
                 "specialisation (OLMoE's: per token ID seen >= 10 times, max_e count(v, e) / n(v) over its top-k, "
                 "averaged over IDs, rescaled (p - k/E) / (1 - k/E)) minus its null (token IDs shuffled among the "
                 "tokens of each sequence: keeps expert load and each ID's count). Null 0 (no trend; ± the sd of Spearman "
                 "over a random order of the layers). 95% interval: t over seeds. Details: the per-layer excesses, "
                 "and the same trend for domain specialisation (largest share of a domain's tokens over experts).",
        measure=Measure(float(np.nanmean(trends)), float("nan"), float("nan"), 0.0, 1 / np.sqrt(max(L - 1, 1))),
        test=Claim("greater", margin=TREND_MARGIN), unit="", seed_values=trends, seeds=n, precondition=pre,
        setup=_setup(ws, n),
        details={"vocab_excess_per_seed_per_layer": vocab_NL.round(5).tolist(),
                 "domain_excess_per_seed_per_layer": domain_NL.round(5).tolist(),
                 "domain_trend_per_seed": [depth_spearman(d) for d in domain_NL],
                 "vocab_excess_mean_per_layer": np.nanmean(vocab_NL, axis=0).tolist()},
        note=f"Margin {TREND_MARGIN}: 'grows with depth' asks for a clearly monotone profile, beyond one null sd "
             f"({1 / np.sqrt(max(L - 1, 1)):.2f}) of a random order of {L} layers. The precondition asks that the "
             "routing specialise at all (else a trend is a trend of noise).")


@row("olmoe-coactivation", "OLMoE")
def coactivation(ws: Workspace) -> ClaimResult:
    n = seeds(ws, "linear")
    models = [layer_metrics(ws, seed) for seed in range(n)]
    excess = [strongest_pair_excess(m["analyses"]["coactivation"], min_pair_tokens(ws)) for m in models]
    co = models[0]["analyses"]["coactivation"]
    uniform = float(co["uniform_p"][0])
    vocab = [float(np.nanmean(excess_by_layer(m["analyses"]["vocab"]))) for m in models]
    return ClaimResult(
        row="olmoe-coactivation", paper="OLMoE",
        claim="Experts co-activate little: no pair of experts in a layer fires together far more often than routing "
              "with the same load would give (little redundancy between experts).",
        paper_number="OLMoE-1B-7B: co-activation P(j | i) heatmaps per layer show few strongly co-activated pairs, "
                     "read as little redundancy (a figure; no single number).",
        measured="OLMoE's co-activation P(j | i) = tokens routed to both i and j / tokens routed to i, per layer. Value: "
                 "the largest excess of a pair's P(j | i) over the same pair's P(j | i) under load-matched independent "
                 "routing (k distinct experts per token, weights fitted to the layer's load), mean over MoE layers, "
                 f"per seed; experts i chosen by >= {min_pair_tokens(ws)} tokens (a maximum over pairs: sampling noise can "
                 "only raise it). "
                 f"Bound (the row's null): the uniform chance level (k - 1)/(E - 1) = {uniform:.3f}: no pair co-fires "
                 "more often than chance by as much again. 95% interval: t over seeds.",
        measure=Measure(float(np.nanmean(excess)), float("nan"), float("nan"), uniform), test=Claim("less"),
        unit="", seed_values=excess, seeds=n, precondition=routing_learned(vocab), setup=_setup(ws, n),
        details={"pair_excess_per_layer_seed0": pair_excess_by_layer(co, min_pair_tokens(ws)).tolist(),
                 "strongest_pair_per_layer_seed0": [e["value"] for e in co["strongest"]],
                 "strongest_null_per_layer_seed0": [e["null_mean"] for e in co["strongest"]],
                 "per_seed_excess": excess, "uniform_p": uniform,
                 "transition_mi_seed0": co["transition_mi"], "transition_null_mi_seed0": co["transition_null_mi"]},
        note="Precondition: routing beyond its null (vocabulary specialisation), since a router that has learned "
             "nothing co-activates nothing and would pass trivially. The load-matched null keeps each expert's "
             "load, so a popular expert pair is not counted as co-activation.")
