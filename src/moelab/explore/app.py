"""The explorer's state and answers: the opened traces, an optional tokenizer and model, and one method
per view returning JSON-ready values. The HTTP layer (server.py) only parses requests and calls these.

Opening a trace validates it with moelab's own reader (schema, metadata; `full_check` also scans every
row) and reads no rows; the document index is built on first use by one query and kept. Nothing here
writes: DuckDB runs in memory and reads the Parquet files.
"""

from __future__ import annotations

import re
import threading
from functools import lru_cache
from pathlib import Path
from typing import Any

import duckdb
import pyarrow.parquet as pq

from moelab.config import MoelabError
from moelab.explore import diff, expert, queries
from moelab.explore.summary import ExpertSummary
from moelab.trace.io import open_trace

ROUTING_COLUMNS = ["seq", "pos", "layer", "rank", "expert"]


class TraceSource:
    """One opened trace: its metadata, its SQL source, and its document index (built once, on demand)."""

    def __init__(self, index: int, path: str | Path, full_check: bool = False):
        trace = open_trace(path)  # raises MoelabError with one line for a trace that does not validate
        if full_check:
            for _ in trace.iter_batches(columns=[c for c in trace.columns if c not in trace.optional]):
                pass
        self.index, self.path, self.meta = index, Path(path), trace.meta
        self.num_layers, self.top_k = len(trace.meta.num_experts), trace.meta.top_k
        stored = pq.ParquetFile(path).schema_arrow.names
        self.sql = queries.source_sql(str(self.path.resolve()), stored, list(trace.null_columns))
        self.null_columns = dict(trace.null_columns)
        self.num_rows = trace.num_rows
        self.max_token = _max_token(self.path) if "token" not in trace.null_columns else None
        # the document the page opens first (the index lists documents by id): from the statistics
        self.first_doc = _stat(self.path, "doc" if "doc" in stored else "seq", min)
        # the router distribution the trace stores: all E probabilities, only the top N, or none
        self.distribution = ("full" if "probs" in stored else
                             "topn" if {"topn_experts", "topn_probs"} <= set(stored) else "none")
        self.topn = _list_length(self.sql, "topn_probs") if self.distribution == "topn" else None
        self.twin: TraceSource | None = None
        self._docs: list[dict[str, Any]] | None = None
        self._seq_range: dict[int, tuple[int, int]] = {}
        self._lock = threading.Lock()

    def docs(self, cur) -> list[dict[str, Any]]:
        if self.twin is not None:  # the same file opened twice (a self-diff): one index
            return self.twin.docs(cur)
        with self._lock:
            if self._docs is None:
                docs = queries.doc_index(cur, self.sql)
                self._seq_range = {d["doc"]: (d["seq"], d["seq_end"]) for d in docs}
                self._docs = docs  # last: routes() reads _seq_range once _docs is set, without the lock
            return self._docs

    def routes(self, cur, doc: int, start: int = 0, limit: int = queries.MAX_DOC_TOKENS) -> dict[str, Any]:
        """A document's routes (queries.doc_routes), its sequences looked up in the document index, or
        while that is being built, found by a query the row groups' statistics on `doc` keep short: the
        first page of text does not wait for the index (issue 23.9, first paint)."""
        owner = self.twin or self
        if owner._docs is not None and doc not in owner._seq_range:
            return {"doc": doc, "tokens": [], "truncated": False}
        return queries.doc_routes(cur, self.sql, doc, self.num_layers, self.top_k,
                                  seq_range=owner._seq_range.get(doc), start=start, limit=limit,
                                  with_entropy=self.distribution == "full")

    def info(self) -> dict[str, Any]:
        return {"index": self.index, "name": self.path.name, "path": str(self.path), "rows": self.num_rows,
                "first_doc": self.first_doc, "distribution": self.distribution, "topn": self.topn,
                "num_experts": self.meta.num_experts, "top_k": self.top_k, "layers": self.num_layers,
                "labels": self.meta.labels, "null_columns": self.null_columns, "notes": self.meta.notes,
                "source": self.meta.source, "checkpoint_step": self.meta.checkpoint_step,
                # Megatron's routing dumps keep each token's experts as a set (issue 23.3): no rank 0 to colour by
                "rank_order": "unknown" if self.meta.extra.get("rank_order") == "unknown" else "known"}


def _max_token(path: Path) -> int | None:
    """The largest token id, from the Parquet statistics (every row group's max) without reading rows."""
    return _stat(path, "token", max)


def _list_length(sql: str, column: str) -> int | None:
    """The length of a per-(token, layer) list column, from its first stored value."""
    with duckdb.connect(":memory:") as db:
        row = db.execute(f"SELECT len({column}) FROM {sql} WHERE {column} IS NOT NULL LIMIT 1").fetchone()
    return None if row is None else int(row[0])


def _stat(path: Path, column: str, pick) -> int | None:
    """min or max (`pick`) of a column over the row groups' statistics; None where one has none."""
    md = pq.ParquetFile(path).metadata
    names = [md.row_group(0).column(j).path_in_schema for j in range(md.num_columns)]
    if column not in names:
        return None
    j, best = names.index(column), None
    for g in range(md.num_row_groups):
        stats = md.row_group(g).column(j).statistics
        if stats is None or not stats.has_min_max:
            return None
        v = stats.max if pick is max else stats.min
        best = v if best is None else pick(best, v)
    return None if best is None else int(best)


class Explorer:
    """Answers the explorer's views over `sources`, decoding token ids with `tokenizer` when given."""

    def __init__(self, sources: list[TraceSource], tokenizer=None, live=None, ablations: list[dict] = ()):
        self.sources, self.tokenizer, self.live_model = sources, tokenizer, live
        self.ablations = list(ablations)  # rows of `moelab intervene` results, each naming its file
        self.db = duckdb.connect(":memory:")
        self._text = lru_cache(maxsize=1 << 16)(self._decode)
        by_file: dict[Path, ExpertSummary] = {}  # a trace opened twice (a self-diff) is summarised once
        for s in sources:
            if s.path.resolve() in by_file:
                s.twin = next(t for t in sources if t.path.resolve() == s.path.resolve())
            else:
                by_file[s.path.resolve()] = ExpertSummary(
                    s.sql, f"t{s.index}", s.path, s.meta.num_experts, s.top_k,
                    first=lambda s=s: s.docs(self.db.cursor()), with_token="token" not in s.null_columns).start()
        self.summaries = [by_file[s.path.resolve()] for s in sources]

    def _decode(self, token: int) -> str:
        return self.tokenizer.decode([token]) if self.tokenizer is not None else f"#{token}"

    def text(self, token: int | None) -> str:
        return "?" if token is None else self._text(int(token))

    def label_tokens(self, tokens: list[dict[str, Any]]) -> None:
        """Each token's text, decoded in spans: a byte-level tokenizer splits one multi-byte character
        (é, 日) over tokens that decode alone to U+FFFD. The character goes to the token that completes
        it; the tokens before it get "" and `part: True` (the page shows them as a thin mark)."""
        pending: list[dict[str, Any]] = []
        for t in tokens:
            if self.tokenizer is None or t["token"] is None:
                t["text"] = self.text(t["token"])
                continue
            pending.append(t)
            text = self.tokenizer.decode([int(p["token"]) for p in pending])
            if "\ufffd" in text and len(pending) < MAX_CHAR_TOKENS:
                continue
            if "\ufffd" in text:  # not a character after 4 bytes' worth of tokens: show each alone
                for p in pending:
                    p["text"] = self.text(p["token"])
            else:
                for p in pending[:-1]:
                    p["text"], p["part"] = "", True
                pending[-1]["text"] = text
            pending = []
        for p in pending:  # a character cut by the end of the document
            p["text"] = self.text(p["token"])

    def source(self, params: dict[str, str], key: str = "trace") -> TraceSource:
        i = _int(params, key, 0)
        if not 0 <= i < len(self.sources):
            raise MoelabError(f"no trace {i}: {len(self.sources)} are open")
        return self.sources[i]

    def info(self) -> dict[str, Any]:
        return {"traces": [s.info() for s in self.sources], "tokenizer": self.tokenizer is not None,
                "live": self.live_model is not None, "page_tokens": queries.MAX_DOC_TOKENS}

    def docs(self, params: dict[str, str]) -> dict[str, Any]:
        src, cur = self.source(params), self.db.cursor()
        wanted = None
        q = params.get("q", "").strip()
        if q:
            wanted = set().union(*(queries.docs_with_phrase(cur, src.sql, ids) for ids in self._query_ids(q)))
        return queries.filter_docs(src.docs(cur), domain=params.get("domain", ""), lang=params.get("lang", ""),
                                   turn=_int(params, "turn", None, minimum=-1), docs=wanted,
                                   offset=_int(params, "offset", 0))

    def _query_ids(self, q: str) -> list[list[int]]:
        """Search text -> the token-id phrases to look for: `#12 #40` are ids; other text goes through the
        tokenizer twice, as typed and after a space, since a byte-level BPE spells a word inside a line
        (" return") with other ids than at its start ("return")."""
        if len(q) > MAX_QUERY:
            raise MoelabError(f"the search is {len(q)} characters long: at most {MAX_QUERY}")
        words = q.split()
        if all(w.startswith("#") for w in words):
            bad = [w for w in words if not _ID.fullmatch(w[1:])]
            if bad:
                raise MoelabError(f"{bad[0][:20]!r} is not a token id (#0 to #{MAX_ID})")
            return [[int(w[1:]) for w in words]]
        if self.tokenizer is None:
            raise MoelabError("searching text needs a tokenizer (--tokenizer or --model); search ids as #123")
        phrases = [self.tokenizer.encode(q), self.tokenizer.encode(" " + q)]
        return [p for i, p in enumerate(phrases) if p and p not in phrases[:i]]

    def doc(self, params: dict[str, str]) -> dict[str, Any]:
        src = self.source(params)
        limit = _int(params, "limit", queries.MAX_DOC_TOKENS)
        if not 1 <= limit <= queries.MAX_DOC_TOKENS:
            raise MoelabError(f"limit={limit} is not from 1 to {queries.MAX_DOC_TOKENS}")
        out = src.routes(self.db.cursor(), _int(params, "doc", 0), _int(params, "start", 0), limit)
        self.label_tokens(out["tokens"])
        return out

    def token(self, params: dict[str, str]) -> dict[str, Any]:
        """One token's router distribution per layer (the path panel's bars), with what the trace stores."""
        src = self.source(params)
        seq, pos = _int(params, "seq", 0), _int(params, "pos", 0)
        layers = queries.token_distribution(self.db.cursor(), src.sql, seq, pos) if src.distribution != "none" else []
        return {"seq": seq, "pos": pos, "distribution": src.distribution, "topn": src.topn,
                "num_experts": src.meta.num_experts, "layers": layers}

    def expert(self, params: dict[str, str], wait: float = 0.0) -> dict[str, Any]:
        """One expert's view. From the whole-trace summaries once built (`wait`: seconds to wait for
        them); until then from the in-memory routing index (index.py), built just before them, and
        where a trace's layout allows none, from the layer's rows directly (expert.direct). The same
        numbers whichever: `basis` says which."""
        src, cur = self.source(params), self.db.cursor()
        layer, e = _int(params, "layer", 0), _int(params, "expert", 0)
        if not 0 <= layer < src.num_layers or not 0 <= e < src.meta.num_experts[layer]:
            raise MoelabError(f"layer {layer} has no expert {e}")
        summary = self.summaries[src.index]
        if summary.wait(wait):
            if summary.error:
                raise MoelabError(f"the expert view cannot be built for {src.path}: {summary.error}")
            scur = summary.db.cursor()
            counts = expert.from_summary(scur, summary.tables, summary.pairs_LEE, layer, e)
            return self._expert(src, cur, counts, layer, e) | {"basis": "summary"}
        index = summary.index
        if index.ready.wait(INDEX_WAIT) and index.error is None and not summary.ready.is_set():
            return self._expert(src, cur, index.counts(layer, e), layer, e) | {
                "basis": "index", "progress": summary.progress}
        if summary.ready.is_set():  # finished while this request waited for the index
            return self.expert(params, wait=0)
        return self._expert(src, cur, expert.direct(cur, src.sql, layer, e), layer, e) | {
            "basis": "direct", "progress": summary.progress}

    def _expert(self, src: TraceSource, cur, counts: expert.LayerCounts, layer: int, e: int) -> dict[str, Any]:
        out = {"layer": layer, "expert": e, **expert.label_counts(counts),
               "coactivation": expert.coactivation(counts, e, src.top_k),
               "tokens": {"frequent": [], "lift": []}, "contexts": {}, "ablation": self.ablation_of(src, layer, e)}
        if "token" not in src.null_columns:
            out["tokens"] = expert.token_stats(counts, src.top_k)
            index, wanted = self.summaries[src.index].index, [r["token"] for r in out["tokens"]["lift"][:5]]
            ctx = (index.contexts(layer, e, wanted) if index.ready.is_set() and index.error is None
                   else expert.contexts(cur, src.sql, layer, e, wanted))
            out["contexts"] = {str(t): [{**c, "text": [self.text(i) for i in c["ids"]]} for c in cs]
                               for t, cs in ctx.items()}
            for rows in out["tokens"].values():
                for r in rows:
                    r["text"] = self.text(r["token"])
        return out

    def load(self, params: dict[str, str], wait: float = 0.0) -> dict[str, Any]:
        """Per layer, each expert's choices (all ranks, before dropping) and share; an expert chosen by no
        token of the trace is dead. Null: the uniform share 1/E, what a perfectly balanced router gives.
        Until the summaries are built, counted from the trace by one query."""
        src = self.source(params)
        summary = self.summaries[src.index]
        if summary.wait(wait):
            if summary.error:
                raise MoelabError(f"the load overview cannot be built for {src.path}: {summary.error}")
            scur = summary.db.cursor()
            load = [expert.expert_load(scur, summary.tables["labels"], l) for l in range(src.num_layers)]
        elif summary.index.ready.wait(INDEX_WAIT) and summary.index.error is None:
            load = [summary.index.load(l) for l in range(src.num_layers)]
        else:
            cur = self.db.cursor()
            cur.execute(f"SELECT layer, expert, count(*) FROM {src.sql} GROUP BY ALL")
            load = [{} for _ in range(src.num_layers)]
            for l, e, n in cur.fetchall():
                load[int(l)][int(e)] = int(n)
        layers = []
        for l, E in enumerate(src.meta.num_experts):
            counts = load[l]
            total = sum(counts.values())
            layers.append({"layer": l, "uniform": 1 / E, "total": total,
                           "experts": [{"expert": e, "count": counts.get(e, 0),
                                        "share": counts.get(e, 0) / total if total else 0.0,
                                        "dead": counts.get(e, 0) == 0} for e in range(E)]})
        return {"layers": layers}

    def ablation_of(self, src: TraceSource, layer: int, e: int) -> list[dict[str, Any]]:
        """The measured effect of removing expert e of this MoE layer alone: intervene names blocks, the
        trace names MoE layers, and the trace's `moe_blocks` maps one to the other (none: nothing shown)."""
        blocks = src.meta.extra.get("moe_blocks")
        if not isinstance(blocks, list) or layer >= len(blocks):
            return []
        return [{"file": r["file"], "block": r["block"], **r["all"]} for r in self.ablations
                if r.get("block") == blocks[layer] and r.get("experts") == [e] and isinstance(r.get("all"), dict)]

    def diff(self, params: dict[str, str]) -> dict[str, Any]:
        a, b = self.source(params, "a"), self.source(params, "b")
        if a.num_layers != b.num_layers:
            raise MoelabError(f"the traces have {a.num_layers} and {b.num_layers} MoE layers: no diff")
        doc, cur = _int(params, "doc", 0), self.db.cursor()
        ra, rb = a.routes(cur, doc), b.routes(cur, doc)
        out = diff.diff_routes(ra, rb, a.num_layers)
        self.label_tokens(out["tokens"])
        return out

    def live(self, body: dict[str, Any]) -> dict[str, Any]:
        if self.live_model is None:
            raise MoelabError("no model: start the explorer with --model for the live view")
        text = body.get("text", "")
        if not isinstance(text, str):
            raise MoelabError(f"text must be a string, not {type(text).__name__}")
        out = self.live_model.route(text)
        self.label_tokens(out["tokens"])
        return out


MAX_QUERY = 1000
INDEX_WAIT = 10.0  # seconds an expert view waits for the routing index before scanning the trace itself
MAX_CHAR_TOKENS = 4  # UTF-8 spells a character in at most 4 bytes
MAX_ID = (1 << 31) - 1
_ID = re.compile(r"[0-9]{1,10}")  # ASCII digits only: int() would also take '٣', '+5', ' 5', '1_0'


def _int(params: dict[str, str], key: str, default: int | None, minimum: int = 0) -> int | None:
    """Every number in a query is an index or a count: an ASCII integer from `minimum` (0, or -1 for the
    trace's 'no turn') to 2^31 - 1, strictly (offset=-5 would otherwise index from the end of a list)."""
    value = params.get(key, "")
    if value in ("", None):
        return default
    digits = value[1:] if minimum < 0 and value.startswith("-") else value
    if not _ID.fullmatch(digits) or not minimum <= int(value) <= MAX_ID:
        raise MoelabError(f"{key}={value[:20]!r} is not an integer from {minimum} to {MAX_ID}")
    return int(value)
