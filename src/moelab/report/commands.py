"""`moelab analyze`: traces (and checkpoints) -> one self-contained HTML report and metrics.json."""

from __future__ import annotations

import math

from moelab.config import MoelabError, positive_int

SUMMARY_LINES = 5


def register(sub) -> None:
    p = sub.add_parser("analyze", help="routing analyses of traces as one HTML report + metrics.json",
                       description="Analyse routing traces (docs/TRACE.md). Several traces are either "
                                   "checkpoints of one model (early routing against the last step) or "
                                   "different models, compared side by side.")
    p.add_argument("traces", nargs="+", metavar="TRACE", help="trace files (.parquet with .json sidecar)")
    p.add_argument("--out", required=True, help="folder for report.html and metrics.json")
    p.add_argument("--weights", nargs="+", default=None, metavar="CHECKPOINT",
                   help="checkpoint folders for the static weight analyses, one per model in TRACE order")
    p.add_argument("--names", nargs="+", default=None, metavar="NAME", help="a name per model, in TRACE order")
    p.add_argument("--early", nargs="+", action="append", default=None, metavar="TRACE",
                   help="traces of several checkpoints of one model (early routing); repeat the flag once "
                        "per model, in TRACE order")
    p.add_argument("--simulate-capacity", type=float, default=None, metavar="CF",
                   help="also re-simulate token drops at this capacity factor")
    p.add_argument("--simulate-formula", choices=["topk", "group"], default=None)
    p.add_argument("--simulate-policy", choices=["openmoe", "score"], default=None)
    p.add_argument("--simulate-batch-seqs", type=positive_int, default=None, metavar="N",
                   help="sequences per batch the capacity counts over (default 8, `moelab trace`'s default)")
    p.add_argument("--simulate-group-size", type=positive_int, default=None, metavar="G",
                   help="tokens per group for --simulate-formula group (default 4096)")
    p.add_argument("--labels", default="domain,lang", help="comma-separated label columns to group by")
    p.add_argument("--min-count", type=int, default=None,
                   help="token IDs seen fewer times are left out of the std score (default 128)")
    p.add_argument("--permutations", type=int, default=None, metavar="N",
                   help="permutations of each null (default 16)")
    p.add_argument("--bootstrap", type=int, default=None, metavar="N",
                   help="bootstrap replicates over sequences for the 95%% intervals (default 64; 0: none)")
    p.add_argument("--interventions", nargs="+", default=[], metavar="JSON",
                   help="`moelab intervene` (intervene.json) or `moelab diff` result files: one report section each")
    p.add_argument("--title", default=None)
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="processes for the streaming pass (each reads its own share of the trace's row "
                        "groups) and for the scores, nulls and intervals after it (default: the cores "
                        "available); results are identical whatever N")
    p.set_defaults(func=run_analyze)


def simulate_settings(args) -> dict | None:
    """The drop re-simulation flags as `analyze_all`'s `simulate`, or None."""
    extra = {"formula": args.simulate_formula, "policy": args.simulate_policy,
             "batch_seqs": args.simulate_batch_seqs, "group_size": args.simulate_group_size}
    if args.simulate_capacity is None:
        given = [k for k, v in extra.items() if v is not None]
        if given:
            raise MoelabError(f"--simulate-{given[0].replace('_', '-')} needs --simulate-capacity CF")
        return None
    if not math.isfinite(args.simulate_capacity) or args.simulate_capacity <= 0:
        raise MoelabError(f"--simulate-capacity {args.simulate_capacity} must be a finite number > 0")
    settings = {"capacity_factor": args.simulate_capacity, "batch_seqs": 8}
    settings.update({k: v for k, v in extra.items() if v is not None})
    return settings


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def run_analyze(args) -> int:
    from moelab.report.build import build_report

    labels = tuple(s.strip() for s in args.labels.split(",") if s.strip())
    if not labels:
        raise MoelabError(f"--labels {args.labels!r} names no label column (e.g. --labels domain,lang)")
    if args.names is not None and not all(n.strip() for n in args.names):
        raise MoelabError(f"--names {' '.join(map(repr, args.names))}: a model name must not be empty")
    if args.min_count is not None and args.min_count < 1:
        raise MoelabError(f"--min-count must be >= 1, got {args.min_count}")
    options = {key: value for key, value in (("min_count", args.min_count), ("n_permutations", args.permutations),
                                             ("n_bootstrap", args.bootstrap)) if value is not None}
    for flag, value in (("--permutations", args.permutations), ("--bootstrap", args.bootstrap)):
        if value is not None and value < 0:
            raise MoelabError(f"{flag} must be >= 0, got {value}")
    if args.workers is not None and args.workers < 1:
        raise MoelabError(f"--workers must be >= 1, got {args.workers}")

    if args.workers is None:
        from moelab.analysis.parallel import available_cores

        args.workers = available_cores()
    options["workers"] = args.workers
    from moelab.outpath import check_writable_dir

    check_writable_dir(args.out)  # before the analysis, not after it (and not as raw errno text)
    try:
        metrics = build_report(args.traces, args.out, weights=args.weights, labels=labels,
                               simulate=simulate_settings(args), title=args.title, names=args.names,
                               early=args.early, options=options, interventions=args.interventions)
    except OSError as e:  # e.g. an unwritable --out (unreadable trace rows are already named by build_report)
        raise MoelabError(f"cannot read or write a file: {_first_line(e)}") from None
    print(f"report:  {metrics['files']['report']}")
    print(f"metrics: {metrics['files']['metrics']}")
    for line in short_summary(metrics):
        print(f"  {line}")
    return 0


def short_summary(metrics: dict, lines: int = SUMMARY_LINES) -> list[str]:
    """One model: its first summary sentences. Several: the first headline numbers, all models on a line."""
    models = metrics["models"]
    if len(models) == 1:
        return metrics["summary"][:lines]
    first = next(iter(models.values()))["headline"]
    keys = [k for k, h in first.items() if h["text"] and h["value"] is not None][:lines]
    out = []
    for key in keys:
        heads = {name: m["headline"].get(key, {}) for name, m in models.items()}
        nulls = {h.get("null") for h in heads.values()}
        shared = len(nulls) == 1  # models with different E have different nulls: each gets its own
        values = ", ".join(f"{name} {_num(h.get('value'))}" + ("" if shared else f" (null {_num(h.get('null'))})")
                           for name, h in heads.items())
        null = first[key]["null"]
        tail = f" (null {_num(null)})" if shared and null is not None else ""
        out.append(f"{first[key]['label']}: {values}{tail}")
    return out


def _num(value) -> str:
    return "n/a" if value is None else f"{value:.3g}"
