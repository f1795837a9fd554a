"""OLMoE's routing analyses on the trained tiny-moe: router saturation over checkpoints, vocabulary
specialisation and domain specialisation (one row each, each against its own load-keeping null)."""

from __future__ import annotations

import dataclasses

import numpy as np

from moelab.claims.record import ClaimResult
from moelab.claims.registry import row
from moelab.claims.routing import (checkpoint_traces, describe_run, final_models, measure_of, over_seeds,
                                   routing_metrics)
from moelab.claims.rows_openmoe import agreement_over_seeds, early_curve, halfway_step, halfway_text
from moelab.claims.seeds import PAIRED_T
from moelab.claims.verdict import Claim
from moelab.claims.workspace import Workspace

VOCAB_MARGIN = 0.1  # rescaled units: a tenth of the way from random to perfect, beyond the null
DOMAIN_MARGIN = 0.05  # share of a domain's tokens: 5 points beyond the shuffled-domain null


@row("olmoe-saturation", "OLMoE")
def saturation(ws: Workspace) -> ClaimResult:
    m = routing_metrics(ws)
    traces = checkpoint_traces(ws)
    overlap, values, per_seed = agreement_over_seeds(ws, 0.1, "overlap")
    step = per_seed[0]["step"]
    curve = early_curve(m["early"]["result"])
    margin = (1 - overlap.null) / 2
    k = m["meta"]["top_k"]
    n = ws.scale.seeds
    return ClaimResult(
        row="olmoe-saturation", paper="OLMoE",
        claim="Router saturation: early in training a token's top-k experts are already largely those of the "
              "final checkpoint, and the overlap rises over training.",
        paper_number="OLMoE-1B-7B (top-8 of 64): about 60% saturation at 1% of pretraining, rising over training.",
        measured=f"Saturation = mean over held-out tokens of |TopK_t & TopK_final| / k (k = {k}) between the "
                 f"earliest snapshot (step {step}, {step / ws.scale.steps:.0%} of training) and the final "
                 "checkpoint, mean over MoE layers, per seed. Null: unrelated checkpoints with their own loads "
                 f"(token identity shuffled between the two), {PAIRED_T} Details: seed 0's curve over all snapshots (per layer, with nulls) and "
                 "its rise from the first to the last snapshot.",
        measure=overlap, test=Claim("greater", margin=margin), seed_values=values,
        setup=f"{describe_run(ws, seeds=n)}; {len(traces) - 1} snapshots and the final checkpoint traced over the "
              "same held-out tokens.",
        seeds=n,
        details={"step": step, "per_seed": per_seed, "curve_seed0": curve,
                 "rise_first_to_last_snapshot_seed0": curve[-1]["topk_overlap_mean"] - curve[0]["topk_overlap_mean"],
                 "rises_every_snapshot_seed0": bool(np.all(np.diff([c["topk_overlap_mean"] for c in curve]) > 0)),
                 "halfway_step_seed0": halfway_step(curve, "topk_overlap")},
        note=f"Margin (1 - null) / 2 = {margin:.3f}: OLMoE's 60% with top-8 of 64 (chance 12.5%) is about half of "
             f"the way from chance to the final routing, so the claim needs half the way here. Our earliest "
             f"snapshot is {step / ws.scale.steps:.0%} of a {ws.scale.steps}-step run, not 1% of trillions of "
             "tokens: at this scale the row asks whether routing settles within the first tenth of training; "
             f"for seed 0, {halfway_text(halfway_step(curve, 'topk_overlap'), ws.scale.steps)}.")


@row("olmoe-vocab-specialisation", "OLMoE")
def vocab_specialisation(ws: Workspace) -> ClaimResult:
    m = routing_metrics(ws)
    heads, analyses = m["headline"], m["analyses"]
    vocab, vocab_seeds, vocab_each = over_seeds(final_models(ws), "vocab_specialisation")
    v = analyses["vocab"]
    per_layer = [{"layer": i, "rescaled": e["value"], "ci": [e["ci_low"], e["ci_high"]], "null": e["null_mean"],
                  "uniform": u} for i, (e, u) in enumerate(zip(v["estimates"], v["uniform_rescaled"]))]
    return ClaimResult(
        row="olmoe-vocab-specialisation", paper="OLMoE",
        claim="Experts specialise on the vocabulary: each token ID goes mostly to the same expert.",
        paper_number="OLMoE-1B-7B shows strong vocabulary specialisation (a figure per layer); PAPERS.md gives the "
                     "definition, no single number.",
        measured="Vocabulary specialisation, OLMoE's definition: per token ID seen >= 10 times, max_e count(v, e) / "
                 "n(v) over its top-k choices, averaged over token IDs, rescaled (p - k/E) / (1 - k/E) so 0 is "
                 "random and 1 perfect; mean over MoE layers. Null: token IDs shuffled among the tokens of "
                 f"each sequence (keeps each sequence's routing, expert load and each ID's count), {PAIRED_T}",
        measure=vocab, test=Claim("greater", margin=VOCAB_MARGIN), seed_values=vocab_seeds,
        setup=f"{describe_run(ws, seeds=ws.scale.seeds)}; every held-out token of each final checkpoint traced at "
              "the trained capacity.",
        seeds=ws.scale.seeds,
        details={"per_layer": per_layer, "per_seed": vocab_each,
                 # absent where the traced tokens hold one domain: the domain row says why, this one goes on
                 "domain_max_share": (dataclasses.asdict(measure_of(heads["max_share:domain"]["estimate"]))
                                      if "max_share:domain" in heads else None)},
        note=f"Margin {VOCAB_MARGIN} (rescaled): a tenth of the way from random to perfect beyond the null. The null "
             "sits above uniform routing because an ID seen few times shows a max share above k/E by chance.")


@row("olmoe-domain-specialisation", "OLMoE")
def domain_specialisation(ws: Workspace) -> ClaimResult:
    m = routing_metrics(ws)
    heads, analyses = m["headline"], m["analyses"]
    dom, dom_seeds, dom_each = over_seeds(final_models(ws), "max_share:domain")
    d = analyses["domain_specialisation:domain"]
    names = d["names"][0]
    per_domain = {name: [float(np.max(layer[g])) for layer in d["share"]] for g, name in enumerate(names)}
    return ClaimResult(
        row="olmoe-domain-specialisation", paper="OLMoE",
        claim="Experts specialise on domains: a domain's tokens go to some experts far more than the uniform k/E.",
        paper_number="OLMoE-1B-7B: experts specialise on arXiv and GitHub tokens (a figure of per-expert shares "
                     "against k/E); no single number.",
        measured="Domain specialisation, OLMoE's definition: per domain and expert the share of the domain's tokens "
                 "with the expert in their top-k; value: per domain the largest share over experts, averaged over "
                 "domains and MoE layers. Null: the domain label shuffled across documents (keeps each "
                 f"document's routing whole, the expert load and each domain's number of documents), {PAIRED_T} "
                 "The expert-domain mutual information is in details (seed 0).",
        measure=dom, test=Claim("greater", margin=DOMAIN_MARGIN), seed_values=dom_seeds,
        setup=f"{describe_run(ws, seeds=ws.scale.seeds)}; domains {', '.join(names)}; every held-out token of each "
              "final checkpoint.",
        seeds=ws.scale.seeds,
        details={"per_domain_max_share_by_layer": per_domain, "per_seed": dom_each, "uniform_k_over_E": d["uniform"],
                 "mi_domain": dataclasses.asdict(measure_of(heads["mi:domain"]["estimate"])),
                 "vocab_specialisation": dataclasses.asdict(measure_of(heads["vocab_specialisation"]["estimate"]))},
        note=f"Margin {DOMAIN_MARGIN}: a domain's favourite expert must take 5 points more of its tokens than under a "
             "shuffled domain label (uniform routing gives k/E). The corpus' domains are "
             f"{', '.join(names)}; the UI strings in German, French and Japanese count as prose.")
