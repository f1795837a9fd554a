"""Headline numbers: one value per analysis with its null and a sentence a person can read on its own.

Values are means over MoE layers of the analysis results (so they can be checked against `analyze_all`);
each sentence states what 0 or 1 mean and prints the number as "0.168 [0.161, 0.175] (null 0.031 ±
0.002)": the 95% bootstrap interval over sequences, then the permutation null's mean and spread (what the
null keeps and shuffles is named in docs/TRACE.md and in each section's caption). Uniform routing stays
as a second, named reference where it helps reading.
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
    null: float | None   # the value's baseline (permutation null mean, uniform routing, random init)
    text: str            # the summary sentence ("" for numbers that only go in tables)
    estimate: Any = None  # the analysis' Estimate: interval, null mean / sd, p, z, replicate counts


def fmt_estimate(est: Any, spec: str = ".3f", null: bool = True) -> str:
    """'0.168 [0.161, 0.175] (null 0.031 ± 0.002)'; parts without a number are left out."""
    if est is None or est.value is None or not np.isfinite(est.value):
        return "n/a"
    out = format(est.value, spec)
    if np.isfinite(est.ci_low) and np.isfinite(est.ci_high):
        out += f" [{format(est.ci_low, spec)}, {format(est.ci_high, spec)}]"
    if null and np.isfinite(est.null_mean):
        out += f" (null {format(est.null_mean, spec)} ± {format(est.null_sd, spec)})"
    return out


def shuffled_where(est: Any) -> str:
    """Where a token-level null moved its labels, in a few words (the estimate's `null` says it whole)."""
    from moelab.analysis.seqpool import SAMPLE_NULL, SEQ_NULL

    null = est.get("null", "") if isinstance(est, dict) else getattr(est, "null", "")
    if null == SAMPLE_NULL:
        return "within each sequence of a sample of whole sequences"
    return "within each sequence" if null == SEQ_NULL else "across tokens"


def _value(est: Any) -> float | None:
    return _finite(est.value) if est is not None else None


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
        e = vocab.overall
        text = (f"vocabulary specialisation {fmt_estimate(e, '.2f')} (0 = random, 1 = perfect; null: token IDs "
                f"shuffled {shuffled_where(e)}; uniform routing would give {fmt(layer_mean(vocab.uniform_rescaled))})"
                if _value(e) is not None else
                f"vocabulary specialisation: no token ID was seen {vocab.min_count} times")
        out.append(Headline("vocab_specialisation", "vocabulary specialisation", _value(e), _finite(e.null_mean),
                            text, e))
    tok, pos = results.get("std_token"), results.get("std_position")
    if tok is not None and pos is not None:
        t, p = tok.overall, pos.overall
        ceiling = layer_mean(tok.deterministic)
        refs = (f"uniform routing {fmt(layer_mean(tok.uniform_mean), '.3f')} / "
                f"{fmt(layer_mean(pos.uniform_mean), '.3f')}")
        if _value(t) is None:
            text = (f"context-independent std: no token ID seen {tok.min_count} times; positions "
                    f"{fmt_estimate(p)} (always the same experts {fmt(ceiling, '.3f')})")
        else:
            text = (f"context-independent std {fmt_estimate(t)} for token IDs (seen >= {tok.min_count} times) vs "
                    f"{fmt_estimate(p)} for positions (nulls: the label shuffled {shuffled_where(t)}; {refs}; "
                    f"always the same experts {fmt(ceiling, '.3f')})")
        out.append(Headline("std_token", "std score, token IDs", _value(t), _finite(t.null_mean), text, t))
        out.append(Headline("std_position", "std score, positions", _value(p), _finite(p.null_mean), "", p))
    elif pos is not None:  # a trace without token ids: positions alone
        p = pos.overall
        out.append(Headline("std_position", "std score, positions", _value(p), _finite(p.null_mean),
                            f"std score for positions {fmt_estimate(p)} (null: positions shuffled {shuffled_where(p)}; "
                            "no token ids in this trace)", p))
    for label in labels:
        mi, dom = results.get(f"mi:{label}"), results.get(f"domain_specialisation:{label}")
        if mi is None or dom is None or max((len(n) for n in dom.names), default=0) < 2:
            continue  # a label with a single value carries no information
        e, d = mi.overall, dom.overall
        text = (f"expert-{label} mutual information {fmt_estimate(e)} normalised; "
                f"a {label}'s most used expert takes {fmt_estimate(d, '.2f')} of its tokens (nulls: the {label} "
                "shuffled across documents, each document's routing kept whole)")
        out.append(Headline(f"mi:{label}", f"expert-{label} MI (normalised)", _value(e), _finite(e.null_mean), text, e))
        out.append(Headline(f"max_share:{label}", f"{label}: top expert's share", _value(d), _finite(d.null_mean),
                            "", d))
    return out


def load_headlines(results: dict[str, Any]) -> list[Headline]:
    out = []
    load = results.get("load")
    if load is not None:
        v, n = layer_mean(load.max_over_mean), layer_mean(load.null_max_over_mean)
        dead = sum(len(d) for d in load.dead_experts)
        out.append(Headline("load_imbalance", "load max/mean", v, n,
                            f"expert load max/mean {fmt_estimate(load.imbalance_overall, '.2f', null=False)} "
                            f"(uniform routing {fmt(n)}); {dead} dead expert"
                            f"{'s' if dead != 1 else ''} over {len(load.num_experts)} MoE layers",
                            load.imbalance_overall))
        out.append(Headline("dead_experts", "dead experts", float(dead), 0.0, ""))
    co = results.get("coactivation")
    if co is not None and _value(co.strongest_overall) is not None:  # no pairs (k = 1, one expert): no headline
        e = co.strongest_overall
        out.append(Headline("coactivation_max", "strongest P(j|i)", _value(e), _finite(e.null_mean),
                            f"strongest co-activation P(j | i) {fmt_estimate(e, '.2f')} (mean over layers with "
                            f"pairs; null: independent draws at the layer's load; uniform top-k "
                            f"{fmt(layer_mean(co.uniform_p))})", e))
    return out


def drop_headlines(profile: Any, key: str, what: str, queue: Any = None) -> list[Headline]:
    """The overall dropped share; the rise from the first to the last quarter of positions against the
    rise the queue alone gives (positions shuffled within sequences) when that baseline was computed."""
    overall = _finite(profile.overall)
    out = [Headline(key, f"drop share ({what})", overall, None, "")]
    if not overall:
        return out + [Headline(f"{key}_end", f"drop share at the end ({what})", overall, overall,
                               f"no dropped choices ({what})")]
    first, last = profile.first_quarter.value, profile.last_quarter.value
    trend = (f"goes from {first:.1%} in the first quarter of positions to "
             f"{fmt_estimate(profile.last_quarter, '.1%', null=False)} in the last")
    null = queue.queue_rise.value if queue is not None else None
    if queue is None:
        tail = f" (overall {overall:.1%}; no queue-only baseline: give the capacity setting)"
    elif abs(queue.observed_rise.value) < 1e-3:
        tail = f"; no rise to explain (queue alone: {queue.queue_rise.value:+.1%})"
    else:
        tail = (f"; the queue alone (positions shuffled within sequences) gives a rise of "
                f"{queue.queue_rise.value:+.1%} "
                f"against {queue.observed_rise.value:+.1%} observed, i.e. explains {queue.explained:.0%} of it "
                f"(excess over the queue {fmt_estimate(queue.excess, '+.1%', null=False)})")
    out.append(Headline(f"{key}_end", f"drop rise to the end ({what})", last - first, null,
                        f"drop share ({what}) {trend}{tail}", profile.rise))
    if queue is not None:
        out.append(Headline(f"{key}_excess", f"drop rise beyond the queue ({what})", queue.excess.value, 0.0, "",
                            queue.excess))
    return out


def routing_headlines(results: dict[str, Any], labels: Sequence[str]) -> list[Headline]:
    """Headlines of one trace's `analyze_all` results, most telling first."""
    out = specialisation_headlines(results, labels) + load_headlines(results)
    if "drops" in results:
        out += drop_headlines(results["drops"], "drop_share", "trained capacity", results.get("queue:trained"))
    if "drops_simulated" in results:
        s = results["drops_simulated"].setting
        out += drop_headlines(results["drops_simulated"], "drop_share_simulated",
                              f"re-simulated at cf {s['capacity_factor']}", results.get("queue:simulated"))
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
        e = gates.cross_layer_overall
        text = (f"cross-layer routing MI {fmt_estimate(e, '.3f', null=False)} nats between layers (token-shuffled "
                f"null {fmt(n, '.3f')})" if v is not None else
                "cross-layer routing MI: not defined between layers with different E")
        out.append(Headline("cross_layer_mi", "cross-layer MI (nats)", v, n, text, e))
    v, n = layer_mean(gates.gate_entropy_mean), layer_mean(gates.null_gate_entropy)
    out.append(Headline("gate_entropy", "gate entropy (nats)", v, n,
                        f"gate entropy {fmt_estimate(gates.entropy_overall, '.2f', null=False)} nats (uniform router "
                        f"log E = {fmt(n)})", gates.entropy_overall))
    return out


def _dynamic_headlines(dyn: Any) -> list[Headline]:
    out = []
    if dyn is not None and dyn.top1_is_largest_norm is not None:
        v, n = layer_mean(dyn.top1_is_largest_norm), layer_mean(dyn.null_top1_is_largest_norm)
        out.append(Headline("top1_largest_norm", "top-1 has largest output norm", v, n,
                            f"the router's top-1 expert has the largest output norm for "
                            f"{fmt_estimate(dyn.top1_overall, '.0%', null=False)} of tokens "
                            f"(chance 1/E = {fmt(n, '.0%')})",
                            dyn.top1_overall))
    if dyn is not None and dyn.mean_angular is not None:
        v = layer_mean(dyn.mean_angular)
        out.append(Headline("output_angular_similarity", "expert output similarity (angular)", v,
                            dyn.null_angular, f"expert outputs' angular similarity "
                            f"{fmt_estimate(dyn.angular_overall, '.3f', null=False)} "
                            f"(unrelated outputs {dyn.null_angular})",
                            dyn.angular_overall))
    return out


def checkpoint_name(step: Any) -> str:
    """"step 100"; a checkpoint that records no step is named by its label ("revision main", "checkpoint 1")."""
    return step if isinstance(step, str) else f"step {step}"


def early_headlines(early: Any, top_k: int) -> list[Headline]:
    """How close the earliest checkpoint's routing already is to the final one's."""
    e, j = early.first["overlap"], early.first["jsd"]
    step = checkpoint_name(early.steps[0])
    return [Headline("early_topk_overlap", f"top-{top_k} overlap, {step} vs final", _value(e),
                     _finite(e.null_mean),
                     f"top-{top_k} overlap with the final checkpoint already {fmt_estimate(e, '.2f')} at "
                     f"{step} (null: token identity shuffled between the checkpoints; independent uniform routing "
                     f"{fmt(layer_mean(early.uniform_overlap), '.2f')})", e),
            Headline("early_top1", f"top-1 agreement, {step} vs final", _value(early.first["top1"]),
                     _finite(early.first["top1"].null_mean), "", early.first["top1"]),
            Headline("early_jsd", f"JSD of E_i(token), {step} vs final", _value(j), _finite(j.null_mean), "", j)]


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
