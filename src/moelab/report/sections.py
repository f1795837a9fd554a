"""Analysis results -> report sections: each figure with one sentence on how to read it and what its null is.

Sections appear only for what the trace holds: no `probs` column, no cross-layer MI; no all-experts
columns, no output-norm analysis. A missing part is stated in a note rather than silently skipped.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from moelab.report import figures as F
from moelab.report.headline import Headline, checkpoint_name, fmt, fmt_estimate, shuffled_where
from moelab.report.html import FigureBlock, Note, Section, Table

LABEL_WORDS = {"domain": "domain", "lang": "language", "turn": "turn"}


def trace_table(meta: Any, path: str, results: dict[str, Any]) -> Table:
    """What was traced: the source, the router setting, how many tokens."""
    load = results.get("load")
    tokens = load.tokens[0] if load is not None and load.tokens else "n/a"
    cf = "dropless" if meta.capacity_factor is None else (
        f"{meta.capacity_factor} ({meta.capacity_formula}, {meta.drop_policy})")
    router = meta.model_config.get("moe", {}).get("router", {}).get("kind", "n/a") if meta.model_config else "n/a"
    rows = [["trace", path], ["source", meta.source], ["router", router],
            ["experts per MoE layer", ", ".join(map(str, meta.num_experts))], ["top-k", meta.top_k],
            ["capacity factor", cf],
            ["checkpoint step", "n/a" if meta.checkpoint_step is None else meta.checkpoint_step],
            ["tokens traced", tokens], ["router probabilities kept", probs_kept(getattr(meta, "probs_mode", None))]]
    extra = getattr(meta, "extra", {}) or {}
    rows += [[name, extra[key]] for name, key in (("model family", "family"), ("routing rule", "routing_rule"),
                                                  ("scoring function", "scoring_function")) if extra.get(key)]
    return Table([], rows)


def probs_kept(mode: str | None) -> str:
    """The trace's `--probs` mode in words (TraceMeta.probs_mode; None for a trace written before it)."""
    if mode and mode.startswith("top:"):
        return f"{mode}: the {mode[4:]} largest per token and layer, with their experts"
    return {"full": "full: all E per token and layer (stored as float16)",
            "none": "none: only the chosen experts' probabilities"}.get(mode, "not recorded (an older or imported trace)")


def load_section(results: dict[str, Any]) -> Section:
    load = results["load"]
    rows = [[l, fmt_estimate(e, ".3f", null=False), fmt(load.null_max_over_mean[l], ".3f"),
             fmt_estimate(d, ".4f", null=False)] for l, (e, d) in enumerate(zip(load.imbalance, load.dropped))]
    return Section("Expert load", "How evenly the router spreads tokens over experts (all ranks, before dropping).", [
        FigureBlock(F.load_bars(load),
                    "Each bar is an expert's share of its layer's routed choices; the dashed line is the uniform "
                    "share 1/E of perfectly balanced routing (the null of load imbalance, which is what is under "
                    "test here), and red crosses mark dead experts."),
        Table(["layer", "max/mean [95% interval]", "uniform routing", "dropped share [95% interval]"], rows,
              "Intervals: bootstrap over sequences.")])


def estimates_table(results: dict[str, Any]) -> Table:
    """Every specialisation number per layer: value [interval] (null ± sd), p."""
    named = [(name, results[key]) for name, key in (("vocabulary specialisation", "vocab"),
                                                    ("std, token IDs", "std_token"), ("std, positions", "std_position"))
             if key in results]
    named += [(f"{k.split(':', 1)[1]}: top expert's share", v) for k, v in results.items()
              if k.startswith("domain_specialisation:") and v.estimates and np.isfinite(v.overall.value)]
    named += [(f"{k.split(':', 1)[1]}: normalised MI", v) for k, v in results.items()
              if k.startswith("mi:") and np.isfinite(v.overall.null_mean)]
    rows = []
    for name, r in named:
        for l, e in enumerate(r.estimates):
            rows.append([name, l, fmt_estimate(e), fmt(e.p, ".3f"), fmt(e.z, ".1f")])
        rows.append([name, "mean", fmt_estimate(r.overall), fmt(r.overall.p, ".3f"), fmt(r.overall.z, ".1f")])
    return Table(["number", "layer", "value [95% interval] (null mean ± sd)", "p (one-sided)", "z"], rows,
                 "Intervals: bootstrap over sequences; nulls: the token ID or position shuffled among the tokens "
                 "of each sequence, a domain or language across documents (each number's `null` in metrics.json "
                 "says which); p = (1 + permutations at or above the value) / "
                 "(1 + permutations).")


def early_table(early: Any) -> Table:
    rows = [[name, fmt_estimate(e), fmt(e.p, ".3g"), fmt(e.z, ".1f")]
            for name, e in (("top-1 agreement", early.first["top1"]), ("top-k overlap", early.first["overlap"]),
                            ("JSD of E_i(token)", early.first["jsd"]))]
    return Table([f"{checkpoint_name(early.steps[0])} vs final, mean over layers",
                  "value [95% interval] (null mean ± sd)", "p", "z"], rows,
                 "Agreement and overlap nulls are closed-form (normal p); the JSD null is "
                 "a permutation (one-sided: a smaller divergence than unrelated checkpoints).")


def _scores_block(results: dict[str, Any]) -> Any:
    """The per-layer specialisation scores, or the note saying why a trace without token ids has none."""
    if "vocab" not in results:  # see analysis.suite.unanswerable
        return Note(results.get("skipped", {}).get("token", "The trace has no token ids."))
    return FigureBlock(
        F.specialisation_scores(results["vocab"], results["std_token"], results["std_position"]),
        "Left, OLMoE's vocabulary specialisation per layer (0 = random, 1 = each token ID always to the same "
        "expert); right, OpenMoE's std over experts of E_i(g) for token IDs and positions (dashed: always the "
        "same experts). Error bars: 95% bootstrap intervals over sequences "
        f"({_n(results['vocab'].estimates, 'n_bootstrap')} replicates). Black ticks: the null, the token ID or "
        f"position shuffled {shuffled_where(results['vocab'].overall)} (keeps expert load and group sizes; "
        f"{_n(results['vocab'].estimates, 'n_permutations')} permutations). Grey ticks: uniform routing, a "
        "reference only: unequal load alone lifts every bar above it.")


def specialisation_section(results: dict[str, Any], labels: Sequence[str], bucket: int,
                           decode: Callable[[int], str] | None) -> Section:
    blocks: list[Any] = [_scores_block(results), estimates_table(results)]
    tables, informative = results["tables"], []
    for label in labels:
        dom = results.get(f"domain_specialisation:{label}")
        groups = max((len(n) for n in dom.names), default=0) if dom is not None else 0
        if groups < 2:
            word = LABEL_WORDS.get(label, label)
            blocks.append(Note(f"Only one {word} in this trace: no {label} specialisation." if groups else
                               f"The trace has no {word} labels: no {label} specialisation."))
            continue
        informative.append(label)
        word = LABEL_WORDS.get(label, label)
        blocks.append(FigureBlock(F.specialisation_heatmap(tables[label], what=word),
                                  f"Each row is a {word} and each cell the share of its routed choices that went to "
                                  "that expert, E_i(g), minus the expert's share of the whole layer; white is that "
                                  f"null (what shuffling the {word} across tokens gives on average), red an expert "
                                  f"the {word} prefers beyond its load, blue one it avoids."))
    blocks.append(FigureBlock(F.specialisation_heatmap(tables["pos_bucket"], what="position", bucket_size=bucket),
                              f"E_i(g) minus the layer's load share for positions in buckets of {bucket}: rows that "
                              "stay white mean routing does not depend on where a token sits (OpenMoE finds "
                              "positions near uniform)."))
    mis = {lab: results[f"mi:{lab}"] for lab in informative if f"mi:{lab}" in results}
    if mis:
        ranks = "top-1 expert" if next(iter(mis.values())).ranks == "top1" else "experts (all ranks)"
        blocks.append(FigureBlock(F.label_mi_bars(mis),
                                  f"Normalised mutual information between a token's {ranks} and its label, per "
                                  "layer (error bars: 95% bootstrap intervals over sequences), beside the same after "
                                  "shuffling the labels over the choices (grey: the permutation null, which keeps "
                                  "both margins)."))
    if "top_tokens" in results:
        blocks.append(top_tokens_table(results["top_tokens"], decode))
    return Section("Expert specialisation",
                   "Does an expert take particular token IDs, positions, domains or languages? (OpenMoE, OLMoE)",
                   blocks)


def top_tokens_table(top: Any, decode: Callable[[int], str] | None, n: int = 6) -> Table:
    """Each expert's most over-represented tokens in the first and the last MoE layer."""
    rows = []
    layers = sorted({0, len(top.by_lift) - 1})
    for l in layers:
        for e, (ids, lifts) in enumerate(zip(top.by_lift[l], top.lift[l])):
            shown = [f"{decode(int(t)) if decode else t} ({fmt(x, '.1f')}x)"
                     for t, x in zip(ids[:n], lifts[:n]) if int(t) >= 0]
            rows.append([l, e, ", ".join(shown) or "none seen often enough"])
    return Table(["layer", "expert", "tokens by lift (share in the expert over base rate; 1x = no preference)"],
                 rows, "Top tokens per expert, first and last MoE layer.")


def coactivation_section(results: dict[str, Any]) -> Section:
    co = results["coactivation"]
    fig = F.coactivation_heatmap(co)
    if fig is None:
        return Section("Co-activation", "Which experts a token picks together (OLMoE).", [Note(
            "No layer has expert pairs (one expert, or top-1 routing): no co-activation.")])
    rows = [[l, fmt_estimate(e, ".3f"), fmt(e.p, ".3f"), fmt(co.uniform_p[l], ".3f")]
            for l, e in enumerate(co.strongest) if e.value == e.value]
    return Section("Co-activation", "Which experts a token picks together (OLMoE).", [
        FigureBlock(fig, "Cell (i, j) is P(j | i), the share of tokens routed to expert i that also chose j, minus "
                    "its null: every token drawing k distinct experts independently, at weights fitted to the "
                    "layer's load (white = the null; red pairs fire together more often than load alone gives). "
                    "All pairs of a token's top-k are counted (OLMoE's paper), not only adjacent ranks (its code)."),
        Table(["layer", "strongest P(j | i) [95% interval] (null ± sd)", "p", "uniform top-k (reference)"], rows,
              f"Intervals: bootstrap over sequences ({_n(co.strongest, 'n_bootstrap')} replicates); null: "
              f"{_n(co.strongest, 'n_permutations')} load-matched draws.")])


def _n(estimates: Sequence[Any], what: str) -> int:
    return max((getattr(e, what) for e in estimates), default=0)


def drops_section(results: dict[str, Any]) -> Section:
    sim = results.get("drops_simulated")
    blocks: list[Any] = [FigureBlock(
        F.drop_curves(results["drops"], sim, results.get("drops_queue"), results.get("drops_simulated_queue")),
        "Share of routed choices dropped by capacity in each position bucket (and each turn where the data has "
        "turns). Dotted: the queue-only baseline, the same recorded choices re-simulated at the same capacity, "
        "formula and policy after shuffling each sequence's chosen sets across its positions; the gap between "
        "a curve and its dotted baseline is what position-dependent routing adds. Shaded: 95% bootstrap intervals "
        "over sequences of the observed curves.")]
    rows = []
    for what, key in (("trained capacity", "queue:trained"), ("re-simulated", "queue:simulated")):
        q = results.get(key)
        if q is not None:
            rows.append([what, fmt_estimate(q.observed_rise, "+.4f", null=False),
                         fmt_estimate(q.queue_rise, "+.4f", null=False), fmt(q.explained, ".0%"),
                         fmt_estimate(q.excess, "+.4f", null=False)])
    if rows:
        blocks.append(Table(["drops", "rise: last minus first quarter of positions", "queue-only rise",
                             "explained by the queue", "excess over the queue"], rows,
                            "Rises with 95% bootstrap intervals over sequences (the excess pairs each replicate's "
                            "observed and queue-only profile)."))
    else:
        blocks.append(Note("No queue-only baseline: the trace records no capacity setting and none was simulated."))
    return Section("Token drops by position", "OpenMoE's drop towards the end: choices that found their "
                   "expert full, as a function of the position in the sequence.", blocks)


def gates_section(results: dict[str, Any], scoring: str = "softmax") -> Section:
    """`scoring`: how the router turns logits into scores (a trace's `scoring_function`; moelab's own
    routers and traces without the key: softmax). Other scores do not sum to 1, and the table says what
    each statistic then measures."""
    g = results["gates"]
    softmax = scoring == "softmax"
    blocks: list[Any] = [] if softmax else [Note(
        f"This router scores experts with {scoring}, whose scores do not sum to 1 over the experts: gate "
        "entropy here is the entropy of each token's scores normalised to sum to 1 (still against log E), inner "
        "balance the ratio of the two largest raw scores, and outer balance the sum of the top-k raw scores, "
        "which is not a share of probability mass, so it has no uniform-router value.")]
    if g.cross_layer_mi is None:
        blocks.append(Note("The trace has no `probs` column: no cross-layer MI or gate entropy."))
    else:
        blocks.append(FigureBlock(F.cross_layer_mi_heatmap(g),
                                  "Left, RMoE's mutual information between two layers' binned routing distributions "
                                  "per token; right, its excess over shuffling one layer's experts within each "
                                  "token (white = no more shared information than chance)."))
    rows = []
    for l in range(len(g.null_gate_entropy)):
        ent = g.gate_entropy_median[l] if g.gate_entropy_median is not None else None
        rows.append([l, fmt(ent), fmt(g.null_gate_entropy[l]), fmt(g.inner_balance_median[l]),
                     fmt(g.null_inner_balance), fmt(g.outer_balance_median[l]),
                     fmt(g.null_outer_balance[l] if softmax else None)])
    blocks.append(Table(["layer", "gate entropy (median)", "uniform: log E", "inner balance top1/top2",
                         "null", "outer balance sum top-k", "null k/E"], rows,
                        "Gate statistics per layer (medians over tokens) beside their uniform-router values."))
    return Section("Routing distributions", "How sharp the router's distribution is, and how much one layer's "
                   "routing tells about the next (RMoE).", blocks)


def dynamic_section(results: dict[str, Any]) -> Section | None:
    dyn = results.get("dynamic")
    if dyn is None or (dyn.rank_counts is None and dyn.mean_angular is None and dyn.mean_density is None):
        return Section("Expert outputs", blocks=[Note(
            "The trace has no all-experts columns (trace with --all-experts): no output-norm analysis.")])
    blocks: list[Any] = []
    if dyn.rank_counts is not None:
        blocks.append(FigureBlock(F.rank_table_heatmap(dyn),
                                  "Row r, column n: the share of experts at router-score rank r whose output norm "
                                  "ranks n (0 = largest); white is 1/E, what independent ranks give, so a red "
                                  "diagonal means the router picks the experts with the largest outputs."))
    if dyn.mean_angular is not None or dyn.mean_density is not None:
        blocks.append(FigureBlock(F.output_similarity(dyn),
                                  "Mean angular similarity of two experts' outputs on the same token per layer "
                                  "(dashed 0.5 = unrelated), and the share of active intermediate units (1 = dense)."))
    return Section("Expert outputs", "Every expert run on the real hidden state (A Closer Look's dynamic analyses).",
                   blocks)


def routing_sections(results: dict[str, Any], labels: Sequence[str], bucket: int,
                     decode: Callable[[int], str] | None = None, scoring: str = "softmax") -> list[Section]:
    out = []
    if "intervals" in results.get("skipped", {}):
        out.append(Section("Intervals", blocks=[Note(results["skipped"]["intervals"])]))
    if "rank" in results.get("skipped", {}):  # analysis/rankorder.py: rank 0 is not the top-1 choice
        out.append(Section("Rank order", blocks=[Note(results["skipped"]["rank"])]))
    if "load" in results:
        out.append(load_section(results))
    if "tables" in results:
        out.append(specialisation_section(results, labels, bucket, decode))
    if "coactivation" in results:
        out.append(coactivation_section(results))
    if "drops" in results:
        out.append(drops_section(results))
    if "gates" in results:
        out.append(gates_section(results, scoring))
    elif "gates" in results.get("skipped", {}):
        out.append(Section("Routing distributions", blocks=[Note(results["skipped"]["gates"])]))
    if "probs" in results.get("skipped", {}):
        out.append(Section("Without full probabilities", "What this trace cannot answer, and why.",
                           [Note(results["skipped"]["probs"])]))
    if "dynamic" in results:
        out.append(dynamic_section(results))
    return out


def early_section(early: Any, final_step: Any, paths: Sequence[str]) -> Section:
    rows = [[s, p] for s, p in zip(list(early.steps) + [final_step], paths)]
    return Section("Early routing learning", "Is the routing fixed early in training? Every checkpoint routes the "
                   "same tokens and is compared with the final checkpoint (OpenMoE, OLMoE's router saturation).", [
                       FigureBlock(F.early_routing_curves(early, final_step),
                                   "Top-1 agreement and top-k overlap with the final checkpoint (1 = identical) and "
                                   "the JS divergence of each token ID's expert distribution (0 = identical), per "
                                   "layer. Dashed black: the null, unrelated checkpoints with their own loads "
                                   "(token identity shuffled between the checkpoint and the final one), mean over "
                                   "layers; dotted grey: two independent uniform routings, the noise floor of "
                                   "identical routers, not a chance level."),
                       early_table(early),
                       Table(["checkpoint step", "trace"], rows)])


def comparison_section(headlines: dict[str, list[Headline]]) -> Section:
    """A table of the headline numbers, one column per model, with the null beside each value."""
    keys: dict[str, str] = {}
    for hs in headlines.values():
        for h in hs:
            keys.setdefault(h.key, h.label)
    rows = []
    for key, label in keys.items():
        row: list[Any] = [label]
        for hs in headlines.values():
            h = next((h for h in hs if h.key == key), None)
            null = "" if h is None or h.null is None else f" (null {fmt(h.null, '.3g')})"
            row.append("n/a" if h is None else f"{fmt(h.value, '.3g')}{null}")
        rows.append(row)
    return Section("Comparison", "The headline numbers side by side; each value is followed by its null "
                   "(uniform routing, shuffled labels or random init).",
                   [Table(["metric"] + list(headlines), rows)])

