"""Quality benchmark: same corpus, same token budget, same seed; held-out loss per domain vs dense.

    python benchmarks/quality.py [--steps 400] [--out /tmp/moelab-quality] [--write-results]

Trains tiny-dense, tiny-moe (linear router), tiny-rmoe, and tiny-moe with the cosine, mlp, random and
hash routers, then prints held-out loss per domain and overall with the ratio to dense (lower is better).
With --write-results the table, the budget and the command go into docs/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from moelab.demo import SOURCES
from moelab.train.commands import build_run_config
from moelab.train.loop import train

VARIANTS = [
    ("tiny-dense", "tiny-dense", []),
    ("tiny-moe (linear)", "tiny-moe", []),
    ("tiny-rmoe (GRU)", "tiny-rmoe", []),
    ("cosine (X-MoE)", "tiny-moe", ["model.moe.router.kind=cosine", "model.moe.router.hidden=16"]),
    ("mlp", "tiny-moe", ["model.moe.router.kind=mlp", "model.moe.router.hidden=64"]),
    ("random (frozen)", "tiny-moe", ["model.moe.router.kind=random"]),
    ("hash (token id)", "tiny-moe", ["model.moe.router.kind=hash"]),
]


def build(out: Path, max_bytes: int) -> Path:
    from moelab.data.build import build_corpus

    corpus = out / "corpus"
    if not (corpus / "corpus.json").is_file():
        build_corpus(corpus, list(SOURCES), vocab_size=4096, max_bytes_per_source=max_bytes, seed=0)
    return corpus


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-bytes-per-source", type=int, default=1_000_000)
    ap.add_argument("--out", default="/tmp/moelab-quality")
    ap.add_argument("--write-results", action="store_true")
    ap.add_argument("--only", default="", help="comma-separated labels to (re)train; the others are read "
                                               "from OUT/quality.json of an earlier run with the same budget")
    args = ap.parse_args()
    out = Path(args.out)
    corpus = build(out, args.max_bytes_per_source)
    only = [o.strip() for o in args.only.split(",") if o.strip()]
    earlier = json.loads((out / "quality.json").read_text()) if only and (out / "quality.json").is_file() else {}
    results = {}
    for label, preset, extra in VARIANTS:
        if only and not any(label.startswith(o) for o in only) and label in earlier:
            results[label] = earlier[label]
            continue
        overrides = [f"train.steps={args.steps}", f"data.seq_len={args.seq_len}",
                     f"data.batch_size={args.batch_size}", "train.eval_tokens=32768", "train.tensorboard=false",
                     f"train.warmup_steps={max(1, args.steps // 20)}", *extra]
        run = build_run_config(preset, str(corpus), overrides)
        t0 = time.perf_counter()
        # a re-run (e.g. --only) replaces that variant's earlier run folder on purpose
        res = train(run, out / "runs" / label.split()[0], show_progress=False, overwrite=True)
        results[label] = {"eval": res.eval, "seconds": time.perf_counter() - t0,
                          "active": run.model.num_active_params(), "total": run.model.num_params()}
        print(f"{label:<20} loss {res.eval['all']['loss']:.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    table = format_table(results)
    print(table)
    tokens = args.steps * args.seq_len * args.batch_size
    (out / "quality.json").write_text(json.dumps(results, indent=2))
    if args.write_results:
        write_results(table, tokens, args)
    return 0


def format_table(results: dict) -> str:
    dense = results["tiny-dense"]["eval"]
    domains = [d for d in dense if d != "all"] + ["all"]
    head = "| model | active / total params | " + " | ".join(domains) + " | all / dense |"
    lines = [head, "|" + "---|" * (len(domains) + 3)]
    for label, r in results.items():
        ev = r["eval"]
        cells = [f"{ev[d]['loss']:.3f}" if d in ev else "-" for d in domains]
        ratio = ev["all"]["loss"] / dense["all"]["loss"]
        lines.append(f"| {label} | {r['active'] / 1e6:.2f}M / {r['total'] / 1e6:.2f}M | "
                     + " | ".join(cells) + f" | {ratio:.3f} |")
    return "\n".join(lines)


def write_results(table: str, tokens: int, args) -> None:
    path = Path(__file__).resolve().parents[1] / "docs" / "RESULTS.md"
    cmd = " ".join(["python benchmarks/quality.py"] + sys.argv[1:])
    text = f"""# Quality: MoE routers against a dense model with equal active parameters

Held-out cross-entropy (nats per token, lower is better) per domain after the same token budget, same
corpus, same seed. `tiny-dense` has the active parameters of `tiny-moe` (within 0.5%).

- Budget: {args.steps} steps x {args.batch_size} x {args.seq_len} tokens = {tokens:,} training tokens per model.
- Corpus: `{', '.join(SOURCES)}`, at most {args.max_bytes_per_source:,} bytes per source, 4096-token BPE.
- Machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}.
- Command: `{cmd}`

{table}
"""
    path.write_text(text)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
