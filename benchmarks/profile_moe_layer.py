"""Where a MoE layer's time goes: torch.profiler over one case of bench_moe_layer.py, at one thread.

Prints the operators by self CPU time for the MoE layer and for its dense-FLOP floor, after warm-up, so a
change to the dispatch can be judged by the operators it removes (docs/PERFORMANCE.md quotes these).

    python benchmarks/profile_moe_layer.py --case decode [--backward] [--rounds 5] [--rows 15]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))
import bench_common as bc  # noqa: E402
from bench_moe_layer import CASES, variants  # noqa: E402


def profile_variant(fn, rounds: int) -> profile:
    for _ in range(3):
        fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(rounds):
            fn()
    return prof


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", choices=list(CASES), default="e64")
    ap.add_argument("--backward", action="store_true", help="profile fwd+bwd (default: forward only)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--rows", type=int, default=15, help="operators shown per variant")
    args = ap.parse_args()
    bc.setup()
    fns = variants(CASES[args.case], "cpu", args.backward)
    for name in ("moe", "dense"):
        prof = profile_variant(fns[name], args.rounds)
        total_us = sum(e.self_cpu_time_total for e in prof.key_averages())
        print(f"== {name}: {total_us / 1e3 / args.rounds:.1f} ms of operator time per round "
              f"(torch {torch.__version__})")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
