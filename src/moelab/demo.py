"""`moelab demo`: corpus -> three tiny models on the same tokens -> per-domain eval -> traces -> report.

Every step is also a verb of its own (`data build`, `train`, `eval`, `trace`, `analyze`); the demo only
chains them with settings that fit 15 minutes on 2 CPU cores.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from moelab.config import MoelabError

MODELS = ("tiny-dense", "tiny-moe", "tiny-rmoe")
# Code, English prose, math, and the same UI strings in three more languages (language specialisation).
SOURCES = ("stdlib-code", "python-docs", "math:4000", "gettext:de", "gettext:fr", "gettext:ja")


@dataclass
class DemoSettings:
    out: Path
    steps: int = 300
    seq_len: int = 128
    batch_size: int = 16
    max_bytes_per_source: int = 1_000_000
    vocab_size: int = 4096
    trace_tokens: int = 0  # 0: the whole held-out split, so every domain and language is traced
    early_tokens: int = 0
    snapshots: int = 4  # intermediate checkpoints of tiny-moe for the early-routing analysis
    threads: int = 0
    overwrite: bool = False  # replace an earlier demo's runs, traces and report (and a mismatched corpus)


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def build_demo_corpus(s: DemoSettings) -> Path:
    from moelab.data.build import build_corpus
    from moelab.data.sources import open_source

    corpus = s.out / "corpus"
    if (corpus / "corpus.json").is_file():
        say(f"[1/5] corpus: reusing {corpus} ({describe_corpus(corpus)})")
        return corpus
    specs = []
    for spec in SOURCES:
        try:
            open_source(spec)  # validates availability without reading
            specs.append(spec)
        except MoelabError as e:
            say(f"      skipping source {spec}: {e}")
    say(f"[1/5] corpus: {', '.join(specs)} (up to {s.max_bytes_per_source / 1e6:.1f} MB each)")
    build_corpus(corpus, specs, vocab_size=s.vocab_size, max_bytes_per_source=s.max_bytes_per_source, seed=0)
    return corpus


def describe_corpus(corpus: Path) -> str:
    from moelab.data.shards import load_corpus

    c = load_corpus(corpus)
    tok = c.info["tokenizer"]
    return (f"{c.num_docs:,} documents, {c.num_tokens:,} tokens, {tok['kind']} tokenizer of {c.vocab_size} "
            f"tokens, fingerprint {tok.get('fingerprint')}")


OUTPUTS = ("runs", "traces", "report")


def prepare_out(s: DemoSettings) -> None:
    """Never mix two demos: an earlier demo's runs, traces and report are replaced only with --overwrite,
    and its corpus is reused only when it was built with these settings."""
    from moelab.outpath import check_writable_dir

    check_writable_dir(s.out)
    held = [name for name in OUTPUTS if (s.out / name).exists()]
    stale_corpus = _corpus_mismatch(s)
    if (held or stale_corpus) and not s.overwrite:
        what = f"{', '.join(f'{h}/' for h in held)} of an earlier demo" if held else stale_corpus
        raise MoelabError(f"{s.out} already holds {what}: pass --overwrite to replace "
                          f"{'them' if held else 'it'}, or choose another --out")
    for name in held + (["corpus"] if stale_corpus else []):
        say(f"      replacing {s.out / name} (--overwrite)")
        shutil.rmtree(s.out / name) if (s.out / name).is_dir() else (s.out / name).unlink()


def _corpus_mismatch(s: DemoSettings) -> str:
    """Why the corpus in the output folder does not fit these settings ("" when it fits or is absent)."""
    summary = s.out / "corpus" / "corpus.json"
    if not summary.is_file():
        return ""
    try:
        build = json.loads(summary.read_text()).get("build", {})
    except (json.JSONDecodeError, AttributeError, UnicodeDecodeError):
        return f"a corpus whose {summary} is unreadable"
    want = {"vocab_size": s.vocab_size, "max_bytes_per_source": s.max_bytes_per_source}
    diff = [f"{k}={build.get(k)} (wanted {v})" for k, v in want.items() if build.get(k) != v]
    return f"a corpus built with other settings ({', '.join(diff)})" if diff else ""


def train_models(s: DemoSettings, corpus: Path) -> dict[str, Path]:
    from moelab.train.commands import build_run_config
    from moelab.train.loop import train

    runs = {}
    for i, name in enumerate(MODELS):
        overrides = [f"train.steps={s.steps}", f"data.seq_len={s.seq_len}", f"data.batch_size={s.batch_size}",
                     f"model.vocab_size={s.vocab_size}", "train.log_every=10", f"train.threads={s.threads}",
                     f"train.warmup_steps={max(1, s.steps // 20)}", "train.eval_tokens=8192"]
        if name == "tiny-moe":
            overrides.append(f"train.save_every={max(1, s.steps // (s.snapshots + 1))}")
        run = build_run_config(name, str(corpus), overrides)
        say(f"[2/5] training {name} ({i + 1}/{len(MODELS)}): {run.model.num_active_params():,} active of "
            f"{run.model.num_params():,} parameters, {s.steps} steps x {s.batch_size * s.seq_len} tokens")
        result = train(run, s.out / "runs" / name, label=f"      {name}")
        runs[name] = s.out / "runs" / name
        (s.out / "runs" / name / "result.json").write_text(json.dumps(
            {"final_checkpoint": str(result.final_checkpoint), "eval": result.eval,
             "tokens_per_second": result.tokens_per_second}, indent=2))
    return runs


def trace_models(s: DemoSettings, corpus: Path, runs: dict[str, Path]) -> tuple[dict, list[Path]]:
    from moelab.data.objectives import iter_sequential
    from moelab.data.shards import load_corpus
    from moelab.train.checkpoint import checkpoint_step, load_model
    from moelab.train.rundir import list_checkpoints
    from moelab.trace.build import trace_batches, trace_meta

    c = load_corpus(corpus)
    heldout = c.info["splits"]["heldout"]["tokens"]
    traces: dict[str, Path] = {}
    early: list[Path] = []
    jobs = [(name, list_checkpoints(runs[name])[-1], s.trace_tokens or heldout)
            for name in MODELS if name != "tiny-dense"]
    jobs += [(f"tiny-moe@{p.name}", p, s.early_tokens or heldout) for p in list_checkpoints(runs["tiny-moe"])]
    (s.out / "traces").mkdir(parents=True, exist_ok=True)
    for label, ckpt, tokens in jobs:
        model = load_model(ckpt)
        cf = model.config.moe.capacity_factor_train  # the trained capacity: drops as in training
        out = s.out / "traces" / f"{label.replace('@', '-')}.parquet"
        meta = trace_meta(model, cf, checkpoint_step(ckpt), str(corpus / "tokenizer.json"), "moelab",
                          c.domains, c.langs)
        meta.extra["batch_seqs"] = s.batch_size  # the capacity batch, for the queue-only drop baseline
        batches = iter_sequential(c, seq_len=s.seq_len, batch_size=s.batch_size, split="heldout")
        stats = trace_batches(model, batches, out, meta, max_tokens=tokens, capacity_factor=cf)
        say(f"[3/5] traced {label}: {stats['tokens']:,} tokens -> {out}")
        if "@" in label:
            early.append(out)
        else:
            traces[label] = out
    return traces, early


def summary_table(runs: dict[str, Path]) -> str:
    evals = {n: json.loads((runs[n] / "result.json").read_text())["eval"] for n in MODELS}
    domains = [d for d in evals[MODELS[0]] if d != "all"] + ["all"]
    head = f"{'held-out loss':<14}" + "".join(f"{n:>12}" for n in MODELS) + f"{'moe/dense':>11}"
    lines = [head]
    for d in domains:
        vals = [evals[n].get(d, {}).get("loss", float("nan")) for n in MODELS]
        lines.append(f"{d:<14}" + "".join(f"{v:>12.3f}" for v in vals) + f"{vals[1] / vals[0]:>11.3f}")
    return "\n".join(lines)


def run_demo(s: DemoSettings) -> int:
    import torch

    from moelab.report.build import build_report
    from moelab.train.rundir import list_checkpoints

    t0 = time.perf_counter()
    if s.threads:
        torch.set_num_threads(s.threads)
    prepare_out(s)
    s.out.mkdir(parents=True, exist_ok=True)
    corpus = build_demo_corpus(s)
    runs = train_models(s, corpus)
    say("[3/5] tracing routing on held-out text")
    traces, early = trace_models(s, corpus, runs)
    say("[4/5] analysing and writing the report")
    finals = {n: list_checkpoints(runs[n])[-1] for n in traces}
    build_report(list(traces.values()), s.out / "report", weights=list(finals.values()),
                 names=list(traces), early={"tiny-moe": early}, title="moelab demo: tiny-moe vs tiny-rmoe")
    say(f"[5/5] done in {(time.perf_counter() - t0) / 60:.1f} min")
    print(summary_table(runs))
    print(f"\ncorpus:  {corpus}\nruns:    {s.out / 'runs'}\ntraces:  {s.out / 'traces'}\n"
          f"report:  {s.out / 'report' / 'report.html'}\nmetrics: {s.out / 'report' / 'metrics.json'}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("demo", help="corpus -> dense, MoE and RMoE tiny models -> routing report (~5 min on 2 cores)")
    p.add_argument("--out", default="moelab-demo", help="output folder (default ./moelab-demo)")
    p.add_argument("--steps", type=int, default=None, help="training steps per model (default 300)")
    p.add_argument("--max-bytes-per-source", type=int, default=None,
                   help="bytes read from each corpus source (default 1000000)")
    p.add_argument("--trace-tokens", type=int, default=None, help="tokens to trace (default: all held-out)")
    p.add_argument("--quick", action="store_true",
                   help="a one-minute smoke run with tiny settings of its own (so it refuses --steps, "
                        "--max-bytes-per-source and --trace-tokens)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier demo's runs, traces and report in --out (its corpus is reused "
                        "when built with the same settings, else rebuilt)")
    p.set_defaults(func=_run)


QUICK_OWNS = ("steps", "max_bytes_per_source", "trace_tokens")  # flags --quick sets itself


def _run(args) -> int:
    if args.steps is not None and args.steps < 1:
        raise MoelabError(f"--steps {args.steps} must be >= 1")
    if args.max_bytes_per_source is not None and args.max_bytes_per_source < 1:
        raise MoelabError(f"--max-bytes-per-source {args.max_bytes_per_source} must be >= 1")
    if args.trace_tokens is not None and args.trace_tokens < 0:
        raise MoelabError(f"--trace-tokens {args.trace_tokens} must be >= 0 (0: all held-out tokens)")
    given = [f"--{k.replace('_', '-')}" for k in QUICK_OWNS if getattr(args, k) is not None]
    if args.quick:
        if given:
            raise MoelabError(f"--quick sets its own tiny settings and would ignore {', '.join(given)}: "
                              "drop --quick or drop " + ("it" if len(given) == 1 else "them"))
        s = DemoSettings(out=Path(args.out), steps=20, seq_len=64, batch_size=8, max_bytes_per_source=120_000,
                         vocab_size=1024, snapshots=2, overwrite=args.overwrite)
    else:
        s = DemoSettings(out=Path(args.out), overwrite=args.overwrite,
                         **{k: getattr(args, k) for k in QUICK_OWNS if getattr(args, k) is not None})
    return run_demo(s)
