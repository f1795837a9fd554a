"""Document: one unit of corpus text, as every source yields it (its own module, so that the source
modules depend on it one way and never on each other)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(kw_only=True)
class Document:
    """One document. A conversation keeps its turns; its `text` is the turns joined by newlines."""

    text: str
    domain: str
    lang: str
    turns: list[str] | None = None
    name: str = ""  # where it came from (a path, a topic), for people reading traces
    group: str = ""  # documents of one group share a split (the code and docstrings of one file); "": itself

    @property
    def num_bytes(self) -> int:
        return len(self.text.encode("utf-8"))


def conversation(turns: list[str], *, domain: str, lang: str, name: str = "") -> Document:
    return Document(text="\n".join(turns), domain=domain, lang=lang, turns=list(turns), name=name)
