"""Real-size MoE end to end: plain forward vs `trace --hf`, and the analysis at 1 and N workers.

A model of any transformers MoE config class by name (default OLMoE-1B-7B's shape), random weights:
    python benchmarks/bench_real_size.py [--config OlmoeConfig] [--device cuda|cpu] [--tiny] [--workers N]
`--tiny` shrinks the config (2 layers, d 64, 8 experts top-2) for the test suite and CPU rows; `--narrow`
keeps OLMoE's routing shape (16 layers, top-8 of 64) with d 128, batches of 4 x 256.
`--analysis-only TRACE` times only the analysis of an existing trace (e.g. one from analysis_scale.py).

Measured: forward tokens/s (the reference); trace tokens/s for `--probs none`, `top:N` and `full` (and
`full` without the writer thread), each as a ratio to the forward in the same process, with its file size
(and the full trace's size had `probs` stayed float32, re-encoded the same way); intervene seconds per
single-expert ablation (`intervene --hf`'s run_ablation) beside the plain forward over the same tokens;
analysis rows/s at 1 and N workers, each in a fresh process so that its peak RSS (parent + largest child)
is its own.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OLMOE_1B_7B = dict(num_hidden_layers=16, hidden_size=2048, intermediate_size=1024, num_experts=64,
                   num_experts_per_tok=8, num_attention_heads=16, num_key_value_heads=16, vocab_size=50304)
# OLMoE-1B-7B's routing (16 layers, top-8 of 64) with narrow layers: a real trace's rows and columns per token
# at a cost a CPU can run.
NARROW = dict(OLMOE_1B_7B, hidden_size=128, intermediate_size=64, num_attention_heads=4, num_key_value_heads=4,
              vocab_size=1024)
TINY = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=32, num_experts=8, num_experts_per_tok=2,
            num_attention_heads=4, num_key_value_heads=4, vocab_size=256, eos_token_id=None, pad_token_id=None)


def _peak_gib() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return (own + kids) / 2**20  # KiB on Linux; the largest child, not their sum (an upper bound for 2)


def analysis_once(trace_path: str, workers: int) -> dict:
    """One analysis of the trace, in this process: wall, rows/s, peak RSS."""
    import torch

    from moelab.analysis import analyze_all
    from moelab.trace.io import open_trace

    torch.set_num_threads(1)
    trace = open_trace(trace_path)
    t0, phases = time.perf_counter(), {}
    analyze_all(trace, workers=workers, timings=phases)
    wall = time.perf_counter() - t0
    return {"workers": workers, "rows": trace.num_rows, "wall_s": wall, "rows_per_s": trace.num_rows / wall,
            "peak_gib": _peak_gib(), **phases}


def analysis_rows(trace_path: str, workers: list[int]) -> list[dict]:
    """Each worker count in a fresh interpreter (its own peak RSS), in turn."""
    out = []
    for n in workers:
        cmd = [sys.executable, __file__, "--analysis-once", trace_path, "--workers", str(n)]
        res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if res.returncode:
            raise SystemExit(f"analysis with {n} worker(s) failed: {res.stderr.strip().splitlines()[-1:]}")
        out.append(json.loads(res.stdout.strip().splitlines()[-1]))
    return out


def print_analysis(rows: list[dict]) -> None:
    base = rows[0]["rows_per_s"]
    for r in rows:
        print(f"analysis  {r['workers']:2d} worker(s): {r['rows']:,} rows in {r['wall_s']:.1f} s = "
              f"{r['rows_per_s']:,.0f} rows/s ({r['rows_per_s'] / base:.2f}x 1 worker; streaming {r['stream_s']:.1f} s, "
              f"finalisation {r['finalise_s']:.1f} s), peak {r['peak_gib']:.2f} GiB")


def _batches(n: int, batch: int, seq: int, vocab: int, seed: int = 0):
    """Random token batches in the shape the trace loop takes (one document per row, no padding)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        ids = torch.randint(0, vocab, (batch, seq), generator=g)
        zeros = torch.zeros_like(ids)
        yield {"input_ids": ids, "labels": ids, "doc": zeros, "pos": torch.arange(seq).expand(batch, seq).clone(),
               "domain_id": zeros, "lang_id": zeros, "turn": zeros}


def probs_widths(path: Path, probs_TLE) -> dict:
    """The full trace re-encoded from memory with the writer's row groups, `probs` as float16 (the file's own
    values) and as float32 (the router's values `probs_TLE`, [T, L, E]), both with the writer's options
    (`io.parquet_options`), and float32 as the writer before issue 22 encoded it (`f32_before`: zstd,
    dictionary attempted, plain floats): file sizes and Parquet write seconds. The float16 column must be
    the float32 one rounded."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from moelab.trace.io import parquet_options

    file = pq.ParquetFile(path)
    table = file.read()
    rank0 = table.column("rank").to_numpy() == 0
    flat = probs_TLE.reshape(-1).numpy()
    E = probs_TLE.shape[-1]
    offsets = np.concatenate([[0], np.cumsum(np.where(rank0, E, 0))]).astype(np.int32)
    wide = pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat), mask=pa.array(~rank0))
    stored = table.column("probs").combine_chunks()
    if not np.array_equal(stored.flatten().to_numpy(zero_copy_only=False), flat.astype(np.float16)):
        raise SystemExit("the full trace's probs are not the router's float32 values rounded to float16")
    out = {}
    rows = [file.metadata.row_group(g).num_rows for g in range(file.metadata.num_row_groups)]
    for name, column in (("f16", stored), ("f32", wide), ("f32_before", wide)):
        t = table.set_column(table.schema.get_field_index("probs"), pa.field("probs", column.type), column)
        opts = dict(compression="zstd") if name == "f32_before" else parquet_options(t.schema)
        dest = path.with_suffix(f".{name}.parquet")
        t0 = time.perf_counter()
        with pq.ParquetWriter(dest, t.schema, **opts) as w:
            start = 0
            for r in rows:
                w.write_table(t.slice(start, r), row_group_size=r)
                start += r
        out[f"write_s_{name}"] = time.perf_counter() - t0
        out[f"mib_{name}"] = dest.stat().st_size / 2**20
        dest.unlink()
    return out


def router_probs_TLE(model, rec, batches, device: str):
    """The router's float32 distributions over the batches (no padding, so token order is the trace's)."""
    import torch

    out = []
    for b in batches:
        model(input_ids=b["input_ids"].to(device), use_cache=False)
        out.append(torch.stack([c.routing.probs_TE.float() for c in rec.pop()], dim=1).cpu())
    return torch.cat(out)


def intervene_rows(model, args, n: int, batch: int, seq: int, vocab: int) -> dict:
    """`intervene --hf`'s ablation loop (one whole forward per ablated expert) over the forward's tokens:
    seconds per ablation, and the loop's time over (ablations + 1) plain forwards (1.0: no overhead), the
    plain pass timed just before and just after the loop (mean), so that both see the same machine load."""
    import torch

    from moelab.intervene import hf_runner
    from moelab.intervene.hf_edit import hf_moe
    from moelab.intervene.study import run_ablation

    block = max(hf_moe(model).blocks)
    m = args.ablations
    targets = [(block, (e,)) for e in range(m)]
    data = list(_batches(n, batch, seq, vocab))

    def plain() -> float:
        t0 = time.perf_counter()
        for b in data:
            model(input_ids=b["input_ids"].to(args.device), use_cache=False)
        _sync(args.device)
        return time.perf_counter() - t0

    with torch.no_grad():
        run_ablation(model, data[:1], targets[:1], None, ops=hf_runner)  # warm-up
        before = plain()
        t0 = time.perf_counter()
        run_ablation(model, data, targets, None, ops=hf_runner)
        _sync(args.device)
        wall = time.perf_counter() - t0
        forward_s = (before + plain()) / 2
    return {"block": block, "ablations": m, "wall_s": wall, "s_per_ablation": wall / m, "forward_s": forward_s,
            "vs_forwards": wall / ((m + 1) * forward_s)}


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def model_rows(args, tmp: Path) -> dict:
    """Forward vs trace tokens/s of a random-weight model of the named config class."""
    import torch
    import transformers

    from moelab.trace.adapters import HFRoutingRecorder
    from moelab.trace.build import write_trace
    from moelab.trace.hf import probe
    from moelab.trace.schema import TraceMeta

    torch.set_num_threads(1)
    shape = dict(TINY if args.tiny else NARROW if args.narrow else OLMOE_1B_7B)
    shape["num_local_experts"] = shape["num_experts"]  # Mixtral's spelling; unused keys stay inert
    cls = getattr(transformers, args.config, None)
    if cls is None or not isinstance(cls, type) or not issubclass(cls, transformers.PretrainedConfig):
        raise SystemExit(f"--config {args.config!r} is not a transformers config class")
    torch.manual_seed(0)
    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    with torch.device(args.device):  # random weights drawn where they run: a 7B model's CPU init takes minutes
        model = transformers.AutoModelForCausalLM.from_config(cls(**shape), dtype=dtype).eval()
    if args.narrow:  # the router logits' spread of d 2048 (std ~0.9 on unit-RMS inputs), not of d 128's
        with torch.no_grad():
            for m in model.modules():
                if type(m).__name__.endswith(("TopKRouter", "Router")) and hasattr(m, "weight"):
                    m.weight.mul_((OLMOE_1B_7B["hidden_size"] / shape["hidden_size"]) ** 0.5)
    batch, seq = (2, 64) if args.tiny else (4, 256) if args.narrow else (8, 2048)
    n = args.batches
    tokens = n * batch * seq

    @torch.no_grad()
    def forward() -> float:
        t0 = time.perf_counter()
        for b in _batches(n, batch, seq, shape["vocab_size"]):
            model(input_ids=b["input_ids"].to(args.device), use_cache=False)
        _sync(args.device)
        return tokens / (time.perf_counter() - t0)

    out: dict = {"config": args.config, "device": args.device, "tiny": args.tiny, "narrow": args.narrow,
                 "tokens": tokens, "trace": {}}
    forward()  # warm-up, outside the recorder: the plain forward is the reference
    out["forward_tok_s"] = forward()
    top_n = args.top_n or min(8, max(shape["num_experts_per_tok"], shape["num_experts"] // 2))
    with torch.no_grad(), HFRoutingRecorder(model, model.config.model_type) as rec:
        widths, top_k, _ = probe(model, rec)

        def capture(b):
            model(input_ids=b["input_ids"].to(args.device), use_cache=False)
            return rec.pop()

        warm = TraceMeta(num_experts=widths, top_k=top_k, labels={"domain": ["d"], "lang": ["l"]},
                         extra={"moe_blocks": list(range(len(widths)))})
        write_trace(_batches(1, batch, seq, shape["vocab_size"]), tmp / "warm.parquet", warm, capture, optional=[],
                    blocks=warm.extra["moe_blocks"], max_tokens=batch * seq, probs="full")  # first-use costs
        # full: the encoders write_trace picks here; full_1enc: one encoder; full_sync: no writer thread (the
        # loop before issue 22)
        for name in ("none", f"top:{top_n}", "full", "full_1enc", "full_sync"):
            meta = TraceMeta(num_experts=widths, top_k=top_k, labels={"domain": ["d"], "lang": ["l"]},
                             extra={"moe_blocks": list(range(len(widths)))})
            path = tmp / f"trace_{name.replace(':', '')}.parquet"
            t0 = time.perf_counter()
            stats = write_trace(_batches(n, batch, seq, shape["vocab_size"]), path, meta, capture, optional=[],
                                blocks=meta.extra["moe_blocks"], max_tokens=tokens, probs=name.split("_")[0],
                                overlap=name != "full_sync", encoders=1 if name == "full_1enc" else None)
            _sync(args.device)
            rate = stats["tokens"] / (time.perf_counter() - t0)
            out["trace"][name] = {"tok_s": rate, "ratio": rate / out["forward_tok_s"], "rows": stats["rows"],
                                   "mib": path.stat().st_size / 2**20}
            if name == "full":
                probs_TLE = router_probs_TLE(model, rec, _batches(n, batch, seq, shape["vocab_size"]), args.device)
                out["trace"][name]["probs_widths"] = probs_widths(path, probs_TLE)
                out["trace_path"] = str(path)
    out["intervene"] = intervene_rows(model, args, n, batch, seq, shape["vocab_size"])
    for probs, r in out["trace"].items():
        w = r.get("probs_widths")
        f32 = (f"; re-encoded with probs float16 / float32 / float32 as before: {w['mib_f16']:.3f} / "
               f"{w['mib_f32']:.3f} / {w['mib_f32_before']:.3f} MiB, written in {w['write_s_f16']:.2f} / "
               f"{w['write_s_f32']:.2f} / {w['write_s_f32_before']:.2f} s") if w else ""
        print(f"trace {probs}: {r['tok_s']:,.0f} tok/s = {r['ratio']:.2f}x the forward "
              f"({out['forward_tok_s']:,.0f} tok/s), {r['rows']:,} rows, {r['mib']:.3f} MiB{f32}")
    iv = out["intervene"]
    print(f"intervene --hf: {iv['ablations']} single-expert ablations of block {iv['block']} over {tokens:,} tokens "
          f"in {iv['wall_s']:.2f} s = {iv['s_per_ablation']:.3f} s per ablation, {iv['vs_forwards']:.2f}x the time "
          f"of {iv['ablations'] + 1} plain forwards")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="OlmoeConfig", help="a transformers MoE config class name")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--narrow", action="store_true", help="OLMoE-1B-7B's routing shape (16 layers, top-8 of 64) "
                                                          "with d 128: a real trace's row shape on a CPU")
    ap.add_argument("--batches", type=int, default=4, help="forward batches per measurement")
    ap.add_argument("--top-n", type=int, default=None, help="N of the top:N trace (default: min(8, max(k, E/2)))")
    ap.add_argument("--ablations", type=int, default=None, help="experts ablated one at a time (default 8, --tiny 2)")
    ap.add_argument("--workers", type=int, default=None, help="N for the analysis rows (default: cores)")
    ap.add_argument("--analysis-only", default=None, metavar="TRACE")
    ap.add_argument("--analysis-once", default=None, metavar="TRACE", help=argparse.SUPPRESS)
    ap.add_argument("--json", default=None, metavar="PATH")
    args = ap.parse_args()
    if args.analysis_once:
        print(json.dumps(analysis_once(args.analysis_once, args.workers or 1)))
        return
    from moelab.analysis.parallel import available_cores

    n = args.workers or available_cores()
    counts = [1] + ([n] if n > 1 else [])
    if args.analysis_only:
        rows = analysis_rows(args.analysis_only, counts)
        print_analysis(rows)
        if args.json:
            Path(args.json).write_text(json.dumps({"analysis": rows}, indent=1))
        return
    args.ablations = args.ablations or (2 if args.tiny else 8)
    with tempfile.TemporaryDirectory() as tmp:
        result = model_rows(args, Path(tmp))
        result["analysis"] = analysis_rows(result.pop("trace_path"), counts)
    print_analysis(result["analysis"])
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
