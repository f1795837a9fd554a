"""What `analyze --workers N` would take on a machine with N free cores, from its pieces timed here.

A 2-core machine cannot run 16 workers side by side, but it can time every piece of the 16-worker run one
after another, on one thread at a time: each worker's part of the streaming pass (its units, then packing,
encoding and writing its part), the parent's reading and merging of the parts in order, every finalisation
job with the encoding of its result and the parent's reading it back, the parent's own finalisation work
between the jobs, and a fork of this process as it stands at each hand-over. The parts and the jobs run
in forked children, one child at a time, as the workers would (a child per part; for a round, N children
in turn, child w running jobs w, w + N, ...), so their times include what a fresh process pays: first
touches of its memory and copies of the parent's pages it writes. Timed in this process instead, the
pieces left 20-30% of the measured 2-worker run out. The estimate puts them on N cores the way the
code does: worker i starting after the parent's first i + 1 forks, the parent merging each part in order
as soon as it is ready (the merges overlap the later parts), each round of jobs through the
pool as `run_jobs` runs it (a job to a free worker, else a fork while fewer than N run, else a wait; the
parent reads the results back one by one).

It leaves out what only a machine with N cores shows: memory bandwidth shared by N workers, the file
read by N readers at once, a busy core's turbo, the parent merging beside N workers still streaming. So
it is a lower bound in spirit, and a measurement (`device_session.sh workers`) replaces it. Check it where
it can be checked: `--check 2` runs the real 2-worker analysis beside the 2-worker estimate.

    python benchmarks/analysis_critical_path.py TRACE --workers 16 [--check 2] [--batch-seqs 4]
"""

from __future__ import annotations

import argparse
import copy
import heapq
import json
import multiprocessing as mp
import os
import shutil
import struct
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from analysis_scale import report_settings  # noqa: E402

from moelab.analysis import analyze_all, parallel, transfer  # noqa: E402
from moelab.trace.io import open_trace  # noqa: E402


def fork_seconds() -> float:
    """One fork of this process as it is now (its page tables are copied), and the child's exit."""
    t = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return time.perf_counter() - t


def in_child(work: Callable[[Any], None]) -> tuple[int, Any]:
    """A fork of this process as it is now running work(conn) and exiting: the pages a worker touches are
    its own (first touches, copy-on-write copies of the parent's), as in `analyze --workers`. Returns the
    child's pid and the connection its messages come on."""
    recv, send = mp.Pipe(duplex=False)
    pid = os.fork()
    if pid == 0:
        recv.close()
        code = 0
        try:
            work(send)
        except BaseException:  # noqa: BLE001 - shown, and the parent's read fails
            traceback.print_exc()
            code = 1
        finally:
            send.close()
            os._exit(code)
    send.close()
    return pid, recv


def send_seconds(conn: Any, seconds: float) -> None:
    conn.send_bytes(struct.pack("d", seconds))


def recv_seconds(conn: Any) -> float:
    return struct.unpack("d", conn.recv_bytes())[0]


def pool_seconds(jobs: list[tuple[float, float]], workers: int, fork_s: float) -> float:
    """A round of (run, read back) jobs through `parallel.run_jobs`' pool: the parent hands the next job
    to a free worker, else forks one while fewer than `workers` run (`fork_s` each), else waits; it
    reads each result back itself, one after another."""
    t, forked, idle, todo = 0.0, 0, 0, list(jobs)[::-1]
    running: list[tuple[float, float]] = []  # (finish, read-back seconds), a heap
    while todo or running:
        if todo and idle:
            run, read = todo.pop()
            heapq.heappush(running, (t + run, read))
            idle -= 1
            continue
        if todo and forked < workers and not (running and running[0][0] <= t):
            t, forked, idle = t + fork_s, forked + 1, idle + 1
            continue
        t = max(t, running[0][0])  # wait: every result ready by then is read back
        while running and running[0][0] <= t:
            t += heapq.heappop(running)[1]
            idle += 1
    return t


def timed_pieces(trace: Any, workers: int, batch_seqs: int) -> dict[str, Any]:
    """Run the analysis in this process with the parallel pieces replaced by serial, timed ones."""
    folders: list[str | None] = []
    pieces: dict[str, Any] = {"parts_s": [], "merge_parts_s": [], "rounds": [], "fork_s": [], "rounds_wall_s": 0.0}

    def consume(acc, trace, columns, batch_rows, key, block, n):
        bounds = parallel.plan_units(trace.path, block)
        parts = parallel.split_units(bounds, workers)
        pieces["stream_fork_s"] = fork_seconds()
        folder = parallel._spill_folder()
        folders.append(folder)
        blank = copy.deepcopy(acc)  # what every worker starts from: `acc` fills as the parts are merged
        for i, (lo, hi) in enumerate(parts):  # one child at a time, each part merged once it is in

            def work(conn, i=i, lo=lo, hi=hi):
                t = time.perf_counter()
                accs = copy.deepcopy(blank)
                parallel.consume_units(open_trace(trace.path), columns, batch_rows, key, bounds, lo, hi,
                                       list(accs.values()))
                header, buffers = parallel.prepare_parts(accs, folder, i)  # as the worker does
                send_seconds(conn, time.perf_counter() - t)
                parallel._send(conn, header, buffers)

            pid, conn = in_child(work)
            pieces["parts_s"].append(recv_seconds(conn))
            t = time.perf_counter()
            for name, part in parallel._received_parts(transfer.read_header(conn), conn):
                acc[name].merge(part)
            pieces["merge_parts_s"].append(time.perf_counter() - t)
            conn.close()
            os.waitpid(pid, 0)

    def run_jobs(jobs, n):
        """The jobs in `workers` children one after another, child w running jobs w, w + N, ... (the pool
        hands them out about so), each result read back by this process as it comes."""
        pieces["fork_s"].append(fork_seconds())  # the pool forks as it goes: a fork of the parent as it is
        start = time.perf_counter()
        names, out, rows = list(jobs), {}, {}
        folder = parallel._spill_folder()
        folders.append(folder)
        for w in range(min(workers, len(names))):

            def work(conn, mine=names[w::workers]):
                for name in mine:  # as `parallel._job_worker` sends a result
                    t = time.perf_counter()
                    tree, buffers = transfer.encode(jobs[name]())
                    header = parallel._result_header(tree, buffers, folder)
                    send_seconds(conn, time.perf_counter() - t)
                    parallel._send(conn, header, buffers)

            pid, conn = in_child(work)
            for name in names[w::workers]:
                run = recv_seconds(conn)
                t = time.perf_counter()
                out[name] = parallel._receive_result(conn)
                rows[name] = (name, run, time.perf_counter() - t)
            conn.close()
            os.waitpid(pid, 0)
        pieces["rounds"].append([rows[name] for name in names])
        pieces["rounds_wall_s"] += time.perf_counter() - start
        return {name: out[name] for name in names}

    real = parallel.consume_parallel, parallel.run_jobs
    parallel.consume_parallel, parallel.run_jobs = consume, run_jobs
    try:
        phases: dict[str, float] = {}
        t = time.perf_counter()
        analyze_all(trace, workers=workers, timings=phases, **report_settings(batch_seqs))
        pieces["total_s"] = time.perf_counter() - t
    finally:
        parallel.consume_parallel, parallel.run_jobs = real
        for folder in folders:  # a failed child's part stays there otherwise
            if folder:
                shutil.rmtree(folder, ignore_errors=True)
    pieces["stream_s"], pieces["finalise_s"] = phases["stream_s"], phases["finalise_s"]
    # between and around the rounds (each round's wall here: its children, forks and reading back)
    pieces["parent_finalise_s"] = phases["finalise_s"] - pieces["rounds_wall_s"]
    return pieces


def estimate(p: dict[str, Any], workers: int) -> dict[str, float]:
    # The streaming pass as consume_parallel runs it: worker i starts after the parent's i + 1 forks, and
    # the parent merges part i as soon as it is ready and part i - 1 is merged.
    stream = 0.0
    for i, (part, merge) in enumerate(zip(p["parts_s"], p["merge_parts_s"])):
        stream = max(stream, (i + 1) * p["stream_fork_s"] + part) + merge
    if not p["parts_s"]:  # one unit: no workers
        stream = p["stream_s"]
    rounds = [pool_seconds([(j, r) for _, j, r in rows], workers, fork)
              for rows, fork in zip(p["rounds"], p["fork_s"])]
    wall = stream + sum(rounds) + p["parent_finalise_s"]
    return dict(estimate_s=round(wall, 2), stream_s=round(stream, 2),
                slowest_part_s=round(max(p["parts_s"], default=0), 2),
                merge_s=round(sum(p["merge_parts_s"]), 2), rounds_s=[round(r, 2) for r in rounds],
                largest_job_s=round(max((j for rows in p["rounds"] for _, j, _ in rows), default=0), 2),
                parent_finalise_s=round(p["parent_finalise_s"], 2),
                fork_s=[round(f, 3) for f in [p.get("stream_fork_s", 0.0)] + p["fork_s"]])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("trace")
    ap.add_argument("--workers", type=int, default=16)
    ap.add_argument("--check", type=int, default=None, metavar="N",
                    help="also run the real N-worker analysis and the N-worker estimate")
    ap.add_argument("--batch-seqs", type=int, default=4)
    args = ap.parse_args()
    trace = open_trace(args.trace)

    def measured(n: int) -> float:
        t = time.perf_counter()
        analyze_all(trace, workers=n, **report_settings(args.batch_seqs))
        return round(time.perf_counter() - t, 2)

    one = measured(1)
    rows: dict[str, Any] = {"1 worker, measured (s)": one}
    for n in [args.workers] + ([args.check] if args.check else []):
        est = rows[f"{n} workers, estimate"] = estimate(timed_pieces(trace, n, args.batch_seqs), n)
        est["speed-up vs 1 measured"] = round(one / est["estimate_s"], 2)
    if args.check:
        rows[f"{args.check} workers, measured (s)"] = measured(args.check)
    rows["cores here"], rows["load average"] = os.cpu_count(), os.getloadavg()[0]
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
