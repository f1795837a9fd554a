"""A corpus of tens of millions of tokens from the Python installed on the machine, with no network.

The claims table's GPU scale trains on far more text than the main corpus (1.47M training tokens). This
builds one from what any machine running moelab already holds: the standard library's and a fixed list
of distributions' .py files, the docstrings inside them, pydoc's topics, and generated math.

- **What is read.** The distributions are named, not discovered (`PACKAGES`: torch, transformers, numpy,
  scipy, pyarrow, matplotlib and the packages they install), and each one's files come from its own
  RECORD (`importlib.metadata`), so an unrelated package installed beside them changes nothing. Tests,
  dist-info, stubs (.pyi), files over `MAX_FILE_BYTES` (generated tables) and transformers' `modular_*.py`
  (the sources its `modeling_*.py` are generated from, near-copies) are left out.
- **Duplicates.** A file whose bytes equal an earlier file's (vendored copies, the same `__init__.py` in
  many packages) is read once: the first in recipe order (stdlib, then `PACKAGES`, then path) keeps it.
- **Domains.** Each .py file gives two documents: its code with the docstrings cut out (domain code) and
  its docstrings (domain prose, lang en), so no text is in two domains; plus pydoc's topics (prose) and
  `math:COUNT` problems (math).
- **Held-out split by file.** A file's two documents carry the file's content hash as their group, and the
  split is drawn per group (`build.assign_heldout` on the group's hash): the code and docstrings of one file
  are never on two sides. Equal files are one file, so none is on both.
- **Fingerprint.** A hash of the builder's format, the recipe, every kept file's (origin, relative path,
  sha256) and pydoc's topics: the inputs that differ between machines. Two machines with the same
  fingerprint read the same text; they build the same tokens only with the same moelab (the math
  generator, the split) and the same `tokenizers` (the BPE merges), which the fingerprint does not hash. Installed
  versions differ between machines (this CPU machine: Python 3.11, torch 2.13; the GPU machines: Python
  3.12, torch 2.11), so `sources.json` records each origin's version and `compare_manifests` says which
  differ; a build never pretends to be another machine's corpus.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import importlib.metadata as md
import inspect
import json
import multiprocessing
import os
import shutil
import sys
import sysconfig
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from moelab.config import MoelabError

# torch, transformers, numpy, scipy, pyarrow, matplotlib (what the GPU machines are promised to hold) and
# the packages pip installs with them, so that every name here is present wherever those are.
PACKAGES = ("torch", "transformers", "numpy", "scipy", "pyarrow", "matplotlib", "sympy", "mpmath", "networkx",
            "jinja2", "fsspec", "filelock", "huggingface_hub", "fonttools", "pillow", "pyparsing",
            "python-dateutil", "packaging")
SKIP_PARTS = {"tests", "test", "testing", "idle_test", "__pycache__", "site-packages"}
MAX_FILE_BYTES = 400_000  # above this a .py file is a generated table or a benchmark blob, not code
MIN_DOCSTRINGS_CHARS = 40  # a file whose docstrings are shorter gives no prose document
MANIFEST = "sources.json"
FORMAT = 2  # the builder's output layout; part of the fingerprint (2: documents in content-hash order)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """What the corpus is made of; everything a second machine needs to build the same one."""

    packages: tuple[str, ...] = PACKAGES
    stdlib: bool = True
    math_count: int = 200_000
    vocab_size: int = 4096
    heldout_fraction: float = 0.002
    tokenizer_sample_bytes: int = 32_000_000  # the BPE merges are learnt from a content-hash sample
    max_bytes: int | None = None  # a cap on the .py bytes read (a content-hash sample), for tests
    seed: int = 0

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "packages": list(self.packages)}


@dataclasses.dataclass(frozen=True)
class SourceFile:
    origin: str  # "stdlib" or a distribution's name
    version: str
    path: str  # relative to the stdlib or to site-packages
    sha256: str
    num_bytes: int
    location: str  # where it is on this machine (not part of the fingerprint)


# ---- selection -------------------------------------------------------------------------------------------
def installed_files(recipe: Recipe, *, stdlib_root: Path | None = None,
                    site_paths: Sequence[str] | None = None) -> list[SourceFile]:
    """Every candidate .py file of the recipe, in recipe order (stdlib, then packages, then path)."""
    out: list[SourceFile] = []
    if recipe.stdlib:
        root = Path(stdlib_root or sysconfig.get_paths()["stdlib"])
        version = installed_versions(Recipe(packages=()))["stdlib"]
        out += [_source_file("stdlib", version, str(p.relative_to(root)), p) for p in _stdlib_py(root)]
    for name in recipe.packages:
        dist = _distribution(name, site_paths)
        files = sorted((str(f), f) for f in dist.files or [] if _wanted(f.parts))
        for rel, f in files:
            path = Path(dist.locate_file(f))
            if path.is_file():
                out.append(_source_file(name, dist.version, rel, path))
    return out


def _distribution(name: str, site_paths: Sequence[str] | None) -> md.Distribution:
    kw = {"path": list(site_paths)} if site_paths is not None else {}
    dist = next(iter(md.distributions(name=name, **kw)), None)
    if dist is None:
        raise MoelabError(f"python-large corpus: the package {name!r} is not installed (the corpus reads "
                          f"{', '.join(PACKAGES)}; install it or build the main corpus)")
    return dist


def installed_versions(recipe: Recipe, site_paths: Sequence[str] | None = None) -> dict[str, str]:
    """Each origin's version (cheap: no file is read); a missing package is one clear error."""
    out = {"stdlib": f"python {sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"}
    out.update({name: _distribution(name, site_paths).version for name in recipe.packages})
    return out


def _stdlib_py(root: Path) -> list[Path]:
    files = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if d not in SKIP_PARTS)
        files += [Path(folder) / n for n in names if n.endswith(".py")]
    if not files:
        raise MoelabError(f"python-large corpus: no .py files in the standard library at {root}")
    return sorted(files)


def _wanted(parts: tuple[str, ...]) -> bool:
    name = parts[-1]
    return (name.endswith(".py") and not parts[0].endswith((".dist-info", ".egg-info", ".data"))
            and not SKIP_PARTS & set(parts) and not (parts[0] == "transformers" and name.startswith("modular_")))


def _source_file(origin: str, version: str, rel: str, path: Path) -> SourceFile:
    data = path.read_bytes()
    return SourceFile(origin, version, rel, hashlib.sha256(data).hexdigest(), len(data), str(path))


def select(files: Iterable[SourceFile], recipe: Recipe) -> tuple[list[SourceFile], dict]:
    """Drop duplicates (by content, first kept), oversized files and, with `recipe.max_bytes`, all but a
    content-hash sample; returns the kept files in recipe order and what was dropped."""
    seen: set[str] = set()
    kept, dropped = [], {"duplicates": 0, "duplicate_bytes": 0, "oversized": 0, "sampled_out": 0}
    for f in files:
        if f.sha256 in seen:
            dropped["duplicates"] += 1
            dropped["duplicate_bytes"] += f.num_bytes
        elif f.num_bytes > MAX_FILE_BYTES:
            dropped["oversized"] += 1
        else:
            seen.add(f.sha256)
            kept.append(f)
    if recipe.max_bytes is not None:
        chosen, budget = set(), recipe.max_bytes
        for f in sorted(kept, key=lambda f: f.sha256):  # a sample fixed by content, spread over packages
            if f.num_bytes <= budget:
                chosen.add(f.sha256)
                budget -= f.num_bytes
        dropped["sampled_out"] = len(kept) - len(chosen)
        kept = [f for f in kept if f.sha256 in chosen]
    return kept, dropped


# ---- documents -------------------------------------------------------------------------------------------
def split_docstrings(source: str) -> tuple[str, list[str]]:
    """(the source without its module, class and function docstrings, those docstrings cleaned).

    A docstring is cut only where it owns its lines (nothing but the string on them); a source that does
    not parse under this Python is kept whole as code, with no docstrings.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # invalid escapes in old code: not ours to report
            tree = ast.parse(source)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return source, []
    lines = source.splitlines(keepends=True)
    cut, docs = set(), []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) or not node.body:
            continue
        first = node.body[0]
        if not (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
                and isinstance(first.value.value, str)) or first.end_lineno is None:
            continue
        start, end = first.lineno - 1, first.end_lineno
        if lines[start][: first.col_offset].strip() or lines[end - 1][first.end_col_offset:].strip():
            continue  # shares a line with code: leave it in the code
        text = inspect.cleandoc(first.value.value).strip()
        if text:
            docs.append((first.lineno, text))
        cut.update(range(start, end))
    code = "".join(line for i, line in enumerate(lines) if i not in cut)
    return code, [t for _, t in sorted(docs)]


def file_documents(f: SourceFile) -> list[dict]:
    """The code and docstring records of one file, grouped by the file's content hash."""
    text = Path(f.location).read_bytes().decode("utf-8", errors="replace")
    code, docs = split_docstrings(text)
    name = f"{f.origin}/{f.path}"
    out = [{"text": code, "domain": "code", "lang": "py", "name": name, "group": f.sha256}] if code.strip() else []
    prose = "\n\n".join(docs)
    if len(prose) >= MIN_DOCSTRINGS_CHARS:
        out.append({"text": prose + "\n", "domain": "prose", "lang": "en", "name": name + "#docstrings",
                    "group": f.sha256})
    return out


def _all_documents(files: list[SourceFile], workers: int) -> Iterator[dict]:
    if workers <= 1 or len(files) < 64:
        for f in files:
            yield from file_documents(f)
        return
    # ast.parse runs at a few MB/s: spread over the cores. Spawned, not forked: the parent may hold CUDA
    # and torch's threads, which a forked child inherits in an unknown state.
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        for docs in pool.map(file_documents, files, chunksize=32):
            yield from docs


def extra_documents(recipe: Recipe) -> Iterator[dict]:
    """pydoc's topics (prose) and the math problems: each its own group."""
    from pydoc_data.topics import topics

    from moelab.data.mathgen import generate_problems

    for key in sorted(topics):
        yield {"text": topics[key], "domain": "prose", "lang": "en", "name": f"pydoc/{key}", "group": ""}
    for i, p in enumerate(generate_problems(recipe.math_count, recipe.seed) if recipe.math_count else []):
        yield {"text": p.text, "domain": "math", "lang": "en", "name": f"math/{p.kind}#{i}", "group": ""}


# ---- fingerprint and manifest ----------------------------------------------------------------------------
def fingerprint(recipe: Recipe, files: Sequence[SourceFile]) -> str:
    from pydoc_data.topics import topics

    h = hashlib.sha256(json.dumps({"format": FORMAT, **recipe.to_dict()}, sort_keys=True).encode())
    h.update(json.dumps(topics, sort_keys=True).encode())
    for f in files:
        h.update(f"{f.origin}\0{f.path}\0{f.sha256}\n".encode())
    return h.hexdigest()[:20]


def manifest(recipe: Recipe, files: Sequence[SourceFile], dropped: dict) -> dict:
    versions = {f.origin: f.version for f in files}
    return {"format": FORMAT, "fingerprint": fingerprint(recipe, files), "recipe": recipe.to_dict(),
            "versions": versions, "num_files": len(files), "num_bytes": sum(f.num_bytes for f in files),
            "dropped": dropped, "files": [[f.origin, f.path, f.sha256, f.num_bytes] for f in files]}


def compare_manifests(mine: dict, theirs: dict) -> list[str]:
    """What differs between two builds' manifests, one line each; [] when they are the same corpus."""
    if mine.get("fingerprint") == theirs.get("fingerprint"):
        return []
    out = []
    if mine.get("recipe") != theirs.get("recipe"):
        out.append("the recipes differ (packages, math count, vocabulary, split or caps)")
    a, b = mine.get("versions", {}), theirs.get("versions", {})
    out += [f"{k}: {a.get(k, 'absent')} here, {b.get(k, 'absent')} there" for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k)]
    fa = {(o, p, s) for o, p, s, _ in mine.get("files", [])}
    fb = {(o, p, s) for o, p, s, _ in theirs.get("files", [])}
    if fa != fb:
        out.append(f"{len(fa - fb)} files only here, {len(fb - fa)} only there, {len(fa & fb)} shared")
    return out or ["pydoc's topics differ (another Python version)"]


# ---- the build -------------------------------------------------------------------------------------------
def plan(recipe: Recipe, *, stdlib_root: Path | None = None,
         site_paths: Sequence[str] | None = None) -> tuple[list[SourceFile], dict]:
    """The kept files and the manifest, without building (cheap: reads and hashes the files)."""
    kept, dropped = select(installed_files(recipe, stdlib_root=stdlib_root, site_paths=site_paths), recipe)
    return kept, manifest(recipe, kept, dropped)


def build_large_corpus(out_dir: str | Path, recipe: Recipe = Recipe(), *, stdlib_root: Path | None = None,
                       site_paths: Sequence[str] | None = None, workers: int | None = None):
    """Build the corpus into `out_dir` (a moelab corpus folder plus `sources.json`); returns the Corpus."""
    from moelab.data.build import build_corpus
    from moelab.data.shards import load_corpus
    from moelab.data.tokenizer import train_tokenizer

    out = Path(out_dir)
    kept, man = plan(recipe, stdlib_root=stdlib_root, site_paths=site_paths)
    work = out.with_name(f".{out.name}.docs-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        docs = work / "docs.jsonl"
        records = [*_all_documents(kept, workers or os.cpu_count() or 1), *extra_documents(recipe)]
        # In content-hash order (a file's documents together): any prefix of a split, such as a trace's or an
        # evaluation's first N tokens, is a sample spread over packages and domains, not the stdlib's code.
        records.sort(key=lambda r: r["group"] or hashlib.blake2b(r["text"].encode(), digest_size=16).hexdigest())
        with open(docs, "w", encoding="utf-8") as fh:
            for rec in records:
                fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
        del records
        tok = train_tokenizer(_sample(docs, recipe.tokenizer_sample_bytes), recipe.vocab_size,
                              out_path=work / "tokenizer.json")
        tok.source = (f"trained by corpus_large (bpe, vocab_size={recipe.vocab_size}, on a "
                      f"{recipe.tokenizer_sample_bytes:,}-byte content-hash sample)")
        build_corpus(out, [f"jsonl:{docs}"], tok, vocab_size=recipe.vocab_size,
                     heldout_fraction=recipe.heldout_fraction, seed=recipe.seed)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    corpus = load_corpus(out)
    man["tokens"] = {s: corpus.info["splits"][s]["tokens"] for s in ("train", "heldout")}
    man["per_domain_tokens"] = {d: v["tokens"] for d, v in corpus.info["per_domain"].items()}
    (out / MANIFEST).write_text(json.dumps(man, indent=0) + "\n")
    return corpus


def _sample(docs: Path, budget: int) -> list[str]:
    """The texts whose (text hash) comes first, up to `budget` bytes: the same sample on any machine that
    has the same documents, spread evenly over packages and domains."""
    keyed = []
    with open(docs, encoding="utf-8") as fh:
        for line in fh:
            text = json.loads(line)["text"]
            keyed.append((hashlib.blake2b(text.encode(), digest_size=8).digest(), text))
    keyed.sort(key=lambda kv: kv[0])
    out = []
    for _, text in keyed:
        n = len(text.encode("utf-8"))
        if n > budget:
            continue
        out.append(text)
        budget -= n
    return out


def read_manifest(corpus: str | Path) -> dict | None:
    path = Path(corpus) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None
