"""docs/CLAIMS.md from the rows' results: a summary table grouped by paper, then one paragraph per row."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

from moelab.claims.preconditions import NONE_NEEDED
from moelab.claims.record import ClaimResult
from moelab.claims.scale import GROUPS
from moelab.claims.verdict import VERDICTS

PAPERS = ("OpenMoE", "RMoE", "A Closer Look", "OLMoE", "Sparse upcycling", "Interventions")

HEADER = """# The papers' claims, measured

Each row states a claim of OpenMoE, RMoE, A Closer Look or OLMoE (or a question the interventions answer),
what the paper reports, moelab's measurement on models trained on this machine, and a verdict that follows
mechanically from the 95% interval, the null and the claim's margin (`src/moelab/claims/verdict.py`).
Every claim here is about trained models, so the interval is a Student t interval over the per-seed values
(one value per independently trained model; `seeds.t_interval`, whose coverage is simulated in
tests/claims/test_seed_coverage.py): a row with fewer than 3 seeds says **too few seeds** and signs
nothing (one run's interval covers held-out text, not training runs). A row whose declared precondition
(the regime its claim is about) is measured and unmet says **not testable here**, with the numbers. A
"stopped moving" precondition is an equivalence test (`preconditions.settled`): the 90% interval of the
late learning curve's slope, times the last 20% of training, must lie inside a stated tolerance (a loss
gap's: the row's margin), so a curve too noisy to show it has stopped fails it.
Otherwise: **reproduced** when the whole interval lies beyond the null in the claimed direction and the
value clears the margin, **not reproduced** when the interval rules out an effect of the margin's size (or
lies on the wrong side), **inconclusive** otherwise. The models are tiny (a few million parameters, minutes
of training on 2 CPU cores), so a verdict is about this scale; each row's note says what that does.

Written by `python benchmarks/claims.py --table-only --write-docs` from the JSON results in `docs/claims/`
(the verdicts are recomputed from the stored per-seed values on every render); re-run one row with the
command in its detail (results go to a scratch folder unless `--write-docs`).

Your own model: `python benchmarks/claims.py --hf PATH [PATH...]` (`moelab.claims.byo_run.run_byo`) runs
the rows that read one model's routing (openmoe-context-independent, olmoe-vocab-specialisation,
olmoe-domain-specialisation, closer-norm-preference; given several checkpoints of one run in training
order, also olmoe-saturation and openmoe-early-routing) on a transformers MoE model or a moelab
checkpoint, with these rows' statistics, nulls and margins, on the claims corpus tokenized by the model's
own tokenizer (`--tokens N`: N held-out tokens shared among its domains, not the split's first N). Results
go to claims-scratch/hf/<model>/ (never docs/), naming each model by a hash of its files. One model is one
seed: its verdict is **too few seeds**, because its interval covers held-out text, not training runs.
A separate column, "this model", reads the same rule on that interval (beyond the null
by the margin, short of the margin, undecided): a property of that model on this text, which is what the
papers' own one-model figures show, not evidence about a way of training. With `--seeds` the PATHs are
independently trained runs of one recipe and each row takes this table's rule over them (3 or more sign a
verdict). A brought checkpoint carries no loss curve, so early routing's precondition is unmeasured there.
"""


def fmt(v: float, unit: str = "") -> str:
    if v is None or not math.isfinite(v):
        return "n/a"
    a = abs(v)
    s = f"{v:.0f}" if a >= 1000 else f"{v:.3g}" if a >= 0.01 or a == 0 else f"{v:.2e}"
    return s + unit


def cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def summary_line(r: ClaimResult) -> str:
    m, u = r.measure, r.unit
    value = f"{fmt(m.value)} [{fmt(m.ci_low)}, {fmt(m.ci_high)}]{u}"
    null = fmt(m.null) + (f" ± {fmt(m.null_sd)}" if m.null_sd is not None and math.isfinite(m.null_sd) else "")
    sign = ">" if r.test.direction == "greater" else "<"
    need = f"{sign} null" + (f" by {fmt(r.test.margin, u)}" if r.test.margin else "")
    return (f"| [{r.row}](#{r.row}) | {cell(r.claim)} | {cell(r.paper_number)} | {value} | {null} | {need} | "
            f"**{r.verdict}** | {r.seeds} |")


def details(r: ClaimResult) -> str:
    secs = ("" if not math.isfinite(r.seconds) else
            f" Wall time of its last run: {r.seconds / 60:.1f} min (training it found cached not repeated).")
    lines = [f"### {r.row}", "", f"**Claim ({r.paper}).** {r.claim} Paper: {r.paper_number}", "",
             f"**Measured.** {r.measured}", "", f"**Setup.** {r.setup} Seeds: {r.seeds}.{secs}", "",
             *([f"**Precondition.** Needs {r.precondition.needs}; measured {r.precondition.measured} "
                f"({'met' if r.precondition.met else 'unmet'}).", ""] if r.precondition else
               [f"**Precondition.** None: {NONE_NEEDED[r.row]}.", ""] if r.row in NONE_NEEDED else []),
             f"**Per-seed values.** {', '.join(fmt(v) for v in r.seed_values) or 'none stored'}.", "",
             f"**Verdict: {r.verdict}**: {r.reason}." + (f" {r.note}" if r.note else ""), "",
             f"Re-run: `{r.command}`", ""]
    return "\n".join(lines)


def replica_section(rows: Sequence[ClaimResult], replica: Mapping[str, ClaimResult], about: str) -> list[str]:
    """A second full run beside the first: which verdicts held, which moved (seed and thread sensitivity).
    Only rows whose two runs have per-seed values over as many seeds are compared; the others (the second
    run had fewer seeds, or stored a statistic the row no longer reads) are named, not counted."""
    both = [r for r in rows if r.row in replica]
    same = [r for r in both if replica[r.row].seed_values and len(replica[r.row].seed_values) == len(r.seed_values)]
    apart = [r for r in both if r not in same]
    moved = [r for r in same if replica[r.row].verdict != r.verdict]
    out = ["## A second run", "", f"{about} {len(same) - len(moved)} of {len(same)} comparable verdicts held"
           + (f"; these moved: {', '.join(r.row for r in moved)}." if moved else ".")
           + " A verdict that moves rests on an interval too close to its null or margin for this many seeds."
           + (f" Not compared ({len(apart)}; the second run has fewer seeds than this one, or no per-seed values of "
              f"the statistic the row reads now): {', '.join(r.row for r in apart)}." if apart else ""), "",
           "| row | verdict | value [95% CI] | second run: verdict | value [95% CI] |", "|---|---|---|---|---|"]
    for r in same:
        a, b = r.measure, replica[r.row].measure
        flag = "**" if r in moved else ""
        out.append(f"| {r.row} | {r.verdict} | {fmt(a.value)} [{fmt(a.ci_low)}, {fmt(a.ci_high)}] | "
                   f"{flag}{replica[r.row].verdict}{flag} | {fmt(b.value)} [{fmt(b.ci_low)}, {fmt(b.ci_high)}] |")
    return out + [""]


def changed_section(rows: Sequence[ClaimResult]) -> list[str]:
    """The rows whose verdict differs from the one stored with their result (decided under an older rule)."""
    moved = [r for r in rows if r.previous_verdict and r.previous_verdict != r.verdict]
    if not moved:
        return []
    out = ["## Verdicts changed by the current rule", "",
           "The stored results were decided by an older rule (a percentile bootstrap over seeds and sequences; "
           "one- and two-seed rows signed, no precondition; then a \"settled\" precondition asking only that a late "
           "slope interval hold 0). Re-decided from the same stored numbers: a t-interval over seeds, at least 3 "
           "seeds, and a declared precondition that a stored result predating it cannot meet (a settled check "
           "decided by the older rule counts as unmet: it cannot show a curve has stopped):", "",
           "| row | stored verdict | now | why |", "|---|---|---|---|"]
    out += [f"| {r.row} | {r.previous_verdict} | **{r.verdict}** | {cell(r.reason)} |" for r in moved]
    return out + [""]


GPU_COMMAND = "python benchmarks/claims.py --scale gpu --only GROUP --device cuda --write-docs"
GPU_WAITING = ("**GPU scale: waits for a GPU.** The `gpu` profile trains every model on 5-19x the tokens above "
               "(15.7M per tiny model) from `python-large`, a corpus of about 55M tokens built offline from the "
               "installed stdlib and 18 named packages (deduplicated, docstrings as prose, held-out split by file, "
               "a content fingerprint); method, measured sizes and the time plan in `docs/claims-gpu/README.md`. "
               f"When a GPU is lent, one row group per run: `{GPU_COMMAND}` (GROUP: {', '.join(GROUPS)}).\n")


def _value(r: ClaimResult) -> str:
    m = r.measure
    return f"{fmt(m.value)} [{fmt(m.ci_low)}, {fmt(m.ci_high)}]{r.unit}"


def gpu_section(rows: Sequence[ClaimResult], gpu: Mapping[str, ClaimResult], about: str) -> list[str]:
    """The two scales side by side: each row's CPU-scale and GPU-scale value and verdict."""
    names = [r.row for r in rows] + sorted(set(gpu) - {r.row for r in rows})
    cpu = {r.row: r for r in rows}
    out = ["## Both scales", "", f"{about} Each scale's verdict follows from its own per-seed values by the same "
           "rule; a verdict that differs between the scales is in bold. GPU rows' setups are in "
           "`docs/claims-gpu/` (each result's `setup`).", "",
           "| row | CPU scale: value [95% CI] | verdict | GPU scale: value [95% CI] | verdict | GPU seeds |",
           "|---|---|---|---|---|---|"]
    for n in names:
        a, b = cpu.get(n), gpu.get(n)
        moved = a is not None and b is not None and a.verdict != b.verdict
        mark = "**" if moved else ""
        out.append(f"| {n} | {_value(a) if a else 'not run'} | {a.verdict if a else '-'} | "
                   f"{_value(b) if b else 'not run'} | {mark}{b.verdict if b else '-'}{mark} | "
                   f"{b.seeds if b else '-'} |")
    return out + [""]


def audit_section(rows: Sequence[ClaimResult], audit: Mapping[str, Any]) -> list[str]:
    """Every row whose verdict differs from the table an audit read (`audit`: {"commit", "about",
    "verdicts": {row: verdict}}), old -> new, and the rows added since."""
    then = audit.get("verdicts", {})
    moved = [r for r in rows if r.row in then and then[r.row] != r.verdict]
    added = [r for r in rows if r.row not in then]
    if not moved and not added:
        return []
    out = ["## Since the audit", "",
           f"Against {audit.get('about', 'the audited table')} (commit {audit.get('commit', '?')}): "
           f"{len(moved)} of {sum(r.row in then for r in rows)} verdicts changed, {len(added)} rows added.", "",
           "| row | at the audit | now |", "|---|---|---|"]
    out += [f"| {r.row} | {then[r.row]} | **{r.verdict}** |" for r in moved]
    out += [f"| {r.row} | (new row) | **{r.verdict}** |" for r in added]
    return out + [""]


def read_audit(path: str | Path) -> dict[str, Any]:
    """The audited verdicts file ({} when absent); a damaged one is one line naming it."""
    import json

    from moelab.config import MoelabError

    path = Path(path)
    if not path.is_file():
        return {}
    try:
        d = json.loads(path.read_text())
        if not isinstance(d.get("verdicts"), dict):
            raise ValueError("no verdicts table")
        return d
    except (ValueError, UnicodeDecodeError, AttributeError) as e:
        raise MoelabError(f"{path}: not an audit verdicts file ({e})") from None


def render(results: Mapping[str, ClaimResult], order: Sequence[str],
           replica: Mapping[str, ClaimResult] | None = None, replica_about: str = "",
           gpu: Mapping[str, ClaimResult] | None = None, gpu_about: str = "",
           audit: Mapping[str, Any] | None = None) -> str:
    """Rows in registry order, then any result whose row is no longer registered (marked as such);
    with `replica` (the same rows from a second full run) a section comparing the two runs' verdicts;
    with `gpu` (the rows at the gpu scale) the two scales side by side, without it one line saying the
    GPU scale waits for a GPU."""
    rows = [results[n] for n in order if n in results]
    rows += [r for n, r in sorted(results.items()) if n not in order]
    missing = [n for n in order if n not in results]
    out = [HEADER]
    counts = {v: sum(r.verdict == v for r in rows) for v in VERDICTS}
    out.append(f"{len(rows)} rows: " + ", ".join(f"{n} {v}" for v, n in counts.items()) + "."
               + (f" Not yet run: {', '.join(missing)}." if missing else "") + "\n")
    if not gpu:
        out.append(GPU_WAITING)
    for paper in PAPERS + tuple(sorted({r.paper for r in rows} - set(PAPERS))):
        group = [r for r in rows if r.paper == paper]
        if not group:
            continue
        out += [f"## {paper}", "",
                "| row | claim | paper | moelab: value [95% CI] | null | needs | verdict | seeds |",
                "|---|---|---|---|---|---|---|---|"]
        out += [summary_line(r) for r in group] + [""]
    out += changed_section(rows)
    if audit:
        out += audit_section(rows, audit)
    if gpu:
        out += gpu_section(rows, gpu, gpu_about)
    if replica:
        out += replica_section(rows, replica, replica_about)
    out += ["## Rows in detail", ""] + [details(r) for r in rows]
    return "\n".join(out).rstrip() + "\n"
