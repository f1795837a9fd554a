"""Multi-turn text from what every machine has: the interactive sessions of Python's own documentation.

The standard library's docstrings and pydoc's reference topics hold thousands of interpreter sessions
(`>>> code`, `... continuation`, then the interpreter's reply). Each is a real two-party exchange, so it
becomes a conversation: turn 0 is the first input, turn 1 the interpreter's reply, turn 2 the next input,
and so on. A session is a run of examples with no blank line between them (a docstring's closing quotes
end it too); inputs without a reply (an
assignment, an import) join the next input's turn, so turns alternate input / reply. Sessions with fewer
than `min_replies` replies are left out (a single exchange has no "later turn").

Spec `turns:doctest` (domain `dialogue`, lang `py`): stdlib .py files in path order, then pydoc topics.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Iterable, Iterator

from moelab.data.document import Document, conversation

PROMPT, MORE = ">>>", "..."


def sessions(text: str) -> Iterator[tuple[int, list[str]]]:
    """(first line number, turns) of each interpreter session in `text`."""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].lstrip().startswith(PROMPT):
            start, block = i, []
            while i < len(lines) and lines[i].strip():
                line, closes = _docstring_end(lines[i])
                if line.strip():
                    block.append(line)
                i += 1
                if closes:
                    break
            yield start + 1, _turns(textwrap.dedent("\n".join(block)).splitlines())
        else:
            i += 1


def _docstring_end(line: str) -> tuple[str, bool]:
    """A line with the closing quotes of its docstring removed, and whether they were there."""
    body = line.rstrip()
    for quotes in ('"""', "'''"):
        if body.endswith(quotes):
            return body[:-3], True
    return line, False


def _turns(block: list[str]) -> list[str]:
    """Alternating input / reply turns of one session block (dedented lines, none blank)."""
    kinds: list[str] = []
    turns: list[list[str]] = []
    for line in block:
        continues_input = line.startswith(MORE) and kinds and kinds[-1] == "in"
        kind = "in" if line.startswith(PROMPT) or continues_input else "out"
        if not kinds or kinds[-1] != kind:
            kinds.append(kind)
            turns.append([])
        turns[-1].append(line)
    return ["\n".join(t) for t in turns]


def session_documents(texts: Iterable[tuple[str, str]], min_replies: int = 2) -> Iterator[Document]:
    """Conversations from (name, text) pairs: one per session with at least `min_replies` replies."""
    for name, text in texts:
        for line, turns in sessions(text):
            if len(turns) // 2 >= min_replies and turns[0].startswith(PROMPT):
                yield conversation(turns, domain="dialogue", lang="py", name=f"{name}:{line}")


def doctest_sessions(stdlib_files: Iterable[tuple[str, Path]], topics: dict[str, str]) -> Iterator[Document]:
    """The sessions of the stdlib's (name, path) files, read lazily in the order given, then pydoc's."""
    texts = ((name, path.read_text(encoding="utf-8", errors="replace")) for name, path in stdlib_files)
    yield from session_documents(texts)
    yield from session_documents((f"pydoc:{k}", topics[k]) for k in sorted(topics))
