"""A cache of what rows share: corpora, trained runs, traces and analyses, each made once per settings.

Every artefact lives in its own folder with a `claims-settings.json` stamp; a folder whose stamp differs
from the settings asked for (or that never finished: no stamp) is rebuilt, so a changed row never reads a
stale model. The settings hold contents, not names (`fingerprint.py`): the checkpoint's and corpus's
files, the preset's resolved table, and the source of the packages that make the artefact; a model
retrained at the same path changes its traces' key. `Scale` holds the sizes every row derives its runs from; `Scale.smoke()` makes each row run
in seconds for the tests.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from moelab.claims.fingerprint import code_closure, preset_contents, tree_hash
from moelab.config import MoelabError
from moelab.lockfile import locked

STAMP = "claims-settings.json"
# Code, English prose, math, and the same UI strings in three more languages (as the demo).
SOURCES = ("stdlib-code", "python-docs", "math:4000", "gettext:de", "gettext:fr", "gettext:ja")


@dataclasses.dataclass(frozen=True)
class Scale:
    steps: int = 400
    seq_len: int = 128
    batch_size: int = 16
    vocab_size: int = 4096
    max_bytes_per_source: int = 1_000_000
    eval_tokens: int = 16384
    trace_tokens: int = 0  # 0: the whole held-out split
    seeds: int = 3
    threads: int = 0
    # "main": SOURCES, each capped at max_bytes_per_source; "python-large": data/corpus_large.py (the gpu
    # profile, claims/scale.py), at most corpus_bytes of .py text (0: all) and corpus_math problems.
    corpus: str = "main"
    corpus_bytes: int = 0
    corpus_math: int = 200_000

    @classmethod
    def smoke(cls) -> "Scale":
        return cls(steps=6, seq_len=32, batch_size=4, vocab_size=512, max_bytes_per_source=40_000,
                   eval_tokens=512, trace_tokens=2048, seeds=2)

    def describe(self) -> str:
        return (f"{self.steps} steps x {self.batch_size} x {self.seq_len} tokens "
                f"({self.steps * self.batch_size * self.seq_len:,} training tokens) per model")


def _key(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Workspace:
    def __init__(self, root: str | Path, scale: Scale = Scale(), *, fresh: bool = False,
                 log: Callable[[str], None] = say, device: str | None = None):
        # device None: training takes train.device's default (auto: cuda when present), tracing the CPU;
        # a name (cpu, cuda, cuda:N) puts both there and enters the runs' and traces' keys.
        self.root, self.scale, self.fresh, self.log, self.device = Path(root), scale, fresh, log, device
        self._fresh_done: set[Path] = set()

    # ---- the cache mechanism --------------------------------------------------------------------------
    def _cached(self, folder: Path, settings: dict[str, Any], make: Callable[[Path], None]) -> Path:
        # Two runners sharing a cache (rows run side by side) wait for each other's artefact, not redo it.
        with locked(folder.parent / f".{folder.name}.lock"):
            return self._cached_unlocked(folder, settings, make)

    def _cached_unlocked(self, folder: Path, settings: dict[str, Any], make: Callable[[Path], None]) -> Path:
        stamp = folder / STAMP
        want = {"settings": settings, "key": _key(settings)}
        redo = self.fresh and folder not in self._fresh_done
        if not redo and stamp.is_file():
            try:
                if json.loads(stamp.read_text()) == json.loads(json.dumps(want, default=str)):
                    return folder
            except (json.JSONDecodeError, UnicodeDecodeError):
                pass
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        make(folder)
        stamp.write_text(json.dumps(want, indent=1, default=str))
        self._fresh_done.add(folder)
        return folder

    def cached(self, kind: str, name: str, settings: dict[str, Any], make: Callable[[Path], None]) -> Path:
        """An artefact of another module (e.g. a brought model's trace) under root/kind/name, by the same rule."""
        return self._cached(self.root / kind / name, settings, make)

    # ---- corpora ----------------------------------------------------------------------------------------
    @property
    def eval_device(self) -> str:
        """Where rows evaluate models (held-out losses): the device asked for, else the CPU."""
        return self.device or "cpu"

    def corpus(self, name: str = "main", sources: Sequence[str] = SOURCES, vocab_size: int | None = None,
               tokenizer: Path | None = None, tokenizer_content: str = "") -> Path:
        """The corpus, with a tokenizer trained on it, or tokenized by `tokenizer` (a file or a model folder,
        whose tokenizer files hash to `tokenizer_content`): a brought model's own."""
        from moelab.data.build import build_corpus

        s = self.scale
        vocab = vocab_size or s.vocab_size
        if s.corpus not in ("main", "python-large"):
            raise MoelabError(f"scale.corpus={s.corpus!r} is unknown (known: main, python-large)")
        if s.corpus == "python-large" and name == "main" and tuple(sources) == SOURCES:
            return self._large_corpus(vocab)  # the main corpus only: a row's own corpus keeps its sources
        # The sources are installed text (the stdlib, pydoc's topics, gettext catalogs): the Python version
        # stands for the stdlib's; the runs key on the built corpus's content, whatever it holds.
        settings = {"sources": list(sources), "vocab_size": vocab, "max_bytes": s.max_bytes_per_source,
                    "python": platform.python_version(), "code": code_closure("moelab.data.build")}
        if tokenizer is not None:  # only then: the trained-tokenizer corpora keep their key
            settings["tokenizer_content"] = tokenizer_content

        def make(folder: Path) -> None:
            self.log(f"[claims] corpus {name}: {', '.join(sources)}")
            build_corpus(folder / "corpus", list(sources), tokenizer=tokenizer, vocab_size=vocab,
                         max_bytes_per_source=s.max_bytes_per_source, seed=0)

        return self._cached(self.root / "corpora" / name, settings, make) / "corpus"

    def large_recipe(self, vocab_size: int | None = None):
        from moelab.data.corpus_large import Recipe

        s = self.scale
        return Recipe(vocab_size=vocab_size or s.vocab_size, math_count=s.corpus_math,
                      max_bytes=s.corpus_bytes or None, seed=0)

    def _large_corpus(self, vocab: int) -> Path:
        """The main corpus of the gpu profile: tens of millions of tokens of installed Python text."""
        from moelab.data.corpus_large import build_large_corpus, installed_versions

        recipe = self.large_recipe(vocab)
        # Versions, not the files' hashes, key the cache (hashing 150 MB on every row costs seconds); the
        # built corpus's sources.json holds the content fingerprint that results quote.
        settings = {"recipe": recipe.to_dict(), "versions": installed_versions(recipe),
                    "python": platform.python_version(), "code": code_closure("moelab.data.corpus_large")}

        def make(folder: Path) -> None:
            self.log(f"[claims] corpus python-large: the stdlib and {len(recipe.packages)} installed packages")
            build_large_corpus(folder / "corpus", recipe)

        return self._cached(self.root / "corpora" / "python-large", settings, make) / "corpus"

    # ---- training ---------------------------------------------------------------------------------------
    def run(self, name: str, preset: str, overrides: Sequence[str] = (), *, corpus: Path | None = None,
            seed: int = 0, snapshots: int = 0, init_from: Path | None = None, model: dict | None = None,
            steps: int | None = None) -> Path:
        """Train `preset` (+ overrides) once; `snapshots` intermediate checkpoints evenly spaced (the
        early-routing rows); `init_from` an upcycled checkpoint; `model` a full model table instead of
        the preset's. Returns the run folder."""
        from moelab.train.commands import build_run_config
        from moelab.train.loop import train

        s = self.scale
        corpus = corpus or self.corpus()
        steps = steps or s.steps
        sets = [f"train.steps={steps}", f"data.seq_len={s.seq_len}", f"data.batch_size={s.batch_size}",
                f"model.vocab_size={_corpus_vocab(corpus)}", f"train.seed={seed}", "train.log_every=1",
                f"train.warmup_steps={max(1, steps // 20)}", f"train.eval_tokens={s.eval_tokens}",
                "train.tensorboard=false", f"train.threads={s.threads}",
                f"train.save_every={max(1, steps // (snapshots + 1)) if snapshots else steps}",
                *([f"train.device={self.device}"] if self.device else []), *overrides]
        settings = {"preset": preset, "preset_contents": preset_contents(preset), "sets": sets,
                    "corpus": str(corpus), "corpus_content": tree_hash(corpus),
                    "init_from": str(init_from or ""), "init_content": tree_hash(init_from) if init_from else "",
                    "model": model, "code": code_closure("moelab.train.loop", "moelab.train.commands")}

        def make(folder: Path) -> None:
            run = build_run_config(preset, str(corpus), sets, model=model)
            self.log(f"[claims] training {name}: {run.model.num_active_params():,} active of "
                     f"{run.model.num_params():,} parameters, {steps} steps")
            train(run, folder, init_from=init_from, show_progress=False, overwrite=True)

        return self._cached(self.root / "runs" / name, settings, make)

    def upcycled(self, name: str, dense_run: Path, preset: str, sets: Sequence[str]) -> Path:
        """`dense_run`'s final checkpoint upcycled into `preset`'s MoE (+ `sets`), made once. The key holds
        the dense run's key, the preset's contents and the upcycling code: a name and a path are not
        contents, and an edited preset or upcycling rule must rebuild it."""
        from moelab.claims.models import final  # models imports this module: a call-time import
        from moelab.train.upcycle import upcycle_checkpoint

        dense = final(dense_run)
        settings = {"dense": str(dense), "dense_key": json.loads((dense_run / STAMP).read_text())["key"],
                    "preset": preset, "preset_contents": preset_contents(preset), "sets": list(sets),
                    "code": code_closure("moelab.train.upcycle")}

        def make(folder: Path) -> None:
            self.log(f"[claims] upcycling {dense} into {preset}'s MoE")
            upcycle_checkpoint(dense, preset, folder / "checkpoint", list(sets))

        return self._cached(self.root / "upcycled" / name, settings, make) / "checkpoint"

    # ---- tracing and analysis ---------------------------------------------------------------------------
    def trace(self, checkpoint: Path, name: str, *, corpus: Path | None = None, all_experts: bool = False,
              tokens: int | None = None, capacity: str = "trained", seq_len: int | None = None,
              batch_size: int | None = None, balanced: bool = True) -> Path:
        """A trace of the held-out split at the trained capacity ("trained") or dropless ("none"), in rows of
        `seq_len` tokens and capacity batches of `batch_size` rows (default: the scale's). A budget of
        `tokens` short of the split is shared among its domains (`balanced`), else its first tokens."""
        corpus = corpus or _run_corpus(checkpoint)
        tokens = tokens or self.scale.trace_tokens
        seq_len, batch_size = seq_len or self.scale.seq_len, batch_size or self.scale.batch_size
        settings = {"checkpoint": str(checkpoint), "checkpoint_content": tree_hash(checkpoint),
                    "corpus": str(corpus), "corpus_content": tree_hash(corpus), "all_experts": all_experts,
                    "code": code_closure("moelab.trace.build", "moelab.train.checkpoint", "moelab.data.objectives",
                                         "moelab.data.shards"),
                    "tokens": tokens, "balanced": balanced, "capacity": capacity, "seq_len": seq_len,
                    "batch_size": batch_size, **({"device": self.device} if self.device else {})}

        def make(folder: Path) -> None:
            _write_trace(checkpoint, corpus, folder / "trace.parquet", seq_len, batch_size, all_experts, tokens,
                         capacity, self.device or "cpu", balanced)

        return self._cached(self.root / "traces" / name, settings, make) / "trace.parquet"

    def analyze(self, name: str, traces: Sequence[Path], *, names: Sequence[str] | None = None,
                weights: Sequence[Path] | None = None, early: dict[str, Sequence[Path]] | None = None,
                options: dict[str, Any] | None = None) -> dict[str, Any]:
        """`moelab analyze` over the traces once; returns metrics.json as a dict."""
        from moelab.report.build import build_report

        settings = {"traces": [str(t) for t in traces], "names": list(names or []),
                    "trace_contents": [tree_hash(t) for t in traces],
                    "weights": [str(w) for w in weights or []], "weight_contents": [tree_hash(w) for w in weights or []],
                    "early_contents": {k: [tree_hash(p) for p in v] for k, v in (early or {}).items()},
                    "code": code_closure("moelab.report.build"),
                    "early": {k: [str(p) for p in v] for k, v in (early or {}).items()}, "options": options}

        def make(folder: Path) -> None:
            self.log(f"[claims] analysing {name}")
            build_report(list(traces), folder, weights=weights, names=names, early=early, options=options)

        folder = self._cached(self.root / "reports" / name, settings, make)
        return json.loads((folder / "metrics.json").read_text())


def _corpus_vocab(corpus: Path) -> int:
    return int(json.loads((corpus / "corpus.json").read_text())["tokenizer"]["vocab_size"])


def _run_corpus(checkpoint: Path) -> Path:
    from moelab.train.checkpoint import read_checkpoint_config

    return Path(read_checkpoint_config(checkpoint)["data"]["path"])


def _write_trace(checkpoint: Path, corpus: Path, out: Path, seq_len: int, batch_size: int, all_experts: bool,
                 tokens: int, capacity: str, device: str = "cpu", balanced: bool = True) -> None:
    from moelab.data.objectives import iter_sequential
    from moelab.data.shards import load_corpus
    from moelab.trace.build import trace_batches, trace_meta
    from moelab.train.checkpoint import checkpoint_step, load_model

    c = load_corpus(corpus)
    model = load_model(checkpoint, device)
    cf = model.config.moe.capacity_factor_train if capacity == "trained" else None
    meta = trace_meta(model, cf, checkpoint_step(checkpoint), str(corpus / "tokenizer.json"), "moelab",
                      c.domains, c.langs)
    meta.extra["batch_seqs"] = batch_size  # the capacity batch, for the queue-only drop baseline
    # a budget short of the split takes each domain's share (a prefix in corpus order may hold one domain)
    batches = iter_sequential(c, seq_len=seq_len, batch_size=batch_size, split="heldout",
                              balanced_tokens=(tokens or None) if balanced else None)
    trace_batches(model, batches, out, meta, max_tokens=tokens or c.info["splits"]["heldout"]["tokens"],
                  capacity_factor=cf, all_experts=all_experts)
