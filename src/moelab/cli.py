"""`moelab <verb>`: parse arguments, build configs, call the library; nothing else.

Each concern registers its verbs from its own `commands.py`. A `MoelabError` (bad input) prints one line
and exits 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from moelab import __version__
from moelab.config import MoelabError
from moelab.model.cpu_experts import cpu_experts_mode

# Modules whose `register(subparsers)` adds verbs, in the order `moelab --help` lists them.
COMMAND_MODULES = [
    "moelab.model.commands",
    "moelab.data.commands",
    "moelab.train.commands",
    "moelab.train.upcycle",
    "moelab.trace.commands",
    "moelab.hf.commands",
    "moelab.report.commands",
    "moelab.explore.commands",
    "moelab.intervene.commands",
    "moelab.demo",
]


class UsageError(Exception):
    """A malformed command line, reported by argparse."""


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the verb's usage stays in `--help`)."""

    def error(self, message: str):
        raise UsageError(f"{self.prog}: error: {message}")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="moelab", description="Build, train and dissect Mixture-of-Experts language models.")
    parser.add_argument("--version", action="version", version=f"moelab {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as e:
        print(f"{e} (see --help)", file=sys.stderr)
        return 2
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        cpu_experts_mode()  # a bad MOELAB_CPU_EXPERTS, refused before any verb writes (else: at the first MoE forward)
        return int(args.func(args) or 0)
    except MoelabError as e:
        print(f"moelab {args.verb}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a file or folder the checks before could not foresee (full disk, permissions)
        print(f"moelab {args.verb}: error: {e.strerror or e}"
              + (f": {e.filename}" if e.filename else ""), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("moelab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
