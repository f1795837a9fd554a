"""Re-run the claims table: train what each row needs (cached across rows), measure, write docs/CLAIMS.md.

    python benchmarks/claims.py                  # every row (under 2 h on 2 CPU cores from an empty cache)
    python benchmarks/claims.py --only ROW[,ROW] # some rows; the table keeps the other rows' last results
    python benchmarks/claims.py --list           # the rows
    python benchmarks/claims.py --table-only     # re-render docs/CLAIMS.md from docs/claims/*.json

Models, traces and analyses are cached under --cache (default ./claims-cache) and reused when their
settings match; --fresh retrains what the chosen rows use. --smoke runs every row at a toy scale into a
temporary results folder (a check of the pipeline, never written to docs/).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

from moelab.claims.record import read_results, write_result
from moelab.claims.registry import all_rows, run_row, select
from moelab.claims.table import render
from moelab.claims.workspace import Scale, Workspace
from moelab.config import MoelabError

ROOT = Path(__file__).resolve().parent.parent


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default="", help="comma-separated rows to run (default: all)")
    ap.add_argument("--list", action="store_true", help="print the rows and exit")
    ap.add_argument("--cache", default="claims-cache", help="folder for corpora, runs, traces, analyses")
    ap.add_argument("--results", default=str(ROOT / "docs" / "claims"), help="folder of row results (JSON)")
    ap.add_argument("--table", default=str(ROOT / "docs" / "CLAIMS.md"), help="the table to rewrite")
    ap.add_argument("--fresh", action="store_true", help="retrain and re-trace what the chosen rows use")
    ap.add_argument("--table-only", action="store_true", help="only re-render the table from the results")
    ap.add_argument("--replica", default=str(ROOT / "docs" / "claims-replica"),
                    help="folder of a second full run's results, compared in the table when present")
    ap.add_argument("--smoke", action="store_true", help="toy scale into a temporary folder (pipeline check)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    try:
        rows = select([n for n in args.only.split(",") if n] or None)
        if args.list:
            print("\n".join(f"{r.name:32s} {r.paper}" for r in rows))
            return 0
        if args.smoke:
            tmp = Path(tempfile.mkdtemp(prefix="claims_smoke_"))
            args.results, args.table, args.cache = str(tmp / "results"), str(tmp / "CLAIMS.md"), str(tmp / "cache")
        if not args.table_only:
            if args.threads:  # tracing, analyses and interventions too, not only training
                import torch

                torch.set_num_threads(args.threads)
            scale = dataclasses.replace(Scale.smoke() if args.smoke else Scale(), threads=args.threads)
            ws = Workspace(args.cache, scale, fresh=args.fresh)
            for spec in rows:
                print(f"[claims] row {spec.name}", file=sys.stderr, flush=True)
                result = run_row(spec, ws)
                write_result(result, args.results)
                print(f"[claims] {spec.name}: {result.verdict} ({result.reason}); {result.seconds / 60:.1f} min",
                      file=sys.stderr, flush=True)
        results = read_results(args.results) if Path(args.results).is_dir() else {}
        replica, about = {}, ""
        if not args.smoke and (Path(args.replica) / "ABOUT.txt").is_file():
            replica, about = read_results(args.replica), (Path(args.replica) / "ABOUT.txt").read_text().strip()
        Path(args.table).write_text(render(results, list(all_rows()), replica, about))
        print(f"[claims] wrote {args.table} ({len(results)} rows)", file=sys.stderr)
        return 0
    except MoelabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
