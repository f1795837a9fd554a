"""Inference strategy of the experts on fresh inputs: oneDNN / torch matmul for the MoE layer forward.

bench_moe_layer.py repeats one input, so its routing and each expert's row count are the same every
round, and oneDNN's per-row-count kernels are built once. Here every call gets a new input (the same
sequence for both strategies, interleaved), so kernel building is charged as a trace or an evaluation
would pay it. Rows: the first call's ratio, and the median ratio over the calls after the third.

    python benchmarks/bench_expert_strategy.py [--case e8|e64|e16-drop|decode|all]   (12 calls per strategy)
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import bench_common as bc  # noqa: E402
from bench_moe_layer import CASES, D, _forced, build  # noqa: E402


def fresh_ratios(key: str, calls: int) -> list[bc.Row]:
    case = CASES[key]
    moe, _, _ = build(case, "cpu")
    g = torch.Generator().manual_seed(1)
    times: dict[str, list[float]] = {"onednn": [], "grouped": []}
    for _ in range(calls):
        x = torch.randn(case["tokens"], D, generator=g)
        for strategy, out in times.items():
            with torch.no_grad():
                t0 = time.process_time()
                _forced(strategy, lambda: moe(x, capacity_factor=case["cf"]))
                out.append(time.process_time() - t0)
    ratios = [a / b for a, b in zip(times["onednn"], times["grouped"])]
    name = f"{case['label']}, {case['tokens']} tokens, fwd, fresh input each call"
    later = slice(3, None)
    return [bc.Row("expert-strategy", f"{name}: first call", "oneDNN", "torch matmul",
                   times["onednn"][0], times["grouped"][0], ratios[0]),
            bc.Row("expert-strategy", f"{name}: calls 4-{calls}", "oneDNN", "torch matmul",
                   statistics.median(times["onednn"][later]), statistics.median(times["grouped"][later]),
                   statistics.median(ratios[later]))]


def main() -> None:
    args = bc.parse_args(__doc__.splitlines()[0], cases=[*CASES, "all"])
    bc.setup()
    bc.check_env()
    keys = list(CASES) if args.case == "all" else [args.case]
    bc.emit([r for k in keys for r in fresh_ratios(k, max(args.reps, 12))], args.json)


if __name__ == "__main__":
    main()
