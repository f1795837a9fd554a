"""Scale benchmark of the routing analyses: a synthetic 10M-row trace, the full `analyze_all`, time and RSS.

Target: 10 million rows (token x MoE layer x rank) analysed in under 60 s with under 2 GiB peak RSS.
The trace is written with `TraceWriter` into a temporary directory (timed separately), then read back
by streaming. Peak RSS is the process's high-water mark (resource.getrusage), so it covers writing too.

    python benchmarks/analysis_scale.py [--rows 10_000_000] [--all-experts] [--keep PATH] [--profile]
    python benchmarks/analysis_scale.py --rows 100_000_000 --layers 16 --experts 64 --top-k 8 --no-probs \
        --keep /tmp/t100m.parquet     # the issue's scale: written once, then analysed in a fresh process
    python benchmarks/analysis_scale.py --keep /tmp/t100m.parquet --workers 1,2 --rounds 2
                                      # 1 vs 2 workers, fresh processes, interleaved; RSS of parent + workers
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

from moelab.analysis import analyze_all
from moelab.analysis.synthetic import planted_batches
from moelab.trace.io import TraceWriter, open_trace
from moelab.trace.schema import TraceMeta

TARGET_S, TARGET_GIB = 60.0, 2.0


def peak_rss_gib() -> float:
    scale = 1 if sys.platform == "darwin" else 1024  # Linux reports KiB, macOS bytes
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**30


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--all-experts", action="store_true", help="also write expert_norms/cos/density")
    ap.add_argument("--keep", default=None, metavar="PATH",
                    help="write the trace here and reuse it when it exists (else a temporary directory)")
    ap.add_argument("--profile", action="store_true", help="print the top of a cProfile of the analysis")
    ap.add_argument("--no-probs", action="store_true", help="leave out the full router probabilities")
    ap.add_argument("--write-only", action="store_true", help="write the trace (--keep) and stop")
    ap.add_argument("--workers", default=None, metavar="N,M,...",
                    help="with --keep: analyse the trace at each worker count, each in a fresh process, "
                         "interleaved over --rounds; prints wall, CPU and peak RSS of parent + workers")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--seqs-per-batch", type=int, default=32,
                    help="sequences per written batch; the writer cuts a row group at >= 1M rows, so this sets "
                         "the row groups, which bound how finely --workers can split the trace (%(default)s)")
    ap.add_argument("--batch-seqs", type=int, default=32,
                    help="sequences per capacity batch of the drop re-simulation and queue baseline; the "
                         "workers' units never cut one (%(default)s; `moelab analyze` defaults to 8)")
    ap.add_argument("--analyse-once", type=int, default=None, metavar="N", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.analyse_once is not None:
        return analyse_once(Path(args.keep), args.analyse_once, args.batch_seqs)
    if args.workers is not None:
        return compare_workers(args)
    rows_per_seq = args.seq_len * args.layers * args.top_k
    num_seqs = -(-args.rows // rows_per_seq)
    meta = TraceMeta(num_experts=[args.experts] * args.layers, top_k=args.top_k, capacity_factor=1.25,
                     capacity_formula="topk", drop_policy="openmoe", source="moelab", tokenizer="synthetic")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.keep) if args.keep else Path(tmp) / "trace.parquet"
        write_s = None
        if not path.exists():
            t0 = time.perf_counter()
            write(path, meta, args, num_seqs)
            write_s = time.perf_counter() - t0
        if args.write_only:
            print(f"wrote {path} in {write_s} s")
            return
        trace = open_trace(path)
        rss_after_write = peak_rss_gib()
        t0, c0 = time.perf_counter(), time.process_time()
        results = analyse(trace, args.profile, args.batch_seqs)
        analyse_s, cpu_s = time.perf_counter() - t0, time.process_time() - c0
        size_mib = path.stat().st_size / 2**20
    peak = peak_rss_gib()
    m = trace.meta
    print(f"rows {trace.num_rows:,} ({len(m.num_experts)} layers x k={m.top_k}, E={m.num_experts[0]}), "
          f"file {size_mib:.0f} MiB")
    print(f"write   {write_s:6.1f} s   (peak RSS so far {rss_after_write:.2f} GiB)" if write_s is not None else
          f"write   reused {path}")
    print(f"analyse {analyse_s:6.1f} s   target {TARGET_S:.0f} s   ratio {analyse_s / TARGET_S:.2f}")
    print(f"cpu     {cpu_s:6.1f} s   (process time, all threads: what a quiet machine's wall clock would "
          f"be near; the machine is shared)")
    print(f"peak RSS {peak:.2f} GiB   target {TARGET_GIB:.1f} GiB   ratio {peak / TARGET_GIB:.2f}")
    print(f"results: {', '.join(sorted(results))}")
    est = results["vocab"].overall
    print(f"vocab specialisation (uniform routing): {est.value:.4f} [{est.ci_low:.4f}, {est.ci_high:.4f}] "
          f"(null {est.null_mean:.4f} +- {est.null_sd:.4f}, {est.n_permutations} permutations, "
          f"{est.n_bootstrap} bootstrap replicates)")


def tree_rss_bytes(pid: int, field: str = "Rss") -> int:
    """Resident memory of a process and all its descendants (Linux /proc), 0 for one that is gone.
    field "Pss" shares each page among the processes mapping it (forked workers share their parent's
    pages until written), so its sum is the tree's physical memory; "Rss" counts a shared page in each."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            rss = next(int(line.split()[1]) * 1024 for line in f if line.startswith(f"{field}:"))
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            kids = [int(k) for k in f.read().split()]
    except (OSError, StopIteration):
        return 0
    return rss + sum(tree_rss_bytes(k, field) for k in kids)


def spill_bytes() -> int:
    """Bytes of the workers' parts waiting in shared memory (`analysis/parallel.py`: files in tmpfs are
    memory, but no process's RSS or PSS). Every analysis's folder counts: run nothing else beside it."""
    import glob
    import os

    total = 0
    for f in glob.glob("/dev/shm/moelab-analysis-*/*"):
        try:
            total += os.stat(f).st_blocks * 512
        except OSError:
            pass
    return total


def analyse_once(path: Path, workers: int, batch_seqs: int = 32) -> None:
    """One analysis in this process at `workers`: JSON with wall, CPU (this process and its reaped
    workers) and the peaks of the summed RSS and PSS of this process and its workers (sampled every 0.1 s;
    the RSS sum counts pages a forked worker shares with its parent twice, the PSS sum does not), each
    with the parts waiting in shared memory added (`spill_bytes`)."""
    import json
    import os
    import threading

    peak, peak_pss, done = [0], [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            spilled = spill_bytes()
            peak[0] = max(peak[0], tree_rss_bytes(os.getpid()) + spilled)
            peak_pss[0] = max(peak_pss[0], tree_rss_bytes(os.getpid(), "Pss") + spilled)
            done.wait(0.1)

    threading.Thread(target=sample, daemon=True).start()
    trace = open_trace(path)
    t0, c0, phases = time.perf_counter(), os.times(), {}
    analyze_all(trace, workers=workers, timings=phases, **report_settings(batch_seqs))
    wall, c1 = time.perf_counter() - t0, os.times()
    done.set()
    cpu = sum(getattr(c1, f) - getattr(c0, f) for f in ("user", "system", "children_user", "children_system"))
    print(json.dumps({"workers": workers, "rows": trace.num_rows, "wall_s": round(wall, 2),
                      **{k: round(v, 2) for k, v in phases.items()}, "cpu_s": round(cpu, 2),
                      "peak_gib": round(max(peak[0], 1) / 2**30, 3),
                      "peak_pss_gib": round(max(peak_pss[0], 1) / 2**30, 3), "load_avg": os.getloadavg()[0]}))


def compare_workers(args: argparse.Namespace) -> None:
    """Fresh processes, worker counts interleaved round by round (the machine's load drifts)."""
    import json
    import os
    import subprocess

    counts = [int(n) for n in args.workers.split(",")]
    rows: dict[int, list[dict]] = {n: [] for n in counts}
    for _ in range(args.rounds):
        for n in counts:
            cmd = [sys.executable, __file__, "--keep", args.keep, "--analyse-once", str(n),
                   "--batch-seqs", str(args.batch_seqs)]
            res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            if res.returncode:
                raise SystemExit(f"{n} worker(s) failed: {res.stderr.strip().splitlines()[-1:]}")
            rows[n].append(json.loads(res.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[n][-1]), flush=True)
    base = counts[0]
    for n in counts[1:]:
        ratios = [a["wall_s"] / b["wall_s"] for a, b in zip(rows[base], rows[n])]
        print(f"{n} workers vs {base}: wall ratio per round {', '.join(f'{r:.2f}' for r in ratios)} "
              f"(> 1: {n} faster)")


def write(path: Path, meta: TraceMeta, args: argparse.Namespace, num_seqs: int) -> None:
    with TraceWriter(path, meta) as writer:
        for batch in planted_batches(num_seqs=num_seqs, seq_len=args.seq_len, num_layers=args.layers,
                                     num_experts=args.experts, top_k=args.top_k, rule="uniform",
                                     vocab=args.vocab, seqs_per_batch=args.seqs_per_batch, capacity_factor=1.25,
                                     all_experts=args.all_experts):
            if args.no_probs:
                batch = {k: v for k, v in batch.items() if not k.startswith("probs")}
            writer.write(batch)


def report_settings(batch_seqs: int = 32) -> dict:
    """The report's analysis: every routing analysis, the trained drops' queue-only baseline, a
    re-simulation and its baseline, nulls and intervals at their defaults."""
    return dict(simulate=dict(capacity_factor=1.0, batch_seqs=batch_seqs),
                queue=dict(capacity_factor=1.25, batch_seqs=batch_seqs))


def analyse(trace, profile: bool, batch_seqs: int = 32) -> dict:
    kw = report_settings(batch_seqs)
    if not profile:
        return analyze_all(trace, **kw)
    import cProfile
    import pstats

    prof = cProfile.Profile()
    results = prof.runcall(analyze_all, trace, **kw)
    pstats.Stats(prof).sort_stats("cumulative").print_stats(25)
    return results


if __name__ == "__main__":
    main()
