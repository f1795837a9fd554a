"""The CLAIMS.md of a brought model: the models and their fingerprints, then the one-model rows."""

from __future__ import annotations

import math
from typing import Mapping, Sequence

from moelab.claims.byo import Brought
from moelab.claims.record import ClaimResult
from moelab.claims.table import cell, details, fmt

HEADER = """# The papers' one-model claims, measured on a brought model

Written by `python benchmarks/claims.py --hf ...` into a scratch folder (never docs/). Each row is the
table's row of the same name (docs/CLAIMS.md), with its statistic, null and margin, measured on the model
below instead of moelab's tiny models; the interval is a 95% bootstrap over held-out sequences.

What one model can show: whether *this model*, on this text, lies beyond the null by the claim's margin
(column "this model": the table's interval rule read on the held-out-text interval). What it cannot show:
that the paper's claim holds for a way of training models, which needs several independently trained
ones; so one model's verdict is the table's rule at one seed, **too few seeds**, whatever the value. A
second training run of the same recipe can land elsewhere than this interval.
"""


SEEDS = """With `--seeds` the models are independently trained runs of one recipe: each row is the table's
rule over them (a t-interval over the per-model values; 3 or more sign a verdict), and the column "each
model" counts the models whose own held-out-text interval lies beyond the null by the margin.
"""


def models_table(models: Sequence[Brought], seeds: bool = False) -> list[str]:
    out = ["| # | model | kind | fingerprint (sha256 of its files) | MoE layers | experts | top-k |",
           "|---|---|---|---|---|---|---|"]
    for i, m in enumerate(models):
        role = "seed" if seeds else "final" if i == len(models) - 1 else "checkpoint"
        out.append(f"| {i} ({role}) | {cell(m.label)} | {m.kind} | `{m.fingerprint}` | {len(m.experts)} | "
                   f"{max(m.experts)} | {m.top_k or 'n/a'} |")
    return out + [""]


def summary_line(r: ClaimResult) -> str:
    m = r.measure
    null = fmt(m.null) + (f" ± {fmt(m.null_sd)}" if m.null_sd is not None and math.isfinite(m.null_sd) else "")
    sign = ">" if r.test.direction == "greater" else "<"
    need = f"{sign} null" + (f" by {fmt(r.test.margin)}" if r.test.margin else "")
    return (f"| [{r.row}](#{r.row}) | {cell(r.claim)} | {fmt(m.value)} [{fmt(m.ci_low)}, {fmt(m.ci_high)}] | {null} | "
            f"{need} | {r.details['this_model']['reading']} | **{r.verdict}** |")


def render_byo(models: Sequence[Brought], results: Sequence[ClaimResult], skipped: Mapping[str, str],
               seeds: bool = False) -> str:
    out = [HEADER] + ([SEEDS] if seeds else []) + ["## Models", ""] + models_table(models, seeds)
    head = "value [95% CI over seeds] | null | needs | each model" if seeds else \
        "value [95% CI, held-out text] | null | needs | this model"
    out += ["## Rows", "", f"| row | claim | {head} | verdict |", "|---|---|---|---|---|---|---|"]
    out += [summary_line(r) for r in results] + [""]
    if skipped:
        out += ["Not measured:", ""] + [f"- {row}: {why}" for row, why in skipped.items()] + [""]
    out += ["## Rows in detail", ""]
    for r in results:
        this = r.details["this_model"]
        out += [details(r), f"{'Each model' if seeds else 'This model'}: {this['reading']} ({this['reason']}).", ""]
    return "\n".join(out).rstrip() + "\n"
