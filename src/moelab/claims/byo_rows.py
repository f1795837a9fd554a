"""The one-model rows on a brought model, with the table's statistics, nulls and margins.

What one model can show. The table's claims are about training: a recipe gives models that specialise,
saturate, prefer large norms. One model is one draw of that recipe, so its verdict is the table's rule at
one seed, "too few seeds": its interval covers the held-out text, not other training runs (the audit saw
4 of 5 one-seed values fall outside their intervals on a rerun). What it does show is a property of this
model on this text; the row says so apart from the verdict, as "this model": the table's interval rule
read on the held-out-text interval (beyond the null by the margin / short of the margin / undecided),
never the words reproduced or not reproduced.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from moelab.claims.record import ClaimResult
from moelab.claims.seeds import null_paired
from moelab.claims.verdict import INCONCLUSIVE, NOT_REPRODUCED, REPRODUCED, Claim, Measure, Precondition, verdict

READING = {REPRODUCED: "beyond the null by the margin", NOT_REPRODUCED: "short of the margin",
           INCONCLUSIVE: "undecided"}


def _result(row: str, paper: str, claim: str, measured: str, measure: Measure, test: Claim, setup: str,
            command: str, details: dict[str, Any], note: str, precondition: Precondition | None = None) -> ClaimResult:
    r = ClaimResult(row=row, paper=paper, claim=claim, paper_number="see the table's row of this name "
                    "(docs/CLAIMS.md)", measured=measured, measure=measure, test=test, setup=setup, seeds=1,
                    details=details, note=note, command=command, seed_values=[measure.value],
                    precondition=precondition)
    reading, why = verdict(r.measure, r.test)
    r.details["this_model"] = {"reading": READING[reading], "reason": why}
    return r


def unmeasurable(m: dict[str, Any], min_count: int) -> dict[str, str]:
    """The specialisation rows the traced tokens cannot give a number for, and why."""
    heads, out = m["headline"], {}
    few = (f"no token ID is seen {min_count} times in the traced tokens: trace more of the held-out split "
           "(--tokens; 0 is all of it)")
    if "std_token" not in heads or "std_position" not in heads:
        out["openmoe-context-independent"] = few
    if "vocab_specialisation" not in heads:
        out["olmoe-vocab-specialisation"] = few
    if "max_share:domain" not in heads:
        names = sorted({n for layer in m["analyses"].get("domain_specialisation:domain", {}).get("names", [])
                        for n in layer})
        out["olmoe-domain-specialisation"] = (
            f"the traced tokens hold {len(names)} domain(s) ({', '.join(names) or 'none'}): domain specialisation "
            "needs the held-out text of two or more (a --tokens budget is shared among the split's domains)")
    return out


def specialisation_rows(m: dict[str, Any], setup: str, command: str, skip: Sequence[str] = ()) -> list[ClaimResult]:
    """Context independence (token vs position), vocabulary and domain specialisation of the final model,
    from its metrics.json entry (the analyses the table's rows read); the rows in `skip` are left out."""
    heads, analyses = m["headline"], m["analyses"]
    interval = "95% interval: bootstrap over held-out sequences."
    out = []
    if "openmoe-context-independent" not in skip:
        out.append(_context(heads, analyses, interval, setup, command))
    if "olmoe-vocab-specialisation" not in skip:
        out.append(_vocab(heads, analyses, interval, setup, command))
    if "olmoe-domain-specialisation" not in skip:
        out.append(_domain(heads, analyses, interval, setup, command))
    return out


def _context(heads, analyses, interval: str, setup: str, command: str) -> ClaimResult:
    from moelab.claims.routing import measure_of
    from moelab.claims.rows_openmoe import CONTEXT_MARGIN
    from moelab.claims.stats import excess_gap

    tok, pos = measure_of(heads["std_token"]["estimate"]), measure_of(heads["std_position"]["estimate"])
    ceiling = float(np.nanmean(analyses["std_token"]["deterministic"]))
    gap = excess_gap(tok, pos, scale=ceiling)
    return (
        _result("openmoe-context-independent", "OpenMoE",
                "Routing is context-independent: experts specialise on token IDs well above positions.",
                "OpenMoE's std score, token IDs minus positions, each as its excess over its own label-shuffled "
                f"null, over the ceiling of a router that always picks the same k experts (ceiling {ceiling:.3g}); "
                f"null 0. {interval}", gap, Claim("greater", margin=CONTEXT_MARGIN), setup, command,
                {"token_std": dataclasses.asdict(tok), "position_std": dataclasses.asdict(pos), "ceiling": ceiling},
                f"Margin {CONTEXT_MARGIN} of the ceiling, as the table's row."))


def _vocab(heads, analyses, interval: str, setup: str, command: str) -> ClaimResult:
    from moelab.claims.routing import measure_of
    from moelab.claims.rows_olmoe import VOCAB_MARGIN

    vocab = measure_of(heads["vocab_specialisation"]["estimate"])
    return (
        _result("olmoe-vocab-specialisation", "OLMoE",
                "Experts specialise on the vocabulary: each token ID goes mostly to the same expert.",
                "OLMoE's vocabulary specialisation, rescaled (p - k/E) / (1 - k/E), mean over MoE layers; null: "
                f"{heads['vocab_specialisation']['estimate'].get('null') or 'token IDs shuffled'}. {interval}",
                vocab, Claim("greater", margin=VOCAB_MARGIN), setup, command,
                {"per_layer": [e["value"] for e in analyses["vocab"]["estimates"]]},
                f"Margin {VOCAB_MARGIN} (rescaled), as the table's row."))


def _domain(heads, analyses, interval: str, setup: str, command: str) -> ClaimResult:
    from moelab.claims.routing import measure_of
    from moelab.claims.rows_olmoe import DOMAIN_MARGIN

    dom = measure_of(heads["max_share:domain"]["estimate"])
    d = analyses["domain_specialisation:domain"]
    return (
        _result("olmoe-domain-specialisation", "OLMoE",
                "Experts specialise on domains: a domain's tokens go to some experts far more than k/E.",
                "Per domain the largest share of its tokens any expert has in its top-k, mean over domains and "
                f"MoE layers; null: the domain label shuffled across documents (each document's routing kept whole). {interval}",
                dom, Claim("greater", margin=DOMAIN_MARGIN), setup, command,
                {"domains": d["names"][0], "uniform_k_over_E": d["uniform"]},
                f"Margin {DOMAIN_MARGIN}, as the table's row."))


def saturation_rows(traces: Sequence[Path], labels: Sequence[str], early: dict[str, Any], setup: str,
                    command: str) -> list[ClaimResult]:
    """Top-k overlap (OLMoE's saturation) and top-1 agreement (OpenMoE's early routing) of the earliest
    checkpoint with the final one; every checkpoint's in details."""
    from moelab.claims.rows_openmoe import agreement_at, early_curve, halfway_step

    each = [agreement_at(list(traces), t) for t in traces[:-1]]
    curve = early_curve(early)
    per_ckpt = [{"checkpoint": lab, "top1": dataclasses.asdict(a["top1"]), "overlap": dataclasses.asdict(a["overlap"])}
                for lab, a in zip(labels, each)]
    unknown = Precondition("a snapshot whose training loss has made >= 90% of the run's drop",
                           "nothing: a brought checkpoint carries no training-loss curve", False)
    out = []
    for row, paper, key, what in (("olmoe-saturation", "OLMoE", "overlap", "top-k overlap |TopK_t & TopK_final| / k"),
                                  ("openmoe-early-routing", "OpenMoE", "top1", "top-1 agreement")):
        m = each[0][key]
        margin = (1 - m.null) / 2
        out.append(_result(
            row, paper, "Routing is settled early: an early checkpoint's token-to-expert choices already largely "
            "match the final checkpoint's.",
            f"The {what} of the earliest given checkpoint ({labels[0]}) with the final one ({labels[-1]}), over the "
            "same held-out tokens, mean over MoE layers; null: unrelated checkpoints with their own loads (token "
            "identity shuffled between the two). 95% interval: bootstrap over held-out sequences.",
            m, Claim("greater", margin=margin), setup, command,
            {"per_checkpoint": per_ckpt, "curve": curve,
             "halfway_step": halfway_step(curve, "topk_overlap" if key == "overlap" else "top1_agreement")},
            f"Margin (1 - null) / 2 = {margin:.3f}, as the table's row. How far into training each checkpoint "
            "is, and whether its loss had settled, is not known from the files: the caller's order is taken "
            "as training order. Two unrelated random tiny models sat 0.01-0.02 above this null with intervals "
            "excluding it (211k tokens): the token shuffle does not keep the chance coincidence of frequent "
            "tokens' choices, so only an excess of the margin's size means anything.", precondition=unknown if row == "openmoe-early-routing" else None))
    return out


def norm_row(trace: Path, setup: str, command: str) -> ClaimResult:
    """A Closer Look's norm preference on the final model's all-experts trace (one model: sequences only)."""
    from moelab.claims.heldout import two_level_bootstrap
    from moelab.claims.rmoe8 import trace_arrays
    from moelab.claims.rows_closer import norm_preference_of

    seq_T, cols = trace_arrays(trace, ("probs", "expert_norms"))
    seqs_S = np.unique(seq_T)
    counts_S = np.bincount(np.searchsorted(seqs_S, seq_T), minlength=len(seqs_S)).astype(float)
    sums_S, null_L, share_L, table = norm_preference_of(seq_T, seqs_S, cols)
    L, E = cols["probs"].shape[0], cols["probs"].shape[2]
    value, lo, hi = two_level_bootstrap(sums_S[None], counts_S * L)
    null = float(np.mean(null_L))
    null_sd = float(np.sqrt(null * (1 - null) / (L * counts_S.sum())))
    setup = f"{setup} All-experts pass over the first {int(counts_S.sum()):,} of those tokens."
    return _result(
        "closer-norm-preference", "A Closer Look",
        "The router tends to pick the experts whose outputs have the largest norm.",
        "Share of (token, layer) whose top-1 expert (router score) also has the largest unweighted output norm "
        "among all E routed experts run on the token; null: the top-1 choice shuffled across tokens, sum_e "
        "P(top-1 = e) P(largest norm = e) per layer; 95% interval: bootstrap over held-out sequences.",
        Measure(value, lo, hi, null, null_sd), Claim("greater", margin=1.0 / E), setup, command,
        {"share_per_layer": share_L.tolist(), "null_per_layer": null_L.tolist(), "tokens": int(counts_S.sum()),
         "rank_table": (table / table.sum(axis=1, keepdims=True)).round(4).tolist()},
        f"Margin 1/E = {1 / E:.4f}, as the table's row.")


def over_seeds(per_model: Sequence[Sequence[ClaimResult]], labels: Sequence[str], setup: str,
               command: str) -> list[ClaimResult]:
    """Each row over independently trained models: the table's rule (a t-interval over the per-model values,
    3 or more to sign a verdict, `record.ClaimResult`) against the models' mean null; each model's own
    held-out-text interval and reading in details.

    Each model has its own null (its own load), so a model's value is paired with it: the per-model value
    is its excess over its own null, shifted by the mean null (value_i - null_i + mean null) so that it
    reads in the value's units. A t-interval over raw values against the mean null counts the spread of
    the nulls as if it were none, and reads models that all sit at their own nulls as undecided."""
    out = []
    for r0 in per_model[0]:
        rs = [next((r for r in rows if r.row == r0.row), None) for rows in per_model]
        if any(r is None for r in rs):
            continue  # a row some model could not give a number for: named in the skipped list
        per_seed = [{"model": lab, **dataclasses.asdict(r.measure), "reading": r.details["this_model"]["reading"]}
                    for lab, r in zip(labels, rs)]
        paired, null = null_paired([r.measure.value for r in rs], [r.measure.null for r in rs])
        res = ClaimResult(
            row=r0.row, paper=r0.paper, claim=r0.claim, paper_number=r0.paper_number,
            measured=r0.measured.replace("95% interval: bootstrap over held-out sequences.",
                                         "Null: mean over the models. Per model, its value minus its own null plus "
                                         "that mean (each model paired with its own null). 95% interval: t over the "
                                         "models (seeds); each model's value, null and bootstrap over held-out "
                                         "sequences in details."),
            measure=dataclasses.replace(r0.measure, null=null), test=r0.test, setup=setup, seeds=len(rs),
            details={"per_seed": per_seed}, note=r0.note, command=command,
            seed_values=paired,
            precondition=r0.precondition)
        beyond = sum(p["reading"] == READING[REPRODUCED] for p in per_seed)
        res.details["this_model"] = {"reading": f"{beyond} of {len(rs)} beyond the null by the margin",
                                     "reason": "each model's own held-out-text interval read alone"}
        out.append(res)
    return out
