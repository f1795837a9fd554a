"""The explorer's questions, as SQL over a trace's Parquet file (DuckDB): each answers from the rows it needs.

A trace of 100M rows stays on disk: rows are in (seq, pos, layer, rank) order, so a document's rows sit
in a few row groups and DuckDB skips the others by their min/max statistics. Every function here takes a
DuckDB cursor and the `FROM` expression of `source_sql` and returns plain Python values (JSON-ready);
none writes anything. Columns a writer left out read as the writer's defaults (docs/TRACE.md).
"""

from __future__ import annotations

from typing import Any

from moelab.trace.io import CONSTANT_DEFAULTS, COPIED_DEFAULTS

MAX_DOC_TOKENS = 4096  # a text view shows at most this many tokens of a document
DOC_PAGE = 200


def source_sql(path: str, stored: list[str], null_columns: list[str]) -> str:
    """A sub-query over the Parquet file with every documented column, defaults filled, labels as text."""
    exprs = []
    for c in ("seq", "pos", "layer", "rank", "expert"):
        exprs.append(f"CAST({c} AS BIGINT) AS {c}")
    for c, src in COPIED_DEFAULTS.items():
        exprs.append(f"CAST({c if c in stored else src} AS BIGINT) AS {c}")
    for c in ("turn",):
        exprs.append(f"CAST({c} AS BIGINT) AS {c}" if c in stored else f"{CONSTANT_DEFAULTS[c]} AS {c}")
    for c in ("domain", "lang"):
        exprs.append(f"CAST({c} AS VARCHAR) AS {c}" if c in stored else f"'{CONSTANT_DEFAULTS[c]}' AS {c}")
    exprs.append("CAST(dropped AS BOOLEAN) AS dropped" if "dropped" in stored else "false AS dropped")
    for c, typ in (("token", "BIGINT"), ("weight", "DOUBLE"), ("prob", "DOUBLE")):
        exprs.append(f"CAST(NULL AS {typ}) AS {c}" if c in null_columns else f"CAST({c} AS {typ}) AS {c}")
    quoted = path.replace("'", "''")
    return f"(SELECT {', '.join(exprs)} FROM read_parquet('{quoted}'))"


def _rows(cur, sql: str, params: list | None = None) -> list[dict[str, Any]]:
    cur.execute(sql, params or [])
    names = [d[0] for d in cur.description]
    return [dict(zip(names, row)) for row in cur.fetchall()]


def doc_index(cur, src: str) -> list[dict[str, Any]]:
    """One entry per document: its first sequence, token count, domain, language and turns."""
    return _rows(cur, f"""
        SELECT doc, min(seq) AS seq, count(*) AS tokens, any_value(domain) AS domain,
               any_value(lang) AS lang, list(DISTINCT turn ORDER BY turn) AS turns
        FROM {src} WHERE layer = 0 AND rank = 0 GROUP BY doc ORDER BY doc""")


def filter_docs(index: list[dict[str, Any]], *, domain: str = "", lang: str = "", turn: int | None = None,
                docs: set[int] | None = None, offset: int = 0, limit: int = DOC_PAGE) -> dict[str, Any]:
    """A page of the document index matching every given filter, and how many match in all."""
    hits = [d for d in index
            if (not domain or d["domain"] == domain) and (not lang or d["lang"] == lang)
            and (turn is None or turn in d["turns"]) and (docs is None or d["doc"] in docs)]
    return {"total": len(hits), "offset": offset, "docs": hits[offset:offset + limit],
            "domains": sorted({d["domain"] for d in index}), "langs": sorted({d["lang"] for d in index})}


def docs_with_tokens(cur, src: str, ids: list[int]) -> set[int]:
    """Documents holding every one of the token ids (a text search, after encoding the text)."""
    if not ids:
        return set()
    marks = ", ".join("?" for _ in set(ids))
    cur.execute(f"""SELECT doc FROM {src} WHERE layer = 0 AND rank = 0 AND token IN ({marks})
                    GROUP BY doc HAVING count(DISTINCT token) = ?""", [*set(ids), len(set(ids))])
    return {int(r[0]) for r in cur.fetchall()}


def doc_routes(cur, src: str, doc: int, num_layers: int, top_k: int,
               limit: int = MAX_DOC_TOKENS) -> dict[str, Any]:
    """A document's tokens and, per token, every layer's choices: experts/weights/probs/dropped [T][L][K].

    The document's sequences come from the index's first sequence onward; the seq range lets DuckDB
    skip row groups by their statistics instead of scanning for `doc` everywhere."""
    cur.execute(f"SELECT min(seq), max(seq) FROM {src} WHERE doc = ? AND layer = 0 AND rank = 0", [doc])
    lo, hi = cur.fetchone()
    if lo is None:
        return {"doc": doc, "tokens": [], "truncated": False}
    rows = _rows(cur, f"""
        SELECT seq, pos, doc_pos, token, turn, layer, rank, expert, weight, prob, dropped FROM {src}
        WHERE seq BETWEEN ? AND ? AND doc = ? ORDER BY seq, pos, layer, rank""", [lo, hi, doc])
    return {"doc": doc, **_assemble(rows, num_layers, top_k, limit)}


def _assemble(rows: list[dict[str, Any]], num_layers: int, top_k: int, limit: int) -> dict[str, Any]:
    """(token, layer, rank) rows in order -> one entry per token with [L][K] lists of its choices."""
    tokens: list[dict[str, Any]] = []
    index: dict[tuple[int, int], dict[str, Any]] = {}
    truncated = False
    for r in rows:
        key = (r["seq"], r["pos"])
        tok = index.get(key)
        if tok is None:
            if len(tokens) >= limit:
                truncated = True
                break
            tok = {"seq": r["seq"], "pos": r["pos"], "doc_pos": r["doc_pos"], "token": r["token"],
                   "turn": r["turn"], "experts": [[None] * top_k for _ in range(num_layers)],
                   "weights": [[None] * top_k for _ in range(num_layers)],
                   "probs": [[None] * top_k for _ in range(num_layers)],
                   "dropped": [[False] * top_k for _ in range(num_layers)]}
            index[key] = tok
            tokens.append(tok)
        l, k = r["layer"], r["rank"]
        tok["experts"][l][k] = r["expert"]
        tok["weights"][l][k] = r["weight"]
        tok["probs"][l][k] = r["prob"]
        tok["dropped"][l][k] = bool(r["dropped"])
    return {"tokens": tokens, "truncated": truncated}


def token_ids_max(cur, src: str) -> int | None:
    """The largest token id in the trace (None when it has no token ids)."""
    cur.execute(f"SELECT max(token) FROM {src}")
    value = cur.fetchone()[0]
    return None if value is None else int(value)
