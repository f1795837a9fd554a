"""CLI verbs of the data concern: `data build`, `data info` and `tokenizer train`.

`register(subparsers)` adds them to the `moelab` parser; each handler takes the parsed args and
returns an exit code. Progress goes to stderr, results (where outputs went) to stdout.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from moelab.config import positive_int
from moelab.data.sources import SOURCE_SPECS

_SOURCE_HELP = "a corpus source, repeatable: " + ", ".join(SOURCE_SPECS)


def register(subparsers) -> None:
    data = subparsers.add_parser("data", help="build and inspect token corpora")
    verbs = data.add_subparsers(dest="data_verb", metavar="VERB", required=True)

    build = verbs.add_parser("build", help="read sources, train a tokenizer, write a token corpus")
    build.add_argument("--out", required=True, help="the corpus folder to create")
    build.add_argument("--source", action="append", required=True, metavar="SPEC", help=_SOURCE_HELP)
    build.add_argument("--vocab-size", type=vocab_size_arg, default=4096, help="of the tokenizer trained (default 4096)")
    build.add_argument("--tokenizer-kind", choices=("bpe", "unigram"), default="bpe")
    build.add_argument("--tokenizer", metavar="PATH", help="use this tokenizer (tokenizer.json, folder or "
                       "Hugging Face name) instead of training one")
    build.add_argument("--max-bytes-per-source", type=positive_int, metavar="N")
    build.add_argument("--max-docs-per-source", type=positive_int, metavar="N")
    build.add_argument("--heldout-fraction", type=float, default=0.05)
    build.add_argument("--seed", type=int, default=0)
    build.set_defaults(func=run_build)

    info = verbs.add_parser("info", help="print a corpus's summary")
    info.add_argument("corpus", help="a corpus folder")
    info.set_defaults(func=run_info)

    tokenizer = subparsers.add_parser("tokenizer", help="train tokenizers")
    tverbs = tokenizer.add_subparsers(dest="tokenizer_verb", metavar="VERB", required=True)
    train = tverbs.add_parser("train", help="train a byte-level BPE or unigram tokenizer on sources")
    train.add_argument("--data-source", action="append", required=True, metavar="SPEC", help=_SOURCE_HELP)
    train.add_argument("--vocab-size", type=vocab_size_arg, required=True)
    train.add_argument("--kind", choices=("bpe", "unigram"), default="bpe")
    train.add_argument("--out", required=True, help="the tokenizer.json to write")
    train.add_argument("--max-bytes-per-source", type=positive_int, metavar="N")
    train.add_argument("--seed", type=int, default=0, help="seed of generated sources (math)")
    train.set_defaults(func=run_tokenizer_train)


def vocab_size_arg(text: str) -> int:
    """argparse type for --vocab-size: 1..MAX_VOCAB_SIZE, so a huge value is refused before any source is read."""
    from moelab.data.tokenizer import vocab_bound_problem

    value = positive_int(text)
    too_large = vocab_bound_problem(value)
    if too_large:
        raise argparse.ArgumentTypeError(too_large)
    return value


class ProgressLine:
    """One self-overwriting stderr line per stage: documents, megabytes, documents per second."""

    def __init__(self, stream=None, every_s: float = 0.5):
        self.stream = stream or sys.stderr
        self.every_s = every_s
        self.stage, self.docs, self.nbytes = "", 0, 0
        self.started = self.shown = 0.0

    def __call__(self, stage: str, docs: int, nbytes: int) -> None:
        now = time.monotonic()
        if stage != self.stage:
            self.done()
            # The first line waits every_s: a rate over no time means nothing.
            self.stage, self.started, self.shown = stage, now, now
        self.docs, self.nbytes = docs, nbytes
        if now - self.shown >= self.every_s:
            self._show(now)

    def _show(self, now: float) -> None:
        rate = self.docs / max(now - self.started, 1e-6)
        self.stream.write(f"\r{self.stage}: {self.docs} docs, {self.nbytes / 1e6:.1f} MB, {rate:.0f} docs/s ")
        self.stream.flush()
        self.shown = now

    def done(self) -> None:
        """Show the stage's final counts and end its line."""
        if self.stage:
            self._show(time.monotonic())
            self.stream.write("\n")
            self.stage = ""


def run_build(args: argparse.Namespace) -> int:
    from moelab.data.build import build_corpus
    from moelab.outpath import check_writable_dir

    check_writable_dir(args.out)

    progress = ProgressLine()
    corpus = build_corpus(args.out, args.source, args.tokenizer, vocab_size=args.vocab_size,
                          tokenizer_kind=args.tokenizer_kind, seed=args.seed,
                          heldout_fraction=args.heldout_fraction, max_bytes_per_source=args.max_bytes_per_source,
                          max_docs_per_source=args.max_docs_per_source, progress=progress)
    progress.done()
    print(f"wrote corpus {corpus.path}: {corpus.num_docs} documents, {corpus.num_tokens} tokens "
          f"({', '.join(corpus.domains)}; {', '.join(corpus.langs)})")
    return 0


def run_info(args: argparse.Namespace) -> int:
    from moelab.data.shards import load_corpus

    corpus = load_corpus(args.corpus)
    info = corpus.info
    print(f"{corpus.path}: {info['num_documents']} documents, {info['num_bytes']} bytes, "
          f"{info['num_tokens']} tokens ({info['dtype']}), tokenizer {info['tokenizer']['kind']} "
          f"with {info['tokenizer']['vocab_size']} tokens")
    for title, table in (("split", info["splits"]), ("domain", info["per_domain"]), ("lang", info["per_lang"])):
        print(f"  {title:<8} {'documents':>10} {'bytes':>12} {'tokens':>12}")
        for name, row in table.items():
            print(f"  {name:<8} {row['documents']:>10} {row['bytes']:>12} {row['tokens']:>12}")
    return 0


def run_tokenizer_train(args: argparse.Namespace) -> int:
    from moelab.data.sources import capped, open_source
    from moelab.data.tokenizer import train_tokenizer
    from moelab.outpath import check_out_file

    check_out_file(args.out)
    sources = [open_source(spec, seed=args.seed) for spec in args.data_source]  # fail fast on bad specs
    progress = ProgressLine()

    def texts():
        docs = nbytes = 0
        for source in sources:
            for doc in capped(source, max_bytes=args.max_bytes_per_source):
                docs, nbytes = docs + 1, nbytes + doc.num_bytes
                progress("read", docs, nbytes)
                yield doc.text

    tok = train_tokenizer(texts(), args.vocab_size, args.kind, out_path=Path(args.out))
    progress.done()
    print(f"wrote {args.kind} tokenizer with {tok.vocab_size} tokens to {args.out}")
    return 0
