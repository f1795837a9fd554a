"""Shared measurement rules for the `bench_*.py` speed benchmarks (run them all with `benchmarks/run.py`).

Every comparison is a ratio of two variants timed side by side in one process: process CPU time
(`time.process_time`) at one thread, variants interleaved (A, B, A, B, ...) after warm-up, medians
reported (a ratio is the median of per-round ratios). Process CPU time, not wall time, because this
machine is shared: time spent descheduled while another job runs is not charged to us (cache and
memory-bandwidth contention still is, hence medians).
A benchmark prints its rows and, with `--json PATH`, writes them for run.py to put in the table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

# glibc's malloc otherwise returns big freed blocks to the OS (munmap / trim) and page-faults them back in
# on the next step, which charges allocator noise to whichever variant allocates last. run.py sets it for
# every benchmark process alike; it only works from the environment, before the process starts.
GLIBC_TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"


@dataclass
class Row:
    """One table row: variant A's time over variant B's (lower is better)."""

    group: str  # which benchmark section
    name: str  # the case, e.g. "8 experts top-2, fwd+bwd"
    a: str  # label of the measured variant
    b: str  # label of the reference variant
    a_s: float  # median seconds (process CPU time) of A
    b_s: float
    ratio: float  # median over rounds of A's time / B's time in the same round
    target: float | None = None  # ratio must be <= target; None: reported only
    note: str = ""
    extra: dict = field(default_factory=dict)
    unit: str = "s"  # of a_s and b_s; "s" is shown as ms

    def fmt(self, v: float) -> str:
        return f"{v * 1e3:.1f} ms" if self.unit == "s" else f"{v:.2f} {self.unit}"

    def line(self) -> str:
        t = f"  target <= {self.target:.2f}" if self.target is not None else ""
        return (f"{self.group} | {self.name}: {self.a} {self.fmt(self.a_s)} / {self.b} "
                f"{self.fmt(self.b_s)} = {self.ratio:.3f}{t}  {self.note}").rstrip()


class Timings(dict):
    """name -> seconds of each round; rounds line up across variants."""

    def median(self, name: str) -> float:
        return statistics.median(self[name])

    def ratio(self, a: str, b: str) -> float:
        # Per-round ratios first: A and B of one round ran seconds apart under the same machine load,
        # so their ratio is steadier than the ratio of two medians taken over minutes.
        return statistics.median(x / y for x, y in zip(self[a], self[b]))

    def row(self, group: str, name: str, a: str, b: str, a_label: str, b_label: str, target=None,
            note: str = "", **extra) -> "Row":
        return Row(group, name, a_label, b_label, self.median(a), self.median(b), self.ratio(a, b),
                   target, note, extra)


def setup(threads: int = 1, seed: int = 0) -> None:
    """One compute thread, so process CPU time is the time of the work itself."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)


def interleaved(variants: dict[str, Callable[[], object]], reps: int = 5, warmup: int = 3,
                device: str = "cpu") -> Timings:
    """Seconds of each variant in each round, run A, B, A, B, ... so load drifts hit all alike.

    CPU: process CPU time. CUDA: wall time between synchronisations (the GPU's time is not ours to read).
    Three warm-up rounds: the first rounds of a big layer still page-fault while the heap settles."""
    clock = time.process_time if device == "cpu" else time.perf_counter
    for _ in range(warmup):
        for fn in variants.values():
            fn()
    times = Timings({name: [] for name in variants})
    for _ in range(reps):
        for name, fn in variants.items():
            cuda_sync(device)
            t0 = clock()
            fn()
            cuda_sync(device)
            times[name].append(clock() - t0)
    return times


def parse_args(description: str, cases: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=description)
    if cases:
        ap.add_argument("--case", choices=cases, default=cases[-1], help="which case (default: %(default)s)")
    ap.add_argument("--json", help="write the rows here as JSON (run.py reads them)")
    ap.add_argument("--reps", type=int, default=5, help="timed runs per variant (median reported)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    return ap.parse_args()


def cuda_sync(device: str) -> None:
    if device != "cpu":
        torch.cuda.synchronize()


def emit(rows: list[Row], path: str | None) -> None:
    """Print the rows; write them as JSON for run.py when asked."""
    for r in rows:
        print(r.line(), flush=True)
    if path:
        with open(path, "w") as f:
            json.dump([asdict(r) for r in rows], f, indent=1)


def check_env() -> None:
    if os.environ.get("GLIBC_TUNABLES") != GLIBC_TUNABLES:
        print("note: GLIBC_TUNABLES is not set as benchmarks/run.py sets it; numbers may be noisier")
