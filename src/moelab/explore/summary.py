"""The counts behind the expert view, built by one background pass over a trace after it opens.

An expert view over 100M rows cannot scan the file each time and answer in under a second, so each
trace gets three small summaries, kept in memory (DuckDB tables and a numpy array), never on disk:
- labels: rows by (layer, expert, domain, lang, position bucket);
- tokens: rows by (layer, expert, token);
- pairs: for each layer, how many tokens chose both experts i and j (the co-activation counts);
- clusters / cluster_totals: per (layer, expert, label value) the sums over sequences of k_s^2 and
  k_s n_s, and per (layer, label value) of n_s^2 and the number of sequences (k_s: rows of sequence s in
  the group choosing the expert, n_s: all its rows in the group), from which a share's interval over
  sequences follows without keeping any per-sequence table.
The server opens without waiting for them; an expert view asked for before they are ready says how far
the pass has got, and the page asks again.
"""

from __future__ import annotations

import threading
from pathlib import Path

import duckdb
import numpy as np

from moelab.config import MoelabError
from moelab.trace.io import open_trace

# Position buckets grow by 4x: doc_pos + 1 in [4^b, 4^(b+1)).
BUCKET_SQL = "CAST(floor(log2(doc_pos + 1) / 2) AS BIGINT)"
PAIR_BATCH_ROWS = 1 << 20
# GROUPING(domain, lang, bucket) of each grouping set -> the label it groups by
GROUPING_IDS = {3: "domain", 5: "lang", 6: "bucket"}
SETS = "GROUPING SETS ((layer, {x}seq, domain), (layer, {x}seq, lang), (layer, {x}seq, bucket))"


def cluster_sql(src: str) -> tuple[str, str]:
    """Two queries: per (layer, expert, dim, g) sums of k_s^2 and k_s n_s; per (layer, dim, g) sums of n_s^2
    and the sequence count. One grouping-sets pass each over the rows."""
    rows = f"(SELECT layer, expert, seq, domain, lang, {BUCKET_SQL} AS bucket FROM {src})"
    label = "coalesce(domain, lang, CAST(bucket AS VARCHAR))"
    k_side = f"""WITH per AS (SELECT layer, expert, seq, domain, lang, bucket, GROUPING(domain, lang, bucket) AS gid,
                                     count(*) AS k FROM {rows} GROUP BY {SETS.format(x="expert, ")}),
                 withn AS (SELECT *, sum(k) OVER (PARTITION BY layer, seq, gid, domain, lang, bucket) AS n FROM per)
                 SELECT layer, expert, gid, {label} AS g, sum(k * k) AS kk, sum(k * n) AS kn
                 FROM withn GROUP BY ALL"""
    n_side = f"""SELECT layer, gid, {label} AS g, sum(n * n) AS nn, count(*) AS seqs FROM (
                     SELECT layer, seq, domain, lang, bucket, GROUPING(domain, lang, bucket) AS gid, count(*) AS n
                     FROM {rows} GROUP BY {SETS.format(x="")}) GROUP BY ALL"""
    return k_side, n_side


def pair_counts(path: Path, num_experts: list[int], top_k: int, progress=None) -> np.ndarray:
    """[L, E, E]: tokens of layer l whose top-k holds both i and j (i != j), streamed with moelab's reader.

    Rows come in (seq, pos, layer, rank) order with exactly top_k rows per (token, layer) (docs/TRACE.md),
    so a group starts at each rank-0 row; a group cut by a batch boundary is carried into the next batch."""
    trace = open_trace(path)
    L, E, K = len(num_experts), max(num_experts), top_k
    flat = np.zeros(L * E * E, np.int64)
    iu, ju = np.triu_indices(K, 1)
    carry: dict[str, np.ndarray] = {}
    done = 0
    for b in trace.iter_batches(columns=["layer", "rank", "expert"], batch_rows=PAIR_BATCH_ROWS, validate=False):
        cols = {c: np.concatenate([carry[c], b[c]]) if carry else b[c] for c in ("layer", "rank", "expert")}
        done += len(b["layer"])
        starts = np.flatnonzero(cols["rank"] == 0)
        cut = starts[-1] if done < trace.num_rows else len(cols["rank"])
        carry = {c: v[cut:] for c, v in cols.items()}
        rank, layer, expert = (cols[c][:cut] for c in ("rank", "layer", "expert"))
        if len(rank) % K or np.any(rank.reshape(-1, K) != np.arange(K)):
            raise MoelabError(f"trace {path} rows are not {K} ranks per (token, layer) in order: "
                              f"co-activation needs the documented row order")
        ids_GK = expert.reshape(-1, K).astype(np.int64)
        base_G = layer[::K].astype(np.int64) * E * E
        a, c = ids_GK[:, iu], ids_GK[:, ju]
        flat += np.bincount((base_G[:, None] + a * E + c).reshape(-1), minlength=L * E * E)
        if progress:
            progress(done / trace.num_rows)
    pairs_LEE = flat.reshape(L, E, E)
    return pairs_LEE + pairs_LEE.transpose(0, 2, 1)


def build_tables(cur, src: str, tables: dict[str, str], progress=None) -> None:
    """The summary tables (labels, tokens, clusters, cluster_totals) over the whole trace `src`, for the
    background pass (the direct expert view, expert.direct, counts one layer by its own query)."""
    cur.execute(f"""CREATE OR REPLACE TABLE {tables['labels']} AS
                    SELECT layer, expert, domain, lang, {BUCKET_SQL} AS bucket, count(*) AS n
                    FROM {src} GROUP BY ALL""")
    if progress:
        progress(0.25)
    cur.execute(f"""CREATE OR REPLACE TABLE {tables['tokens']} AS
                    SELECT layer, expert, token, count(*) AS n FROM {src}
                    WHERE token IS NOT NULL GROUP BY ALL""")
    if progress:
        progress(0.4)
    k_side, n_side = cluster_sql(src)
    cur.execute(f"CREATE OR REPLACE TABLE {tables['clusters']} AS {k_side}")
    cur.execute(f"CREATE OR REPLACE TABLE {tables['cluster_totals']} AS {n_side}")
    if progress:
        progress(0.7)


class ExpertSummary:
    """Summaries of one trace (`tables` names its tables in `db`), built once in a daemon thread."""

    def __init__(self, src_sql: str, prefix: str, path: Path, num_experts: list[int], top_k: int,
                 first=None, with_token: bool = True):
        # A database of its own on one thread: the pass leaves the other core to the page's queries.
        self.db = duckdb.connect(":memory:", config={"threads": 1})
        self.src, self.path, self.first = src_sql, path, first
        self.num_experts, self.top_k = num_experts, top_k
        self.tables = {"labels": f"{prefix}_labels", "tokens": f"{prefix}_tokens",
                       "clusters": f"{prefix}_clusters", "cluster_totals": f"{prefix}_cluster_totals"}
        self.pairs_LEE: np.ndarray | None = None
        from moelab.explore.index import RoutingIndex  # expert -> index -> summary: imported late

        self.index = RoutingIndex(path, num_experts, top_k, with_token)
        self.progress, self.error = 0.0, None
        self.ready = threading.Event()
        self._thread = threading.Thread(target=self._build, daemon=True)

    def start(self) -> "ExpertSummary":
        self._thread.start()
        return self

    def _build(self) -> None:
        try:
            if self.first is not None:  # what the page needs first (the document index), without contention
                self.first()
            self.index.build()  # then what the expert view needs until the summaries below are built
            build_tables(self.db.cursor(), self.src, self.tables, lambda f: setattr(self, "progress", f))
            self.pairs_LEE = pair_counts(self.path, self.num_experts, self.top_k,
                                         lambda f: setattr(self, "progress", 0.7 + 0.3 * f))
        except Exception as e:  # shown to the page by the expert view, which cannot answer without it
            self.error = f"{type(e).__name__}: {e}" if not isinstance(e, MoelabError) else str(e)
        finally:
            if not self.index.ready.is_set():  # the document index failed first: no view may count from it
                self.index.error = f"not built ({self.error})"
            self.index.ready.set()  # nobody waits for nothing
            self.ready.set()

    def wait(self, timeout: float | None = None) -> bool:
        """True when built (or failed: then `error` says why)."""
        return self.ready.wait(timeout)
