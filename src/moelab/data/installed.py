"""Text installed with the operating system: translated man pages and gettext message catalogs.

Both come in several languages, which makes them the cheapest multilingual corpus on a machine
without internet: the .mo catalogs are even parallel (the same messages in every language).
"""

from __future__ import annotations

import gettext
import os
import re
import shutil
import signal
import subprocess
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, Iterator, TypeVar

from moelab.config import MoelabError
from moelab.data.document import Document

MAN_ROOT = Path("/usr/share/man")
LOCALE_ROOT = Path("/usr/share/locale")
MIN_MESSAGE_CHARS = 20  # shorter msgstrs are menu labels and single words, not prose
MAN_TIMEOUT_S = 20.0  # pages render in well under a second; troff loops forever on a few
MESSAGES_PER_DOC_BYTES = 4096  # batch messages so documents are a few KB, not one line each
_OVERSTRIKE = re.compile(r".\x08")  # `x\bx` (bold) and `_\bx` (underline) from grotty
_ANSI = re.compile(r"\x1b\[[0-9;]*m")

T = TypeVar("T")
R = TypeVar("R")


# ---- man pages -------------------------------------------------------------------------------
def man_pages(langs: list[str], *, root: Path = MAN_ROOT, workers: int | None = None) -> Iterator[Document]:
    """Every man page installed for each language, rendered to plain text, in sorted path order."""
    if not langs:
        raise MoelabError("manpages: name at least one language, e.g. manpages:de,fr")
    if shutil.which("man") is None:
        raise MoelabError("manpages: the `man` program is not installed (Debian package man-db)")
    pages = [(lang, page) for lang in langs for page in _man_files(root, lang)]
    rendered = ordered_map(lambda item: render_man_page(item[1]), pages, workers or os.cpu_count() or 2)
    return (Document(text=text, domain="prose", lang=lang, name=str(page.relative_to(root / lang)))
            for (lang, page), text in zip(pages, rendered) if text.strip())


def _man_files(root: Path, lang: str) -> list[Path]:
    folder = root / lang
    # Symlinked pages are aliases of pages already listed (e.g. vigr -> vipw): read each once.
    files = sorted(p for p in folder.glob("man*/*") if p.is_file() and not p.is_symlink())
    if not files:
        raise MoelabError(f"manpages: no man pages installed for {lang!r} under {folder} "
                          f"(install the Debian package manpages-{lang})")
    return files


def render_man_page(path: Path, timeout_s: float = MAN_TIMEOUT_S) -> str:
    """`man -l` renders one page; one page per process, because workers sharing output splice pages.

    A page troff cannot finish renders as "" and is left out (seen: ja/man5/apt_preferences.5, where
    troff loops forever); its whole process group is killed, as troff runs as man's grandchild.
    """
    env = {**os.environ, "MANWIDTH": "80", "LC_ALL": "C.UTF-8"}  # UTF-8 output whatever the locale
    # --nh --nj: no hyphenation or justification, so words are not split across lines.
    proc = subprocess.Popen(["man", "--nh", "--nj", "-l", str(path)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return ""
    text = out.decode("utf-8", errors="replace")
    text = _ANSI.sub("", _OVERSTRIKE.sub("", text))
    return "\n".join(line.rstrip() for line in text.splitlines()).strip() + "\n"


def ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int) -> Iterator[R]:
    """`map(fn, items)` on a thread pool, in order, keeping only 2 * workers calls in flight.

    The bounded look-ahead matters when the consumer stops early (a byte cap): we do not render
    hundreds of pages nobody reads.
    """
    pool = ThreadPoolExecutor(max_workers=max(1, workers))
    try:
        items = iter(items)
        pending = deque(pool.submit(fn, item) for item in _take(items, 2 * workers))
        while pending:
            result = pending.popleft().result()
            pending.extend(pool.submit(fn, item) for item in _take(items, 1))
            yield result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _take(it: Iterator[T], n: int) -> list[T]:
    return [x for _, x in zip(range(n), it)]


# ---- gettext catalogs --------------------------------------------------------------------------
def gettext_messages(langs: list[str], *, root: Path = LOCALE_ROOT) -> Iterator[Document]:
    """The translated messages (msgstr) of every catalog of each language, a few KB per document."""
    if not langs:
        raise MoelabError("gettext: name at least one language, e.g. gettext:de,fr")
    catalogs = [(lang, mo) for lang in langs for mo in _mo_files(root, lang)]
    return (doc for lang, mo in catalogs for doc in _catalog_documents(mo, lang))


def _mo_files(root: Path, lang: str) -> list[Path]:
    folder = root / lang / "LC_MESSAGES"
    files = sorted(folder.glob("*.mo"))
    if not files:
        raise MoelabError(f"gettext: no message catalogs for {lang!r} under {folder} "
                          "(install the programs' translations or choose another language)")
    return files


def catalog_messages(path: Path) -> list[str]:
    """The distinct msgstr values of 20+ characters, ordered by msgid so languages line up.

    A catalog that cannot be parsed (some ship a wrong charset header, e.g. net-tools.mo in de)
    yields nothing: it is a flaw of the installed system, not of the user's request.
    """
    try:
        with open(path, "rb") as f:
            catalog = gettext.GNUTranslations(f)._catalog  # the parsed msgid -> msgstr table
    except (OSError, ValueError, UnicodeDecodeError, LookupError):
        return []
    # Plural forms are keyed (msgid, n); str() makes the keys comparable for sorting.
    by_id = sorted(((str(k), v) for k, v in catalog.items() if k != ""), key=lambda kv: kv[0])
    seen: set[str] = set()
    out = []
    for _, text in by_id:
        text = text.strip()
        if len(text) >= MIN_MESSAGE_CHARS and text not in seen:
            seen.add(text)
            out.append(text)
    return out


def _catalog_documents(path: Path, lang: str) -> Iterator[Document]:
    batch: list[str] = []
    size = 0
    part = 0
    for message in catalog_messages(path):
        batch.append(message)
        size += len(message.encode("utf-8")) + 1
        if size >= MESSAGES_PER_DOC_BYTES:
            yield Document(text="\n".join(batch) + "\n", domain="prose", lang=lang, name=f"{path.name}#{part}")
            batch, size, part = [], 0, part + 1
    if batch:
        yield Document(text="\n".join(batch) + "\n", domain="prose", lang=lang, name=f"{path.name}#{part}")
