"""Headline numbers: one value per analysis with its null and a sentence a person can read on its own.

Values are means over MoE layers of the analysis results (so they can be checked against `analyze_all`);
each sentence states what 0 or 1 mean, or what uniform routing / shuffled labels / random init give.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from moelab.analysis.common import Result


@dataclasses.dataclass
class Headline(Result):
    key: str
    label: str           # short name, for the comparison table
    value: float | None
    null: float | None   # the value's baseline (chance, uniform routing, random init)
    text: str            # the summary sentence ("" for numbers that only go in tables)


def layer_mean(values: Sequence[Any] | None) -> float | None:
    """Mean over layers, ignoring layers without a value; None when no layer has one."""
    if values is None:
        return None
    arr = np.asarray([np.nan if v is None else v for v in values], dtype=np.float64).reshape(-1)
    arr = arr[np.isfinite(arr)]
    return float(arr.mean()) if arr.size else None


def fmt(value: float | None, spec: str = ".2f") -> str:
    return "n/a" if value is None or not np.isfinite(value) else format(value, spec)


def specialisation_headlines(results: dict[str, Any], labels: Sequence[str]) -> list[Headline]:
    out = []
    vocab = results.get("vocab")
    if vocab is not None:
        v, n = layer_mean(vocab.rescaled), layer_mean(vocab.null_rescaled)
        text = (f"vocabulary specialisation {fmt(v)} (0 = random, 1 = perfect; uniform routing at these token "
                f"counts gives {fmt(n)})" if v is not None else
                f"vocabulary specialisation: no token ID was seen {vocab.min_count} times")
        out.append(Headline("vocab_specialisation", "vocabulary specialisation", v, n, text))
    tok, pos = results.get("std_token"), results.get("std_position")
    if tok is not None and pos is not None:
        t, p = _finite(tok.mean_over_layers), _finite(pos.mean_over_layers)
        ceiling = layer_mean(tok.deterministic)
        null_t, null_p = _finite(tok.null_over_layers), _finite(pos.null_over_layers)
        if t is None:
            text = (f"context-independent std: no token ID seen {tok.min_count} times; positions {fmt(p, '.3f')} "
                    f"(uniform routing {fmt(null_p, '.3f')}, always the same experts {fmt(ceiling, '.3f')})")
        else:
            text = (f"context-independent std {fmt(t, '.3f')} for token IDs (seen >= {tok.min_count} times) vs "
                    f"{fmt(p, '.3f')} for positions (uniform routing {fmt(null_t, '.3f')} / {fmt(null_p, '.3f')}; "
                    f"always the same experts {fmt(ceiling, '.3f')})")
        out.append(Headline("std_token", "std score, token IDs", t, null_t, text))
        out.append(Headline("std_position", "std score, positions", p, null_p, ""))
    for label in labels:
        mi, dom = results.get(f"mi:{label}"), results.get(f"domain_specialisation:{label}")
        if mi is None or dom is None or max((len(n) for n in dom.names), default=0) < 2:
            continue  # a label with a single value carries no information
        v, n = layer_mean(mi.normalised), layer_mean(mi.null_normalised)
        text = f"expert-{label} mutual information {fmt(v, '.3f')} normalised (shuffled labels {fmt(n, '.3f')})"
        out.append(Headline(f"mi:{label}", f"expert-{label} MI (normalised)", v, n, text))
    return out


def load_headlines(results: dict[str, Any]) -> list[Headline]:
    out = []
    load = results.get("load")
    if load is not None:
        v, n = layer_mean(load.max_over_mean), layer_mean(load.null_max_over_mean)
        dead = sum(len(d) for d in load.dead_experts)
        out.append(Headline("load_imbalance", "load max/mean", v, n,
                            f"expert load max/mean {fmt(v)} (uniform routing {fmt(n)}); {dead} dead expert"
                            f"{'s' if dead != 1 else ''} over {len(load.num_experts)} MoE layers"))
        out.append(Headline("dead_experts", "dead experts", float(dead), 0.0, ""))
    co = results.get("coactivation")
    if co is not None:
        strongest = [float(np.nanmax(np.where(np.eye(len(p), dtype=bool), np.nan, p)))
                     if len(p) > 1 and np.isfinite(p).sum() > len(p) else np.nan for p in co.p_j_given_i]
        v, n = layer_mean(strongest), layer_mean(co.null_p)
        if v is not None:
            out.append(Headline("coactivation_max", "strongest P(j|i)", v, n,
                                f"strongest co-activation P(j | i) {fmt(v)} (mean over layers; "
                                f"uniform top-k {fmt(n)})"))
    return out


def drop_trend(profile: Any) -> tuple[float | None, float | None]:
    """Dropped share in the first and the last quarter of the position buckets (choice-weighted)."""
    choices = np.asarray(profile.choices_LB, np.float64).sum(axis=0)
    dropped = np.asarray(profile.dropped_LB, np.float64).sum(axis=0)
    B = len(choices)
    if B == 0 or choices.sum() == 0:
        return None, None
    q = max(1, B // 4)
    share = [dropped[s].sum() / max(choices[s].sum(), 1) for s in (slice(0, q), slice(B - q, B))]
    return float(share[0]), float(share[1])


def drop_headlines(profile: Any, key: str, what: str) -> list[Headline]:
    """The overall dropped share, and the share in the last quarter of positions against it (the overall
    share is what a position-independent profile would show there)."""
    first, last = drop_trend(profile)
    overall = _finite(profile.overall)
    out = [Headline(key, f"drop share ({what})", overall, None, "")]
    if not overall:
        return out + [Headline(f"{key}_end", f"drop share at the end ({what})", overall, overall,
                               f"no dropped choices ({what})")]
    if abs(last - first) < max(0.2 * overall, 0.002):
        trend = f"stays near {overall:.1%} at all positions"
    else:
        trend = f"{'rises' if last > first else 'falls'} from {first:.1%} to {last:.1%} towards the end"
    return out + [Headline(f"{key}_end", f"drop share at the end ({what})", last, overall,
                           f"drop share ({what}) {trend} (overall {overall:.1%}, the position-independent "
                           "baseline)")]


def routing_headlines(results: dict[str, Any], labels: Sequence[str]) -> list[Headline]:
    """Headlines of one trace's `analyze_all` results, most telling first."""
    out = specialisation_headlines(results, labels) + load_headlines(results)
    if "drops" in results:
        out += drop_headlines(results["drops"], "drop_share", "trained capacity")
    if "drops_simulated" in results:
        s = results["drops_simulated"].setting
        out += drop_headlines(results["drops_simulated"], "drop_share_simulated",
                              f"re-simulated at cf {s['capacity_factor']}")
    out += _gate_headlines(results.get("gates")) + _dynamic_headlines(results.get("dynamic"))
    return out


def _gate_headlines(gates: Any) -> list[Headline]:
    if gates is None or gates.cross_layer_mi is None:
        return []
    mi, null = np.asarray(gates.cross_layer_mi, float), np.asarray(gates.cross_layer_null, float)
    off = ~np.eye(len(mi), dtype=bool)
    out = []
    if off.any():
        v, n = layer_mean(mi[off]), layer_mean(null[off])
        text = (f"cross-layer routing MI {fmt(v, '.3f')} nats between layers (shuffled experts {fmt(n, '.3f')})"
                if v is not None else "cross-layer routing MI: not defined between layers with different E")
        out.append(Headline("cross_layer_mi", "cross-layer MI (nats)", v, n, text))
    v, n = layer_mean(gates.gate_entropy_mean), layer_mean(gates.null_gate_entropy)
    out.append(Headline("gate_entropy", "gate entropy (nats)", v, n,
                        f"gate entropy {fmt(v)} nats (uniform router log E = {fmt(n)})"))
    return out


def _dynamic_headlines(dyn: Any) -> list[Headline]:
    out = []
    if dyn is not None and dyn.top1_is_largest_norm is not None:
        v, n = layer_mean(dyn.top1_is_largest_norm), layer_mean(dyn.null_top1_is_largest_norm)
        out.append(Headline("top1_largest_norm", "top-1 has largest output norm", v, n,
                            f"the router's top-1 expert has the largest output norm for {fmt(v, '.0%')} of "
                            f"tokens (chance 1/E = {fmt(n, '.0%')})"))
    if dyn is not None and dyn.mean_angular is not None:
        v = layer_mean(dyn.mean_angular)
        out.append(Headline("output_angular_similarity", "expert output similarity (angular)", v,
                            dyn.null_angular, f"expert outputs' angular similarity {fmt(v, '.3f')} "
                            f"(unrelated outputs {dyn.null_angular})"))
    return out


def early_headlines(early: Any, top_k: int) -> list[Headline]:
    """How close the earliest checkpoint's routing already is to the final one's."""
    v = layer_mean(np.asarray(early.topk_overlap)[0])
    n = layer_mean(early.null_overlap)
    j, jn = layer_mean(np.asarray(early.jsd)[0]), layer_mean(early.null_jsd)
    return [Headline("early_topk_overlap", f"top-{top_k} overlap, step {early.steps[0]} vs final", v, n,
                     f"top-{top_k} overlap with the final checkpoint already {fmt(v, '.0%')} at step "
                     f"{early.steps[0]} (independent routing {fmt(n, '.0%')})"),
            Headline("early_jsd", f"JSD of E_i(token), step {early.steps[0]} vs final", j, jn, "")]


def weight_headlines(weights: Any, note: str = "") -> list[Headline]:
    out = []
    r2 = weights.router_r2_mean
    if r2:
        parts = " / ".join(f"{p} {fmt(r2.get(p))}" for p in ("up", "gate", "down"))
        out.append(Headline("router_r2:gate", "router-vs-gate R^2", r2.get("gate"), _finite(weights.null_r2),
                            f"router rows vs averaged experts R^2: {parts} "
                            f"(unrelated {fmt(_finite(weights.null_r2))})"))
        out += [Headline(f"router_r2:{p}", f"router-vs-{p} R^2", r2.get(p), _finite(weights.null_r2), "")
                for p in ("up", "down")]
    elif note:
        out.append(Headline("router_r2:gate", "router-vs-gate R^2", None, None, f"no router-vs-expert R^2: {note}"))
    sim = {p: layer_mean([lay.gram_mean_offdiag[p] for lay in weights.layers]) for p in ("up", "gate", "down")}
    out.append(Headline("expert_similarity:up", "expert similarity (averaged up)", sim["up"], 0.0,
                        "expert similarity, mean cosine of averaged neurons: "
                        + " / ".join(f"{p} {fmt(v, '.3f')}" for p, v in sim.items()) + " (random init 0)"))
    return out


def _finite(value: Any) -> float | None:
    return float(value) if value is not None and np.isfinite(value) else None
