"""Opening a moelab checkpoint: time and peak memory of each way, every variant in a fresh process.

Rows (ratios of process CPU time, one thread, variants interleaved round by round, medians):
- load: `load_model` (the model built on the meta device, the file's tensors assigned) vs building it at
  random and copying the file in (`build_model` + `load_weights`, what load_model did before stop 37).
- weights: `checkpoint_weight_layers` (a layer's tensors read from the file when asked for) vs the weight
  layers of the whole loaded model, each followed by the same `weight_analysis`.
- train: the model `train --init` / `--resume` starts from (`train.loop._build`: built on the meta device,
  the file's tensors assigned, then copied into memory of its own on CPU) vs building it from train.seed
  at random and copying the file in (what train did before).
Peak memory, sampled every 2 ms less its value before the work (imports done), per variant (median over
rounds): the child's anonymous RSS (its heap) and its whole RSS (heap plus mapped file pages). safetensors
0.8 maps the file copy-on-write, so tensors read from it and never written stay file pages: clean page
cache, which the kernel can drop and read again, not heap.

    python benchmarks/bench_checkpoint_load.py [--tiny] [--reps 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

# d 1024, 8 layers of E 16 (top-2, F 1024), vocabulary 32k: 501.9M parameters, a 1.9 GB file
DEFAULT = dict(vocab_size=32000, d_model=1024, n_layers=8, n_heads=8, ffn_hidden=2048, max_seq_len=2048,
               moe=dict(num_experts=16, top_k=2, moe_every=1, expert_hidden=1024))
TINY = dict(vocab_size=500, d_model=64, n_layers=3, n_heads=4, ffn_hidden=128, max_seq_len=64,
            moe=dict(num_experts=4, top_k=2, moe_every=1, expert_hidden=64, num_shared_experts=1))
VARIANTS = {"load": ("meta", "copy"), "weights": ("lazy", "whole"), "train": ("train-meta", "train-random")}


def _rss_kib() -> tuple[int, int]:
    """(anonymous, anonymous + file-backed) resident KiB of this process."""
    got = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("RssAnon:", "RssFile:")):
            got[line.split(":")[0]] = int(line.split()[1])
    return got.get("RssAnon", 0), got.get("RssAnon", 0) + got.get("RssFile", 0)


def child(variant: str, ckpt: str) -> dict:
    """Run one variant once in this process; its CPU seconds and peak anonymous RSS growth."""
    from types import SimpleNamespace

    import torch

    from moelab.analysis import weight_analysis
    from moelab.model.config import ModelConfig
    from moelab.model.transformer import build_model
    from moelab.trace.weights import checkpoint_weight_layers, model_weight_layers
    from moelab.train.checkpoint import load_model, load_weights, read_checkpoint_config

    torch.set_num_threads(1)
    cfg = ModelConfig.from_dict(read_checkpoint_config(ckpt)["model"], path="model")
    run = SimpleNamespace(model=cfg, train=SimpleNamespace(seed=0))
    work = {
        "meta": lambda: load_model(ckpt),
        "copy": lambda: load_weights(build_model(cfg), ckpt),
        "lazy": lambda: weight_analysis(checkpoint_weight_layers(ckpt)),
        "whole": lambda: weight_analysis(model_weight_layers(load_model(ckpt))),
        "train-meta": lambda: importlib.import_module("moelab.train.loop")._build(run, ckpt, torch.device("cpu")),
        "train-random": lambda: load_weights(build_model(cfg, seed=0), ckpt),
    }[variant]
    # Imported before the clock and the baseline, each variant only what it uses (each child is a fresh process).
    for module in {"lazy": ("moelab.hf.io",), "whole": ("moelab.hf.io",), "train-meta": ("moelab.train.loop",)}.get(
            variant, ()) + ("moelab.model.moe",):
        importlib.import_module(module)

    base = _rss_kib()
    peak, done = list(base), threading.Event()

    def sample():
        while not done.is_set():
            now = _rss_kib()
            peak[:] = [max(a, b) for a, b in zip(peak, now)]
            time.sleep(0.002)

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    t0 = time.process_time()
    result = work()
    cpu = time.process_time() - t0
    done.set()
    watcher.join()
    peak[:] = [max(a, b) for a, b in zip(peak, _rss_kib())]
    del result
    return {"cpu_s": cpu, "peak_gib": (peak[0] - base[0]) / 2**20, "peak_rss_gib": (peak[1] - base[1]) / 2**20}


def write_checkpoint(cfg: dict, folder: Path) -> Path:
    from moelab.model.config import ModelConfig
    from moelab.model.transformer import build_model
    from moelab.train.checkpoint import save_checkpoint

    model_cfg = ModelConfig.from_dict(cfg, path="model")
    model = build_model(model_cfg, seed=0)
    return save_checkpoint(folder / "ck", model, {"model": model_cfg.to_dict()}, 0)


def run_child(variant: str, ckpt: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, __file__, "--child", variant, "--ckpt", str(ckpt)],
                         capture_output=True, text=True, env=env, check=False)
    if res.returncode != 0:
        raise SystemExit(f"{variant} failed: {res.stderr.strip().splitlines()[-1:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="a small model (the test suite's)")
    ap.add_argument("--reps", type=int, default=3, help="rounds, each variant once a round")
    ap.add_argument("--json", help="write the rows here as JSON")
    ap.add_argument("--child", choices=[v for pair in VARIANTS.values() for v in pair], help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.ckpt)))
        return
    from bench_common import Timings, emit

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = write_checkpoint(TINY if args.tiny else DEFAULT, Path(tmp))
        size = (ckpt / "model.safetensors").stat().st_size / 2**30
        rows = []
        for group, (a, b) in VARIANTS.items():
            times, anon, rss = Timings({a: [], b: []}), {a: [], b: []}, {a: [], b: []}
            for _ in range(args.reps):
                for v in (a, b):
                    r = run_child(v, ckpt)
                    times[v].append(r["cpu_s"])
                    anon[v].append(r["peak_gib"])
                    rss[v].append(r["peak_rss_gib"])
            pa, pb = (statistics.median(anon[v]) * 1024 for v in (a, b))
            ra, rb = (statistics.median(rss[v]) * 1024 for v in (a, b))
            rows.append(times.row("checkpoint-load", f"{group}, a {size * 1024:.1f} MiB checkpoint", a, b, a, b,
                                  note=f"peak heap +{pa:.1f} vs +{pb:.1f} MiB, peak RSS +{ra:.1f} vs +{rb:.1f} MiB",
                                  peak_gib={v: statistics.median(anon[v]) for v in (a, b)},
                                  peak_rss_gib={v: statistics.median(rss[v]) for v in (a, b)}, file_gib=size))
    emit(rows, args.json)


if __name__ == "__main__":
    main()
