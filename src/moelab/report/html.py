"""One self-contained HTML page: a summary of headline numbers with their nulls, then a section per analysis.

Figures are embedded as base64 PNG and the style sheet is inline: the page opens offline, can be mailed
as one file and fetches nothing. `write_report` renders everything in memory first, then writes
`report.html` and `metrics.json` under temporary names and renames them, so a failure leaves no
half-written report behind.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import json
import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

from matplotlib.figure import Figure

from moelab.analysis.common import plain
from moelab.report.plotting import to_png

CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: #222; margin: 0 auto;
       max-width: 1040px; padding: 1.5em 2em 4em; line-height: 1.45; }
h1 { font-size: 1.7em; margin-bottom: 0.2em; }
h2 { border-bottom: 2px solid #ddd; padding-bottom: 0.2em; margin-top: 2.2em; }
h3 { margin-top: 1.6em; }
.subtitle { color: #666; margin-top: 0; }
.summary { background: #f5f7fa; border-left: 4px solid #4a78b5; padding: 0.8em 1.2em; }
.summary li { margin: 0.25em 0; }
.summary .group { font-weight: 600; margin: 0.8em 0 0; }
nav ul { columns: 2; font-size: 0.9em; }
figure { margin: 1.2em 0 2em; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #444; font-size: 0.92em; margin-top: 0.3em; }
table { border-collapse: collapse; margin: 0.8em 0 1.6em; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: 0.3em 0.7em; text-align: left; vertical-align: top; }
th { background: #f0f0f0; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.note { color: #8a5a00; background: #fff8e6; padding: 0.4em 0.8em; border-radius: 3px; }
.intro { color: #333; }
"""


@dataclasses.dataclass
class FigureBlock:
    figure: Figure
    caption: str  # one sentence: how to read it and what its null is


@dataclasses.dataclass
class Table:
    columns: list[str]  # empty: a key-value table without a header row
    rows: list[list[Any]]
    caption: str = ""


@dataclasses.dataclass
class Note:
    text: str


@dataclasses.dataclass
class Section:
    title: str
    intro: str = ""
    blocks: list[Any] = dataclasses.field(default_factory=list)
    level: int = 2  # 2: a top-level part (a model, the comparison), 3: an analysis within it


def _slug(text: str, used: set[str]) -> str:
    base = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "section"
    slug, i = base, 2
    while slug in used:
        slug, i = f"{base}-{i}", i + 1
    used.add(slug)
    return slug


def _cell(value: Any) -> str:
    is_num = isinstance(value, (int, float)) and not isinstance(value, bool)
    text = f"{value:.3g}" if isinstance(value, float) else str(value)
    return f'<td class="num">{html.escape(text)}</td>' if is_num else f"<td>{html.escape(text)}</td>"


def _block(block: Any, dpi: int) -> str:
    if isinstance(block, FigureBlock):
        data = base64.b64encode(to_png(block.figure, dpi)).decode("ascii")
        cap = html.escape(block.caption)
        return (f'<figure><img src="data:image/png;base64,{data}" alt="{cap}">'
                f"<figcaption>{cap}</figcaption></figure>")
    if isinstance(block, Table):
        head = "".join(f"<th>{html.escape(str(c))}</th>" for c in block.columns)
        head = f"<thead><tr>{head}</tr></thead>" if block.columns else ""
        body = "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in block.rows)
        cap = f"<caption>{html.escape(block.caption)}</caption>" if block.caption else ""
        return f"<table>{cap}{head}<tbody>{body}</tbody></table>"
    if isinstance(block, Note):
        return f'<p class="note">{html.escape(block.text)}</p>'
    raise TypeError(f"unknown report block {type(block).__name__}")


def _summary(summary: Sequence[str] | Mapping[str, Sequence[str]]) -> str:
    """A list of sentences, or one list per model under its name."""
    def items(lines: Sequence[str]) -> str:
        return "<ul>" + "".join(f"<li>{html.escape(line)}</li>" for line in lines) + "</ul>"

    if isinstance(summary, Mapping):
        body = "".join(f'<p class="group">{html.escape(name)}</p>{items(lines)}' for name, lines in summary.items())
    else:
        body = items(summary)
    return f'<section class="summary"><h2 style="border:0;margin-top:0.3em">Summary</h2>{body}</section>'


def render_html(title: str, sections: Sequence[Section], *,
                summary: Sequence[str] | Mapping[str, Sequence[str]] = (), subtitle: str = "", dpi: int = 100) -> str:
    """The whole page as a string (figures rendered here)."""
    used: set[str] = set()
    slugs = [_slug(s.title, used) for s in sections]
    nav = "".join(f'<li><a href="#{slug}">{html.escape(s.title)}</a></li>'
                  for s, slug in zip(sections, slugs) if s.level == 2)
    parts = [f"<h1>{html.escape(title)}</h1>"]
    if subtitle:
        parts.append(f'<p class="subtitle">{html.escape(subtitle)}</p>')
    if summary:
        parts.append(_summary(summary))
    if nav:
        parts.append(f"<nav><ul>{nav}</ul></nav>")
    for s, slug in zip(sections, slugs):
        level = 3 if s.level >= 3 else 2
        parts.append(f'<h{level} id="{slug}">{html.escape(s.title)}</h{level}>')
        if s.intro:
            parts.append(f'<p class="intro">{html.escape(s.intro)}</p>')
        parts.extend(_block(b, dpi) for b in s.blocks)
    body = "\n".join(parts)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{html.escape(title)}</title><style>{CSS}</style></head>\n<body>\n{body}\n</body></html>\n")


def write_report(out_dir: str | Path, sections: Sequence[Section], *, title: str = "moelab routing report",
                 summary: Sequence[str] | Mapping[str, Sequence[str]] = (), subtitle: str = "",
                 metrics: dict[str, Any] | None = None,
                 dpi: int = 100) -> dict[str, Path]:
    """Write `report.html` (and `metrics.json` with every number) into `out_dir`, created if needed."""
    page = render_html(title, sections, summary=summary, subtitle=subtitle, dpi=dpi)
    numbers = json.dumps(plain(metrics or {}), indent=1, allow_nan=False)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"report": out / "report.html", "metrics": out / "metrics.json"}
    texts = {"report": page, "metrics": numbers}
    tmps = {k: p.with_name(f".{p.name}.partial") for k, p in files.items()}
    try:
        for key, tmp in tmps.items():
            tmp.write_text(texts[key], encoding="utf-8")
        for key, tmp in tmps.items():
            os.replace(tmp, files[key])
    finally:
        for tmp in tmps.values():
            tmp.unlink(missing_ok=True)
    return files
