"""Full-layer expert ablation: reusing the activations below the ablated layer vs running the whole model
per ablation. tiny-moe (random weights: speed does not depend on training), random token ids.

Ablating all E experts of block l costs one prefix (blocks < l) plus E suffixes (blocks >= l) with reuse,
E + 1 whole passes without. The issue's target: a full-layer ablation of tiny-moe over 64k tokens in under
2 minutes on the 2-core development machine.

    PYTHONPATH=src python benchmarks/bench_intervene.py [--tokens 16384] [--block 3] [--no-baseline]
"""

from __future__ import annotations

import argparse
import time

import torch

from moelab.intervene.study import run_ablation
from moelab.model.transformer import build_model

TARGET_S = 120.0


def batches(tokens: int, seq_len: int, batch: int, vocab: int):
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(max(1, tokens // (seq_len * batch))):
        ids = torch.randint(0, vocab, (batch, seq_len), generator=g)
        out.append({"input_ids": ids, "labels": ids, "domain_id": torch.zeros_like(ids, dtype=torch.int16),
                    "lang_id": torch.zeros_like(ids, dtype=torch.int16)})
    return out


def timed(model, data, targets, cf, reuse: bool) -> tuple[float, object]:
    """CPU seconds of this process: on a shared machine, wall time mostly measures the neighbours."""
    t0 = time.process_time()
    _, _, deltas = run_ablation(model, data, targets, cf, reuse=reuse)
    return time.process_time() - t0, deltas


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--block", type=int, default=None, help="MoE block to ablate (default: every MoE block)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--no-baseline", action="store_true", help="only the reuse path (for the 64k target)")
    ap.add_argument("--repeats", type=int, default=3, help="alternating runs per path; the fastest counts "
                                                            "(the machine is shared, so the minimum is the signal)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (1: no OpenMP spin in CPU time)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    model = build_model("tiny-moe", seed=0).eval()
    cf = model.config.moe.capacity_factor_eval
    data = batches(args.tokens, args.seq_len, args.batch_size, model.config.vocab_size)
    blocks = [args.block] if args.block is not None else model.config.moe_layer_ids()
    for reuse in (True, False):  # warm-up: kernel choice and allocator growth are not the method's cost
        run_ablation(model, data[:1], [(blocks[0], (0,))], cf, reuse=reuse)
    print(f"tiny-moe, {sum(b['input_ids'].numel() for b in data):,} tokens, torch threads {torch.get_num_threads()}")
    for block in blocks:
        E = model.blocks[block].moe.num_experts
        targets = [(block, (e,)) for e in range(E)]
        runs = {True: [], False: []}
        for _ in range(args.repeats):
            for reuse in ([True] if args.no_baseline else [True, False]):
                seconds, deltas = timed(model, data, targets, cf, reuse)
                runs[reuse].append((seconds, deltas))
        fast = min(t for t, _ in runs[True])
        line = f"block {block}: all {E} experts ablated, reuse {fast:6.1f} CPU s"
        if not args.no_baseline:
            slow = min(t for t, _ in runs[False])
            assert torch.allclose(torch.from_numpy(runs[True][0][1]), torch.from_numpy(runs[False][0][1]),
                                  atol=1e-5, equal_nan=True)
            line += f" | whole model per ablation {slow:6.1f} CPU s | saving x{slow / fast:.2f}"
        print(line + f" | target {TARGET_S:.0f} s wall at 64k tokens (CPU s / threads ~ wall when idle)")


if __name__ == "__main__":
    main()
