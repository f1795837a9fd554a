"""GPU check: is moelab's CUDA path real? One script, one table, one JSON file.

    python benchmarks/gpu_check.py [--device cuda] [--json gpu_check.json] [--peak-tflops 989]
    python benchmarks/gpu_check.py --device cpu --tiny     # the same checks at toy sizes (the test suite)

Seven check groups, each a group of rows (`ok` is a correctness verdict; speed rows report, never fail):
1. experts-bf16: grouped experts in bf16 against the naive per-expert loop, forward and every gradient.
   Error = max |fast - reference| / max |reference|, the reference being the naive loop in fp32 on the same
   (bf16-rounded) weights and inputs. Tolerance: 3e-2 (bf16 keeps 8 significant bits, unit roundoff
   3.9e-3, and the result goes through two matmuls and an activation), and at most twice the error of
   the naive loop run in bf16 plus 1e-3, so the grouped kernel is no worse than the plain one. On a GPU
   the row `strategy` must read `grouped`: that is torch._grouped_mm running.
2. layer-bf16: `MoELayer` (+ shared experts) against its dense-FLOP floor, both in bf16, fwd and fwd+bwd.
3. train-step: tokens/s, model FLOPs utilisation and peak memory of each batch tried for a training step
   of `openmoe-base-16e` (sequence 2048, the largest batch that fits) in four variants: fp32 parameters
   under bf16 autocast; bf16 parameters + fp32 masters + the chunked loss + fused AdamW; the same with
   activation checkpointing; the same with compiled blocks. The FLOP count is printed, and torch.profiler's
   operator table of the bf16-parameter step is written beside the JSON (<json>.profile_train_step.txt).
   peers: moelab's MoELayer against transformers' Mixtral and Qwen3-MoE sparse blocks at their shapes,
   with every experts implementation the installed transformers registers (one that cannot run here is a
   row saying why). profile: torch.profiler's operator table of the E64 layer's fwd+bwd
   (<json>.profile_e64_layer.txt).
   routing-compile: the routing path (model/route_plan.py) compiled / eager: the call, whether both route
   alike, the E64 layer fwd and fwd+bwd with compiled routing, and the decision `model.compile_routing=auto`
   follows once `--record` files it (gpu_check_routing.py).
4. hf-trace: a small transformers Mixtral built from a config (no download) traced on the device, rows
   checked against the experts its own router modules returned.
5. distributed: a one-process group (nccl on cuda, gloo on cpu; world 1, dp = ep = 1): all-reduce,
   expert parallelism's all-to-all against the plain experts, metric reduction.
6. real-size: bench_real_size.py's model rows on the device (OLMoE-1B-7B's shape, random weights, bf16;
   --tiny: its tiny shape): trace tokens/s with --probs none / top:N / full as ratios to the plain forward,
   beside issue 22's targets (0.8x without probabilities, 0.5x with full), and intervene s per ablation.
They run cheap verdicts first (experts-bf16, hf-trace, distributed), then the speed rows, the training step
last; no check starts after --budget-s seconds (360: the script's six minutes), one that would is a failed
"not run" row. The JSON is saved after every check ("complete": false until the last has run), so a run
stopped at a time limit keeps what finished. `--record` files routing-compile's decision where
`model.compile_routing=auto` reads it.
Exit status: 0 when every row is ok, 1 when a check failed, 2 on bad arguments (no CUDA for --device cuda).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import bench_common as bc  # noqa: E402
import gpu_check_parts as parts  # noqa: E402
import gpu_check_routing as routing  # noqa: E402


def experts_bf16(dev: torch.device, tiny: bool) -> list[dict]:
    size = dict(E=8, K=2, D=32, F=48, T=96) if tiny else dict(E=64, K=6, D=1024, F=512, T=8192)
    ex32, x, ids, w = parts.expert_problem(dev, **size)
    g = torch.randn_like(x)
    ref = parts.experts_pass(ex32, x, ids, w, g, naive=True)
    ex16 = parts.copy_experts(ex32, torch.bfloat16)
    fast = parts.experts_pass(ex16, x.bfloat16(), ids, w, g.bfloat16(), naive=False)
    slow = parts.experts_pass(ex16, x.bfloat16(), ids, w, g.bfloat16(), naive=True)
    strategy = parts.strategy_of(ex16, x)
    rows = [parts.row("experts-bf16", "strategy (grouped = torch._grouped_mm)", strategy, None,
                      strategy == "grouped" or dev.type == "cpu",
                      f"E {size['E']} top-{size['K']}, D {size['D']}, F {size['F']}, {size['T']} tokens")]
    for name in ref:
        err, base = parts.rel_err(fast[name], ref[name]), parts.rel_err(slow[name], ref[name])
        limit = min(3e-2, 2 * base + 1e-3)
        rows.append(parts.row("experts-bf16", f"{name}: error vs fp32 naive loop", err, limit,
                              err <= limit, f"naive loop in bf16: {base:.1e}"))
    return rows


def layer_bf16(dev: torch.device, tiny: bool) -> list[dict]:
    cases = ([dict(E=8, K=2, F=64, shared=1, D=64, T=128)] if tiny else
             [dict(E=64, K=6, F=512, shared=2, D=2048, T=16384), dict(E=8, K=2, F=4096, shared=0, D=2048, T=16384)])
    rows = []
    for c in cases:
        name = f"E {c['E']} top-{c['K']}" + (f" + {c['shared']} shared" if c["shared"] else "") + \
            f", D {c['D']}, F {c['F']}, {c['T']} tokens"
        for backward in (False, True):
            t = bc.interleaved(parts.layer_variants(dev, c, backward), reps=3 if tiny else 10,
                               warmup=1 if tiny else 3, device=dev.type)
            kind = "fwd+bwd" if backward else "fwd"
            rows.append(parts.row("layer-bf16", f"{name}, {kind}: MoELayer / dense floor",
                                  t.ratio("moe", "dense"), None, True,
                                  f"{t.median('moe') * 1e3:.2f} ms vs {t.median('dense') * 1e3:.2f} ms"))
    return rows


RECORDS: dict = {}  # what a check leaves for the JSON beside its rows (routing-compile's decision)


def routing_compile(dev: torch.device, tiny: bool) -> list[dict]:
    """Compiled / eager routing: the call, its agreement, the E64 layer fwd and fwd+bwd, the decision."""
    backend = "aot_eager" if tiny and dev.type == "cpu" else "inductor"  # a CPU has no C++-free inductor
    c = routing.CASES["tiny" if tiny else "gpu"]
    rows, rec = routing.rows_and_record(dev, c, torch.bfloat16, backend, reps=3 if tiny else 10,
                                        warmup=1 if tiny else 3)
    RECORDS["routing_compile"] = {"device_key": routing.rp.device_key(dev), **rec}
    return rows


# (label, options of parts.fitting_train_step, batches tried, timed steps): sized so the four variants of
# openmoe-base-16e at seq 2048 stay within about two minutes of an H200.
STEP_VARIANTS = [
    ("autocast fp32 params (the loop before issue 20)", {}, [16, 8, 4, 2, 1], 3),
    ("bf16 params + chunked loss + AdamW (fused on CUDA)", dict(bf16_params=True, chunked_loss=True), [16, 8, 4, 2, 1], 3),
    ("... + activation checkpointing", dict(bf16_params=True, chunked_loss=True, activation_checkpointing=True),
     [16, 8], 3),
    ("... + compile (blocks)", dict(bf16_params=True, chunked_loss=True, compile_backend="inductor"), [8, 4, 2, 1], 3),
]


def train_step(dev: torch.device, tiny: bool, peak_tflops: float | None, out_json: Path) -> list[dict]:
    preset, seq = ("tiny-moe", 64) if tiny else ("openmoe-base-16e", 2048)
    peak = peak_tflops or parts.peak_bf16_tflops(dev)
    rows, profiled, flops = [], False, None
    for label, opts, batches, steps in STEP_VARIANTS:
        if tiny:  # a CPU has no C++-free inductor: aot_eager still runs dynamo and AOT autograd
            batches, steps = [4, 2], 2
            if "compile_backend" in opts:
                opts = {**opts, "compile_backend": "aot_eager"}
        info = {}
        try:
            cfg, batch, seconds, steps = parts.fitting_train_step(preset, seq, dev, batches, steps=steps, info=info,
                                                                  **opts)
        except Exception as e:  # noqa: BLE001 - one variant failing (a compile error) keeps the others' rows
            why = (str(e).strip().splitlines() or [""])[0][:300]
            rows.append(parts.row("train-step", f"{preset}, seq {seq}, {label}", "failed", None, False,
                                  f"{type(e).__name__}: {why}"))
            continue
        flops = flops_tok, formula = parts.flops_per_token(cfg, seq)
        tok_s = batch * seq * steps / seconds
        mfu = flops_tok * tok_s / (peak * 1e12) if peak else None
        mem = ", ".join(f"batch {b}: {v if v == 'OOM' else f'{v} GiB'}" for b, v in info["peak_gib"].items())
        backend = f", compile backend {opts['compile_backend']}" if "compile_backend" in opts else ""
        rows.append(parts.row("train-step", f"{preset}, seq {seq}, {label}: batch {batch}, tokens/s", tok_s,
                              None, True, f"{steps} timed steps, bf16 autocast{backend}"))
        rows.append(parts.row("train-step", f"{label}: MFU", mfu if mfu is not None else "-", None, True,
                              f"peak {peak:g} TFLOP/s bf16 dense" if peak else "no peak known for this device "
                              "(pass --peak-tflops)"))
        rows.append(parts.row("train-step", f"{label}: peak memory per batch tried", mem or "-", None, True,
                              "torch.cuda.max_memory_allocated" if dev.type == "cuda" else "CUDA only"))
        if not profiled and opts.get("bf16_params"):
            path = out_json.with_suffix(".profile_train_step.txt")
            op, share = parts.profile_ops(info["step"], dev, path, f"{preset}, seq {seq}, batch {batch}, {label}")
            rows.append(parts.row("train-step", f"{label}: per-operator profile", str(path.name), None, True,
                                  f"top self time: {op} ({share:.0%})"))
            profiled = True
        del info
    if flops is not None:
        rows.insert(1, parts.row("train-step", "model FLOPs per token (fwd+bwd)", flops[0], None, True, flops[1]))
    return rows


# Peer shapes: Mixtral-8x7B's and Qwen3-30B-A3B's MoE blocks, as issue 20 measured them.
PEER_SHAPES = {"mixtral": dict(D=4096, F=14336, E=8, K=2, T=8192),
               "qwen3-moe": dict(D=2048, F=768, E=128, K=8, T=16384)}


def peers(dev: torch.device, tiny: bool) -> list[dict]:
    rows = []
    for family, c in PEER_SHAPES.items():
        if tiny:
            c = dict(D=64, F=96, E=8, K=2, T=128)
        shape = f"{family} shape (D {c['D']}, F {c['F']}, E {c['E']} top-{c['K']}, {c['T']} tokens)"
        for backward in (False, True):
            kind = "fwd+bwd" if backward else "fwd"
            fns, skipped = parts.peer_variants(dev, family, c, backward)
            t = bc.interleaved(fns, reps=3 if tiny else 5, warmup=1, device=dev.type)
            for name in [n for n in fns if n != "moelab"]:
                rows.append(parts.row("peers", f"{shape}, {kind}: moelab / {name}", t.ratio("moelab", name),
                                      None, True, f"{t.median('moelab') * 1e3:.2f} ms vs "
                                                  f"{t.median(name) * 1e3:.2f} ms, bf16"))
            for name, why in skipped.items():
                rows.append(parts.row("peers", f"{shape}, {kind}: moelab / {name}", "did not run", None, True, why))
            del fns
    return rows


def profile(dev: torch.device, tiny: bool, out_json: Path) -> list[dict]:
    c = dict(E=8, K=2, F=64, shared=1, D=64, T=128) if tiny else dict(E=64, K=6, F=512, shared=2, D=2048, T=16384)
    fn = parts.layer_variants(dev, c, backward=True)["moe"]
    path = out_json.with_suffix(".profile_e64_layer.txt")
    title = f"MoELayer E {c['E']} top-{c['K']} + {c['shared']} shared, D {c['D']}, F {c['F']}, {c['T']} tokens, fwd+bwd, bf16"
    op, share = parts.profile_ops(fn, dev, path, title)
    return [parts.row("profile", f"{title}: per-operator profile", path.name, None, True,
                      f"top self time: {op} ({share:.0%})")]


def hf_trace(dev: torch.device, tiny: bool) -> list[dict]:
    n_tok, agree, rows_written = parts.trace_tiny_hf(dev, tokens=64 if tiny else 4096)
    return [parts.row("hf-trace", "tiny Mixtral from a config: trace rows equal its own router's choices",
                      agree, 1.0, agree == 1.0, f"{n_tok} tokens, {rows_written} rows")]


def distributed(dev: torch.device, tiny: bool) -> list[dict]:
    out = parts.one_process_group(dev, tokens=64 if tiny else 4096)
    return [parts.row("distributed", f"{out['backend']}: {name}", err, 1e-5,
                      isinstance(err, float) and err <= 1e-5, "world 1, dp = ep = 1")
            for name, err in out["errors"].items()]


TRACE_VARIANTS = {"sync": " (no writer thread)", "1enc": " (one encoder)"}


def real_size(dev: torch.device, tiny: bool) -> list[dict]:
    import tempfile
    from types import SimpleNamespace

    import bench_real_size as brs

    args = SimpleNamespace(config="OlmoeConfig", device=dev.type, tiny=tiny, narrow=False, batches=2 if tiny else 4,
                           top_n=None, ablations=2 if tiny else 8)
    threads = torch.get_num_threads()  # model_rows times at one thread; train-step builds its model after
    try:
        with tempfile.TemporaryDirectory() as tmp:
            out = brs.model_rows(args, Path(tmp))
    finally:
        torch.set_num_threads(threads)
    shape = "tiny OLMoE" if tiny else "OLMoE-1B-7B shape, bf16"
    targets = {"none": 0.8, "full": 0.5}
    rows = [parts.row("real-size", f"{shape}: trace --probs {name.split('_')[0]}"
                      f"{TRACE_VARIANTS.get(name.partition('_')[2], '')} / plain forward", r["ratio"],
                      targets.get(name), True, f"{r['tok_s']:,.0f} tok/s, {r['mib']:.1f} MiB; forward "
                      f"{out['forward_tok_s']:,.0f} tok/s, {out['tokens']:,} tokens"
                      f"{'; a target, not a verdict' if name in targets else ''}")
            for name, r in out["trace"].items()]
    iv = out["intervene"]
    return rows + [parts.row("real-size", f"{shape}: intervene s per single-expert ablation", iv["s_per_ablation"],
                             None, True, f"{iv['vs_forwards']:.2f}x the time of {iv['ablations'] + 1} plain "
                             f"forwards over {out['tokens']:,} tokens")]


# Cheap correctness checks first, the training step (the longest) last: under --budget-s the checks that
# do not start are the speed rows, not the verdicts.
CHECKS = {"experts-bf16": experts_bf16, "hf-trace": hf_trace, "distributed": distributed,
          "layer-bf16": layer_bf16, "routing-compile": routing_compile, "peers": peers, "profile": profile,
          "real-size": real_size, "train-step": train_step}


def free_memory(dev: torch.device) -> None:
    """What a finished check left unreferenced, collected, so it does not count in the next one's memory."""
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def run_checks(dev: torch.device, tiny: bool, peak_tflops: float | None, only: list[str],
               out_json: Path = Path("gpu_check.json"), budget_s: float = float("inf"),
               save=None) -> list[dict]:
    """Each check in order; one that would start after `budget_s` seconds is a failed row saying so,
    so a slow machine still ends in time with the table of what ran. `save(rows)` after each check: a run
    killed at the device's time limit still leaves the rows of the checks that finished."""
    rows, start = [], time.perf_counter()
    for name, check in CHECKS.items():
        if only and name not in only:
            continue
        t0 = time.perf_counter()
        if t0 - start > budget_s:
            rows.append(parts.row(name, "not run", f"the {budget_s:g} s budget was spent after {t0 - start:.0f} s",
                                  None, False, "rerun with --only " + name))
            continue
        try:
            if name == "train-step":
                got = check(dev, tiny, peak_tflops, out_json)
            else:
                got = check(dev, tiny, out_json) if name == "profile" else check(dev, tiny)
        except Exception as e:  # one failed check must not hide the others' rows
            traceback.print_exc(file=sys.stderr)
            got = [parts.row(name, "crashed", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                             None, False)]
        for r in got:
            r["seconds"] = round(time.perf_counter() - t0, 2)
        rows += got
        free_memory(dev)
        if save is not None:
            save(rows)
        print(f"{name}: done in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    return rows


def device_info(dev: torch.device) -> dict:
    info = {"device": str(dev), "torch": torch.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    if dev.type == "cuda":
        info["card"] = torch.cuda.get_device_name(dev)
        info["cuda"] = torch.version.cuda
    return info


def _argument_problem(args, dev: torch.device | None, only: list[str]) -> str | None:
    """The first thing wrong with the command line, checked before any work so nothing is half-written."""
    bad = [o for o in only if o not in CHECKS]
    if dev is None:
        return f"--device {args.device!r} is not a device name"
    if dev.type == "cuda" and not torch.cuda.is_available():
        return "--device cuda, but torch sees no CUDA device here"
    if bad:
        return f"--only: unknown check(s) {', '.join(bad)} (known: {', '.join(CHECKS)})"
    if args.record and (args.tiny or (only and "routing-compile" not in only)):
        return "--record files the routing-compile decision of a full-size run: drop --tiny, keep that check"
    if not Path(args.json).parent.is_dir():
        return f"--json {args.json}: folder {Path(args.json).parent} does not exist"
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    ap.add_argument("--tiny", action="store_true", help="toy sizes: seconds on a CPU (the test suite's mode)")
    ap.add_argument("--json", default="gpu_check.json", help="where the table goes as JSON (%(default)s)")
    ap.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak, for MFU")
    ap.add_argument("--only", help="comma-separated checks: " + ",".join(CHECKS))
    ap.add_argument("--budget-s", type=float, default=360.0,
                    help="no check starts after this many seconds (%(default)s: the script's 6 minutes)")
    ap.add_argument("--record", action="store_true",
                    help="file the routing-compile decision in src/moelab/model/routing_compile.json")
    args = ap.parse_args(argv)
    only = args.only.split(",") if args.only else []
    try:
        dev = torch.device(args.device)
    except RuntimeError:
        dev = None
    problem = _argument_problem(args, dev, only)
    if problem:
        print(f"gpu_check: {problem}", file=sys.stderr)
        return 2
    bc.setup(threads=1 if dev.type == "cpu" else torch.get_num_threads())
    RECORDS.clear()
    info = device_info(dev)

    def save(rows: list[dict], complete: bool = False) -> None:
        tmp = Path(args.json + ".tmp")  # replaced whole: a kill mid-write leaves the previous save
        tmp.write_text(json.dumps({**info, "tiny": args.tiny, "complete": complete, "rows": rows, **RECORDS},
                                  indent=1))
        os.replace(tmp, args.json)

    rows = run_checks(dev, args.tiny, args.peak_tflops, only, Path(args.json), args.budget_s, save)
    print(parts.table(rows, info))
    save(rows, complete=True)
    print(f"wrote {args.json}")
    if args.record and "routing_compile" in RECORDS:
        rec = dict(RECORDS["routing_compile"])
        routing.record(rec.pop("device_key"), {**rec, "date": info["date"]})
        print(f"recorded the routing-compile decision in {routing.rp.RECORD}")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
