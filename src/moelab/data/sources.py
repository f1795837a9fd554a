"""Corpus sources: a source spec (what a user types after `--source`) -> an iterator of Documents.

Specs:
  stdlib-code               the Python standard library's .py files (domain code, lang py)
  python-docs               pydoc's reference topics (domain prose, lang en)
  math[:COUNT]              generated math problems with worked answers (domain math, lang en)
  manpages:LANG[,LANG]      installed man pages, rendered to text (domain prose)
  gettext:LANG[,LANG]       translated program messages from .mo catalogs (domain prose)
  turns:doctest             interpreter sessions of the stdlib's docstrings and pydoc topics as
                            conversations, input / reply turns (domain dialogue, lang py; data/turns.py)
  dir:PATH[:DOMAIN]         every text file under PATH (domain defaults to the folder name, lang und)
  jsonl:PATH                one JSON object a line: text or turns, optional domain and lang
  hf:NAME[:CONFIG]          a Hugging Face dataset's train split (needs `datasets` and the network)

`open_source` checks a spec eagerly (missing paths and uninstalled languages fail before any work)
and returns a lazy iterator, so a byte cap stops reading early.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import sysconfig
from pathlib import Path
from typing import Iterable, Iterator

from moelab.config import MoelabError
from moelab.data import installed, turns
from moelab.data.document import Document, conversation  # noqa: F401  (the names callers import from here)

SOURCE_SPECS = ("stdlib-code", "python-docs", "math[:COUNT]", "manpages:LANG[,LANG]",
                "gettext:LANG[,LANG]", "turns:doctest", "dir:PATH[:DOMAIN]", "jsonl:PATH", "hf:NAME[:CONFIG]")
DEFAULT_MATH_COUNT = 2000
_STDLIB_SKIP = {"test", "tests", "idle_test", "site-packages", "__pycache__"}


def open_source(spec: str, *, seed: int = 0) -> Iterator[Document]:
    """Check `spec` now and return an iterator over its documents (deterministic order)."""
    kind, _, arg = spec.partition(":")
    if kind == "stdlib-code" and not arg:
        return _stdlib_code()
    if kind == "python-docs" and not arg:
        return _python_docs()
    if kind == "math":
        return _math(arg, seed)
    if kind in ("manpages", "gettext") and arg:

        langs = [lang.strip() for lang in arg.split(",") if lang.strip()]
        opener = installed.man_pages if kind == "manpages" else installed.gettext_messages
        return opener(langs)
    if kind == "turns":
        return _turns(arg)
    if kind == "dir" and arg:
        return _directory(arg)
    if kind == "jsonl" and arg:
        return _jsonl(Path(arg))
    if kind == "hf" and arg:
        return _hugging_face(arg)
    raise MoelabError(f"unknown source spec {spec!r} (known: {', '.join(SOURCE_SPECS)})")


def capped(docs: Iterable[Document], *, max_bytes: int | None = None,
           max_docs: int | None = None) -> Iterator[Document]:
    """The first documents of `docs` within `max_docs` documents and `max_bytes` UTF-8 bytes.

    The document that crosses the byte budget is cut at its last newline inside the budget (a
    conversation, which cannot be cut, is left out), so the total never exceeds `max_bytes`.
    """
    budget = max_bytes
    for doc in itertools.islice(docs, max_docs):
        if budget is not None and doc.num_bytes > budget:
            cut = _cut(doc, budget)
            if cut is not None:
                yield cut
            return
        if budget is not None:
            budget -= doc.num_bytes
        yield doc


def _cut(doc: Document, budget: int) -> Document | None:
    if doc.turns is not None:
        return None
    head = doc.text.encode("utf-8")[:budget].decode("utf-8", errors="ignore")
    head = head[: head.rfind("\n") + 1] if "\n" in head else ""
    return dataclasses.replace(doc, text=head) if head.strip() else None


# ---- built-in sources ------------------------------------------------------------------------
def _stdlib_paths() -> list[tuple[str, Path]]:
    """(path relative to the stdlib, path) of every stdlib .py file outside tests, in path order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for folder, subfolders, names in os.walk(root):
        # Pruned while walking: site-packages alone can hold more files than the whole stdlib.
        subfolders[:] = [d for d in subfolders if d not in _STDLIB_SKIP]
        files.extend(Path(folder) / n for n in names if n.endswith(".py"))
    files.sort()
    if not files:
        raise MoelabError(f"no .py files found in the standard library at {root}")
    return [(str(p.relative_to(root)), p) for p in files]


def _stdlib_code() -> Iterator[Document]:
    return (Document(text=p.read_text(encoding="utf-8", errors="replace"), domain="code", lang="py",
                     name=name) for name, p in _stdlib_paths())


def _turns(arg: str) -> Iterator[Document]:
    from pydoc_data.topics import topics

    if arg != "doctest":
        raise MoelabError(f"unknown multi-turn source turns:{arg} (known: turns:doctest)")
    return turns.doctest_sessions(_stdlib_paths(), topics)


def _python_docs() -> Iterator[Document]:
    from pydoc_data.topics import topics

    return (Document(text=topics[key], domain="prose", lang="en", name=key) for key in sorted(topics))


def _math(arg: str, seed: int) -> Iterator[Document]:
    from moelab.data.mathgen import generate_problems

    if arg and not (arg.isdigit() and int(arg) > 0):
        raise MoelabError(f"math:{arg}: COUNT must be a positive integer")
    count = int(arg) if arg else DEFAULT_MATH_COUNT
    problems = generate_problems(count, seed)
    return (Document(text=p.text, domain="math", lang="en", name=f"{p.kind}#{i}")
            for i, p in enumerate(problems))


def _directory(arg: str) -> Iterator[Document]:
    # dir:PATH:DOMAIN when a domain is given; a PATH containing ':' therefore needs an explicit DOMAIN.
    path_s, _, domain = arg.rpartition(":") if ":" in arg else (arg, "", "")
    root = Path(path_s).expanduser()
    if not root.is_dir():
        raise MoelabError(f"dir source: {root} is not a directory")
    domain = domain or root.resolve().name
    # Hidden files and folders (.git, .venv) hold tooling, not the text a user means.
    files = sorted(p for p in root.rglob("*") if p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(root).parts))
    texts = ((p, _read_text_file(p)) for p in files)
    docs = (Document(text=t, domain=domain, lang="und", name=str(p.relative_to(root)))
            for p, t in texts if t and t.strip())
    first = next(docs, None)
    if first is None:
        raise MoelabError(f"dir source: no text files under {root}")
    return itertools.chain([first], docs)


def _read_text_file(path: Path) -> str | None:
    """The file's text, or None for a binary file (a NUL byte, or not UTF-8)."""
    data = path.read_bytes()
    if b"\x00" in data[:8192]:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _jsonl(path: Path) -> Iterator[Document]:
    if not path.is_file():
        raise MoelabError(f"jsonl source: {path} does not exist")
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    docs = [_jsonl_document(line, path, n) for n, line in enumerate(lines, 1) if line.strip()]
    if not docs:
        raise MoelabError(f"jsonl source: {path} has no records")
    return iter(docs)


def _jsonl_document(line: str, path: Path, n: int) -> Document:
    # The whole file is parsed up front so a malformed line fails the build before any work.
    where = f"{path} line {n}"
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        raise MoelabError(f"{where}: not valid JSON ({e.msg})") from None
    if not isinstance(rec, dict):
        raise MoelabError(f"{where}: expected a JSON object")
    domain, lang = rec.get("domain", path.stem), rec.get("lang", "und")
    if not isinstance(domain, str) or not isinstance(lang, str) or not domain or not lang:
        raise MoelabError(f"{where}: 'domain' and 'lang' must be non-empty strings")
    turns = rec.get("turns")
    if turns is not None:
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) for t in turns):
            raise MoelabError(f"{where}: 'turns' must be a non-empty list of strings")
        return conversation(turns, domain=domain, lang=lang, name=f"{path.name}:{n}")
    if not isinstance(rec.get("text"), str):
        raise MoelabError(f"{where}: needs a string 'text' or a list of strings 'turns'")
    name, group = rec.get("name", f"{path.name}:{n}"), rec.get("group", "")
    if not isinstance(name, str) or not isinstance(group, str):
        raise MoelabError(f"{where}: 'name' and 'group' must be strings")
    return Document(text=rec["text"], domain=domain, lang=lang, name=name, group=group)


def _hugging_face(arg: str) -> Iterator[Document]:
    name, _, config = arg.partition(":")
    try:
        import datasets
    except ImportError:
        raise MoelabError(f"hf:{arg} needs the `datasets` package, which is not installed "
                          "(pip install datasets; it also needs the network)") from None
    try:
        rows = datasets.load_dataset(name, config or None, split="train", streaming=True)
        first = next(iter(rows))
    except Exception as e:  # datasets raises many types for offline / unknown names
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise MoelabError(f"hf:{arg}: could not load the dataset (offline or not found): {msg}") from None
    if not isinstance(first.get("text"), str):
        raise MoelabError(f"hf:{arg}: rows have no string 'text' column (columns: {', '.join(first)})")
    domain = name.rsplit("/", 1)[-1]
    return (Document(text=row["text"], domain=domain, lang="und", name=f"{name}#{i}")
            for i, row in enumerate(rows))
