"""Re-run the claims table: train what each row needs (cached across rows), measure, write docs/CLAIMS.md.

    python benchmarks/claims.py                  # every row into ./claims-scratch/ (under 2 h on 2 CPU cores)
    python benchmarks/claims.py --only ROW[,ROW] # some rows, into ./claims-scratch/
    python benchmarks/claims.py --write-docs     # into docs/claims/ and docs/CLAIMS.md (the committed numbers)
    python benchmarks/claims.py --list           # the rows
    python benchmarks/claims.py --table-only --write-docs  # re-decide and re-render docs/CLAIMS.md
    python benchmarks/claims.py --scale gpu --plan  # the gpu profile: tokens and estimated minutes per group
    python benchmarks/claims.py --scale gpu --only GROUP --device cuda --write-docs  # into docs/claims-gpu/
    python benchmarks/claims.py --hf PATH [PATH...]  # the one-model rows on your model (checkpoints in order)

A rerun writes to a scratch folder unless --write-docs: another machine's numbers are not bit-identical,
and must not silently replace the committed ones.

Models, traces and analyses are cached under --cache (default ./claims-cache) and reused when their
settings match; --fresh retrains what the chosen rows use. --smoke runs every row at a toy scale into a
temporary results folder (a check of the pipeline, never written to docs/); at 6 steps a verdict means
nothing, so it prints none.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

from moelab.claims.record import read_results, write_result
from moelab.claims.registry import all_rows, run_row, select
from moelab.claims.scale import (check_device, expand_groups, group_of, plan_lines, read_gpu, scale_for,
                                 write_about)
from moelab.claims.table import read_audit, render
from moelab.claims.workspace import Workspace
from moelab.config import MoelabError

ROOT = Path(__file__).resolve().parent.parent


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default="", help="comma-separated rows to run (default: all)")
    ap.add_argument("--list", action="store_true", help="print the rows and exit")
    ap.add_argument("--cache", default="claims-cache", help="folder for corpora, runs, traces, analyses")
    ap.add_argument("--results", default="", help="folder of row results (JSON); default claims-scratch/results, "
                    "or docs/claims with --write-docs (--table-only reads docs/claims)")
    ap.add_argument("--table", default="", help="the table to write; default claims-scratch/CLAIMS.md, or "
                    "docs/CLAIMS.md with --write-docs")
    ap.add_argument("--write-docs", action="store_true", help="write the results and table into docs/")
    ap.add_argument("--fresh", action="store_true", help="retrain and re-trace what the chosen rows use")
    ap.add_argument("--table-only", action="store_true", help="only re-render the table from the results")
    ap.add_argument("--replica", default=str(ROOT / "docs" / "claims-replica"),
                    help="folder of a second full run's results, compared in the table when present")
    ap.add_argument("--smoke", action="store_true", help="toy scale into a temporary folder (pipeline check)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    ap.add_argument("--scale", default="cpu", help="cpu (default) or gpu: tens of millions of tokens per model, "
                    "sized per row group (--only base|rmoe8|upcycle) for one H200; results in docs/claims-gpu")
    ap.add_argument("--device", default=None, help="train and trace on this device (cpu, cuda, cuda:N); "
                    "default: training's auto (cuda when present), tracing on the CPU")
    ap.add_argument("--plan", action="store_true", help="print each row group's tokens and estimated time, exit")
    ap.add_argument("--hf", nargs="+", default=None, metavar="PATH", help="run the one-model rows on these transformers "
                    "MoE models (folders or hub names) or moelab checkpoints: checkpoints of one run in training "
                    "order, the last final; into claims-scratch/hf/<model>/ (or --results)")
    ap.add_argument("--revision", nargs="+", default=[], metavar="REV", help="--hf: hub revisions (OLMoE's "
                    "checkpoints are branches), or a local folder's subfolders; one model at several, or one each")
    ap.add_argument("--tokens", type=int, default=0, help="--hf: held-out tokens to trace, shared among the "
                    "corpus's domains (0: the whole split)")
    ap.add_argument("--seeds", action="store_true", help="--hf: the models are independently trained runs of one "
                    "recipe, not checkpoints: each row over them by the table's rule (3 or more sign a verdict)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    try:
        if args.hf is not None:
            from moelab.claims.byo_run import main_hf

            return main_hf(args)
        scale_for(args.scale)  # an unknown profile fails before any work
        check_device(args.device)
        if args.plan:
            print("\n".join(plan_lines(args.scale)))
            return 0
        rows = select(expand_groups([n for n in args.only.split(",") if n]) or None)
        if args.list:
            print("\n".join(f"{r.name:32s} {r.paper}" for r in rows))
            return 0
        if args.smoke:
            if args.write_docs:
                raise MoelabError("--smoke results are a pipeline check and are never written to docs/ "
                                  "(drop --write-docs)")
            tmp = Path(tempfile.mkdtemp(prefix="claims_smoke_"))
            args.results, args.table, args.cache = str(tmp / "results"), str(tmp / "CLAIMS.md"), str(tmp / "cache")
        docs, scratch = ROOT / "docs", Path("claims-scratch")
        gpu = args.scale == "gpu" and not args.smoke  # its results go beside the cpu ones, never over them
        if not args.results:
            args.results = str(docs / ("claims-gpu" if gpu else "claims") if args.write_docs or args.table_only
                               else scratch / ("gpu/results" if gpu else "results"))
        if not args.table:
            args.table = str(docs / "CLAIMS.md" if args.write_docs
                             else scratch / ("gpu/CLAIMS.md" if gpu else "CLAIMS.md"))
        if not args.table_only:
            if args.threads:  # tracing, analyses and interventions too, not only training
                import torch

                torch.set_num_threads(args.threads)
            spaces: dict[str, Workspace] = {}  # one per row group: the gpu profile sizes each group alone
            took: dict[str, float] = {}
            for spec in rows:
                group = group_of(spec.fn.__module__)
                if group not in spaces:
                    scale = dataclasses.replace(scale_for(args.scale, group, smoke=args.smoke), threads=args.threads)
                    spaces[group] = Workspace(args.cache, scale, fresh=args.fresh, device=args.device)
                    print(f"[claims] {args.scale} scale, {plan_lines(args.scale, [group])[0]}", file=sys.stderr)
                ws = spaces[group]
                print(f"[claims] row {spec.name}", file=sys.stderr, flush=True)
                result = run_row(spec, ws)
                write_result(result, args.results)
                took[group] = took.get(group, 0.0) + result.seconds
                said = ("measured at smoke scale (no verdict)" if args.smoke
                        else f"{result.verdict} ({result.reason})")
                print(f"[claims] {spec.name}: {said}; {result.seconds / 60:.1f} min", file=sys.stderr, flush=True)
            if gpu:
                write_about(args.results, spaces, args.device, took)
        results = read_results(args.results) if Path(args.results).is_dir() else {}
        gpu_results, gpu_about = ({}, "") if args.smoke else read_gpu(docs / "claims-gpu")
        if gpu:  # the table is the cpu scale's with this run's gpu results beside it
            gpu_results, gpu_about = read_gpu(args.results)
            results = read_results(docs / "claims") if (docs / "claims").is_dir() else {}
        replica, about = {}, ""
        if not args.smoke and (Path(args.replica) / "ABOUT.txt").is_file():
            replica, about = read_results(args.replica), (Path(args.replica) / "ABOUT.txt").read_text().strip()
        Path(args.table).parent.mkdir(parents=True, exist_ok=True)
        audit = {} if args.smoke else read_audit(docs / "claims-audit-verdicts.json")
        Path(args.table).write_text(render(results, list(all_rows()), replica, about, gpu_results, gpu_about,
                                           audit=audit))
        print(f"[claims] wrote {args.table} ({len(results)} rows)", file=sys.stderr)
        return 0
    except MoelabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
