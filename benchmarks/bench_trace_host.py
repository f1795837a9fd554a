"""The host side of tracing at a real model's shape: `write_trace` fed routing that costs nothing to capture.

On one H200 the forward of OLMoE-1B-7B's shape ran 86,026 tokens/s (issue 22), 11M trace rows a second.
Whatever the host does per batch (the rows, Parquet encoding, the file) must keep up with that, or the
trace runs at the host's speed however the copies overlap. This times the trace loop with a capture that
returns precomputed routing (softmax of random logits, top-K, no drops, already reduced to what the
`--probs` mode keeps, as the GPU reduces it before the copy), so that only the host's share is left:

  pipeline: the loop as `moelab trace` runs it (rows built on one thread, Parquet encoded on others:
            `--encoders`, default the count `write_trace` picks for this machine's cores);
  sync:     the same loop with overlap=False, the reference, in the same process.

Wall time (the pipeline's point is threads), variants interleaved, medians over --rounds. Prints tokens/s
and rows/s of each and their ratio, and the ceiling this host puts on trace / forward for a forward of
--forward-tokens-s. The GPU's own share (the reduction, the copies) is not in it: gpu_check.py's
`real-size` row measures the whole trace against the forward on the GPU.

    python benchmarks/bench_trace_host.py [--probs none,top:8,full] [--encoders 1,4] [--batches 4] [--rounds 3]
                                          [--tiny]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench_real_size import _batches  # beside this file: the token batches its traces take
from moelab.model.moe import LayerRouting
from moelab.trace.build import default_encoders, keep_probs, write_trace
from moelab.trace.capture import CapturedLayer
from moelab.trace.schema import TraceMeta

OLMOE = dict(batch=8, seq=2048, layers=16, experts=64, top_k=8, vocab=50304)
TINY = dict(batch=2, seq=128, layers=2, experts=8, top_k=2, vocab=256)
FORWARD_TOKENS_S = 86026.0  # issue 22: plain transformers forward, OLMoE-1B-7B shape, bf16, one H200


def routing(shape: dict, mode: str, seed: int) -> list[CapturedLayer]:
    """One batch's captured routing, reduced to what `mode` keeps."""
    g = torch.Generator().manual_seed(seed)
    T, E, K = shape["batch"] * shape["seq"], shape["experts"], shape["top_k"]
    out = []
    for layer in range(shape["layers"]):
        logits_TE = torch.randn(T, E, generator=g)
        probs_TE = logits_TE.softmax(-1)
        weights_TK, ids_TK = probs_TE.topk(K, dim=-1)
        out.append(CapturedLayer(LayerRouting(layer, ids_TK, weights_TK, probs_TE,
                                              torch.zeros(T, K, dtype=torch.bool), logits_TE)))
    return keep_probs(out, mode)


def time_loop(shape: dict, mode: str, captured: list, batches: int, overlap: bool, folder: Path,
              encoders: int | None = None) -> float:
    """Wall seconds of one trace of `batches` batches (the routing of batch i is captured[i % 2])."""
    meta = TraceMeta(num_experts=[shape["experts"]] * shape["layers"], top_k=shape["top_k"],
                     labels={"domain": ["web"], "lang": ["en"]})
    data = list(_batches(batches, shape["batch"], shape["seq"], shape["vocab"]))
    T = shape["batch"] * shape["seq"]
    calls = iter(range(batches))

    def capture(batch):
        return captured[next(calls) % len(captured)]

    path = folder / f"{mode.replace(':', '')}-{int(overlap)}-{encoders}.parquet"
    t0 = time.perf_counter()
    stats = write_trace(data, path, meta, capture, optional=[], blocks=list(range(shape["layers"])),
                        max_tokens=batches * T, probs=mode, overlap=overlap, encoders=encoders)
    wall = time.perf_counter() - t0
    assert stats["tokens"] == batches * T
    return wall


def measure(shape: dict, modes: list[str], batches: int, rounds: int, forward_tokens_s: float,
            encoders: list[int | None]) -> list[dict]:
    """One row per (mode, encoders); the sync reference is timed in the same rounds, interleaved."""
    rows = []
    T = shape["batch"] * shape["seq"]
    per_token = shape["layers"] * shape["top_k"]
    with tempfile.TemporaryDirectory() as tmp:
        for mode in modes:
            captured = [routing(shape, mode, seed) for seed in range(2)]
            variants = [(True, n) for n in encoders] + [(False, None)]
            walls: dict[tuple, list[float]] = {v: [] for v in variants}
            time_loop(shape, mode, captured, 1, True, Path(tmp))  # warm-up
            for _ in range(rounds):
                for overlap, n in variants:
                    walls[overlap, n].append(time_loop(shape, mode, captured, batches, overlap, Path(tmp), n))
            sync = walls[False, None]
            sync_tok = batches * T / statistics.median(sync)
            for n in encoders:
                pipe = walls[True, n]
                tok = batches * T / statistics.median(pipe)
                rows.append({"probs": mode, "encoders": n or default_encoders(), "tokens": batches * T,
                             "pipeline_tokens_s": tok, "sync_tokens_s": sync_tok, "pipeline_rows_s": tok * per_token,
                             "pipeline_over_sync_time": statistics.median([p / s for p, s in zip(pipe, sync)]),
                             "ceiling_vs_forward": tok / forward_tokens_s})
                r = rows[-1]
                print(f"--probs {mode:6s} encoders {r['encoders']}: pipeline {tok:,.0f} tokens/s "
                      f"({r['pipeline_rows_s'] / 1e6:.1f}M rows/s), sync {sync_tok:,.0f} tokens/s; "
                      f"pipeline/sync time {r['pipeline_over_sync_time']:.2f}; host ceiling = "
                      f"{r['ceiling_vs_forward']:.2f}x a forward of {forward_tokens_s:,.0f} tokens/s", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--probs", default="none,top:8,full", help="comma-separated --probs modes")
    ap.add_argument("--batches", type=int, default=4, help="batches per timed trace")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tiny", action="store_true", help="a toy shape for the test suite")
    ap.add_argument("--encoders", default="auto",
                    help="comma-separated encoder counts for the pipeline; auto = write_trace's default here")
    ap.add_argument("--forward-tokens-s", type=float, default=FORWARD_TOKENS_S)
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)
    shape = TINY if args.tiny else OLMOE
    modes = [m.strip() for m in args.probs.split(",") if m.strip()]
    if args.tiny:
        modes = [m if not m.startswith("top:") else f"top:{min(int(m[4:]), shape['experts'])}" for m in modes]
    print(f"shape {shape}, {torch.get_num_threads()} torch threads, {args.batches} batches x {args.rounds} rounds",
          flush=True)
    encoders = [None if e.strip() == "auto" else int(e) for e in args.encoders.split(",") if e.strip()]
    rows = measure(shape, modes, args.batches, args.rounds, args.forward_tokens_s, encoders)
    if args.json:
        Path(args.json).write_text(json.dumps({"shape": shape, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
