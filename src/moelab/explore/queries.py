"""The explorer's questions, as SQL over a trace's Parquet file (DuckDB): each answers from the rows it needs.

A trace of 100M rows stays on disk: rows are in (seq, pos, layer, rank) order, so a document's rows sit
in a few row groups and DuckDB skips the others by their min/max statistics. Every function here takes a
DuckDB cursor and the `FROM` expression of `source_sql` and returns plain Python values (JSON-ready);
none writes anything. Columns a writer left out read as the writer's defaults (docs/TRACE.md).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from moelab.config import MoelabError

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
    # Per-(token, layer) distributions on rank-0 rows: all E router probabilities (`probs`), or only the
    # top N (`topn_experts`, `topn_probs`); a writer may store them as float16 or float32 lists.
    for c, typ in (("probs", "DOUBLE[]"), ("topn_experts", "BIGINT[]"), ("topn_probs", "DOUBLE[]")):
        exprs.append(f"CAST({c} AS {typ}) AS {c}" if c in stored else f"CAST(NULL AS {typ}) AS {c}")
    quoted = literal_path(path).replace("'", "''")
    return f"(SELECT {', '.join(exprs)} FROM read_parquet('{quoted}'))"


def literal_path(path: str) -> str:
    """DuckDB reads every file name as a glob ('a*.parquet' would also read ab.parquet): each pattern
    character is put in a one-character class, which matches exactly that character."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in path)


def _rows(cur, sql: str, params: list | None = None) -> list[dict[str, Any]]:
    cur.execute(sql, params or [])
    names = [d[0] for d in cur.description]
    return [dict(zip(names, row)) for row in cur.fetchall()]


def doc_index(cur, src: str) -> list[dict[str, Any]]:
    """One entry per document: its first sequence, token count, domain, language and turns."""
    return _rows(cur, f"""
        SELECT doc, min(seq) AS seq, max(seq) AS seq_end, count(*) AS tokens, any_value(domain) AS domain,
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


MAX_PHRASE = 16


def docs_with_phrase(cur, src: str, ids: list[int]) -> set[int]:
    """Documents holding the token ids in a row, within one sequence (a text search, after encoding).

    One scan keeps the rows whose token is in the phrase; joins on (seq, pos + i) then find the runs."""
    if not ids:
        return set()
    if len(ids) > MAX_PHRASE:
        raise MoelabError(f"search for at most {MAX_PHRASE} tokens (this text has {len(ids)})")
    marks = ", ".join("?" for _ in set(ids))
    joins = " ".join(f"JOIN hit t{i} ON t{i}.seq = t0.seq AND t{i}.pos = t0.pos + {i} AND t{i}.token = ?"
                     for i in range(1, len(ids)))
    cur.execute(f"""WITH hit AS (SELECT doc, seq, pos, token FROM {src}
                                 WHERE layer = 0 AND rank = 0 AND token IN ({marks}))
                    SELECT DISTINCT t0.doc FROM hit t0 {joins} WHERE t0.token = ?""",
                [*set(ids), *ids[1:], ids[0]])
    return {int(r[0]) for r in cur.fetchall()}


def doc_routes(cur, src: str, doc: int, num_layers: int, top_k: int, limit: int = MAX_DOC_TOKENS,
               seq_range: tuple[int, int] | None = None, start: int = 0, with_entropy: bool = False) -> dict[str, Any]:
    """A document's tokens and, per token, every layer's choices: experts/weights/probs/dropped [T][L][K].

    The document's seq range (from the index, or found first) lets DuckDB skip row groups by their
    statistics in the main query. `start` pages: the tokens from that document position on."""
    if seq_range is None:
        cur.execute(f"SELECT min(seq), max(seq) FROM {src} WHERE doc = ? AND layer = 0 AND rank = 0", [doc])
        seq_range = cur.fetchone()
    lo, hi = seq_range
    if lo is None:
        return {"doc": doc, "tokens": [], "truncated": False}
    cur.execute(f"""
        SELECT seq, pos, doc_pos, token, turn, layer, rank, expert, weight, prob, dropped FROM {src}
        WHERE seq BETWEEN ? AND ? AND doc = ? AND doc_pos >= ? ORDER BY seq, pos, layer, rank LIMIT ?""",
                [lo, hi, doc, start, (limit + 1) * num_layers * top_k])
    out = assemble(cur.fetchnumpy(), num_layers, top_k, limit)
    if with_entropy and out["tokens"]:
        first, last = out["tokens"][0], out["tokens"][-1]
        at = {(t["seq"], t["pos"]): i for i, t in enumerate(out["tokens"])}
        for t in out["tokens"]:
            t["entropy"] = [None] * num_layers
        for seq, pos, layer, h in entropies(cur, src, (first["seq"], first["pos"]), (last["seq"], last["pos"])):
            if (seq, pos) in at:
                out["tokens"][at[(seq, pos)]]["entropy"][layer] = h
    return {"doc": doc, "start": start, "limit": limit, **out}


def entropies(cur, src: str, lo: tuple[int, int], hi: tuple[int, int]) -> list[tuple]:
    """(seq, pos, layer, H) for the tokens from lo to hi (seq, pos): the entropy in nats of the router's
    probabilities over all E experts, normalised to sum 1 (a softmax router's already do; float16
    storage leaves them a little off), H = ln s - sum p ln p / s with s = sum p. By unnest, not a list
    lambda, so any DuckDB from 1.0 runs it."""
    cur.execute(f"""SELECT seq, pos, layer, ln(sum(p)) + sum(CASE WHEN p > 0 THEN -p * ln(p) ELSE 0 END) / sum(p)
                    FROM (SELECT seq, pos, layer, unnest(probs) AS p FROM {src}
                          WHERE rank = 0 AND probs IS NOT NULL AND seq BETWEEN ? AND ?
                          AND (seq > ? OR pos >= ?) AND (seq < ? OR pos <= ?))
                    GROUP BY seq, pos, layer HAVING sum(p) > 0""", [lo[0], hi[0], lo[0], lo[1], hi[0], hi[1]])
    return [(int(s), int(p), int(l), float(h)) for s, p, l, h in cur.fetchall()]


def token_distribution(cur, src: str, seq: int, pos: int) -> list[dict[str, Any]]:
    """One token's stored router distribution per layer: all E probabilities, or the top N with their
    experts; empty where the trace stores neither."""
    cur.execute(f"""SELECT layer, probs, topn_experts, topn_probs FROM {src}
                    WHERE seq = ? AND pos = ? AND rank = 0 ORDER BY layer""", [seq, pos])
    out = []
    for layer, probs, top_e, top_p in cur.fetchall():
        row: dict[str, Any] = {"layer": int(layer)}
        if probs is not None:
            p = np.asarray(probs, np.float64)
            row["probs"] = _short(p).tolist()
            s = p.sum()
            q = p[p > 0] / s if s > 0 else p[:0]
            row["entropy"] = float(-(q * np.log(q)).sum()) if s > 0 else None
        if top_e is not None and top_p is not None:
            row["topn"] = {"experts": [int(e) for e in top_e], "probs": _short(np.asarray(top_p, np.float64)).tolist()}
        out.append(row)
    return out


def _values(col) -> tuple[np.ndarray, np.ndarray]:
    """A fetched column -> (values, null mask); DuckDB gives masked arrays where a column has nulls."""
    return np.asarray(np.ma.getdata(col)), np.ma.getmaskarray(col)


def _grid(col, at: tuple, shape: tuple, fill) -> list:
    """Scatter one column's rows into a (T, L, K) nested list; cells without a row, or null, are None."""
    values, null = _values(col)
    grid = np.full(shape, None, dtype=object)
    grid[at] = np.where(null, None, _short(values).astype(object))
    return grid.tolist()


def _short(values: np.ndarray) -> np.ndarray:
    """Floats rounded to 7 significant digits, float32's precision (the trace stores float32): JSON gets
    '0.6248393', not '0.6248392462730408', a page half as long, and nothing shown changes."""
    if values.dtype.kind != "f":
        return values
    with np.errstate(divide="ignore", invalid="ignore"):
        digits = 6 - np.floor(np.log10(np.abs(values)))
        scale = np.where(np.isfinite(digits), 10.0 ** np.clip(digits, -300, 300), 1.0)
        # k / 10^d is the double nearest that decimal, which repr prints as written
        return np.where(np.isfinite(digits), np.round(values * scale) / scale, values)


def assemble(cols: dict[str, Any], num_layers: int, top_k: int, limit: int) -> dict[str, Any]:
    """(token, layer, rank) rows in order -> one entry per token with [L][K] lists of its choices
    (None where a token has no row for that layer and rank, as a trace from another writer may)."""
    seq, pos = _values(cols["seq"])[0], _values(cols["pos"])[0]
    new_R = np.ones(len(seq), bool)
    new_R[1:] = (seq[1:] != seq[:-1]) | (pos[1:] != pos[:-1])
    starts_T = np.flatnonzero(new_R)
    truncated = len(starts_T) > limit
    starts_T = starts_T[:limit]
    tok_R = np.cumsum(new_R) - 1
    keep_R = tok_R < len(starts_T)
    at = (tok_R[keep_R], _values(cols["layer"])[0][keep_R], _values(cols["rank"])[0][keep_R])
    shape = (len(starts_T), num_layers, top_k)
    sub = {name: np.ma.asarray(cols[name])[keep_R] for name in ("expert", "weight", "prob", "dropped")}
    experts, weights, probs = (_grid(sub[c], at, shape, None) for c in ("expert", "weight", "prob"))
    dropped = np.zeros(shape, bool)
    dropped[at] = _values(sub["dropped"])[0].astype(bool)
    dropped = dropped.tolist()
    token, token_null = _values(cols["token"])
    head = {c: _values(cols[c])[0][starts_T].tolist() for c in ("seq", "pos", "doc_pos", "turn")}
    tokens = [{"seq": head["seq"][t], "pos": head["pos"][t], "doc_pos": head["doc_pos"][t],
               "token": None if token_null[i] else int(token[i]), "turn": head["turn"][t],
               "experts": experts[t], "weights": weights[t], "probs": probs[t], "dropped": dropped[t]}
              for t, i in enumerate(starts_T.tolist())]
    return {"tokens": tokens, "truncated": bool(truncated)}
