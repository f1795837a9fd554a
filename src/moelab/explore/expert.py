"""What one expert of one layer takes: its load by domain, language and position bucket against a null,
its most frequent and highest-lift tokens (with contexts), and the experts chosen beside it.

Counts are choices before dropping, all ranks (docs/TRACE.md's convention). The null for a group's
share keeps the expert's load: if labels were shuffled over the layer's rows, a group of n rows would
give the expert its overall share p = c_e / N on average, with the hypergeometric spread
sqrt(p (1 - p) (N - n) / ((N - 1) n)); the page shows p and that 95% band beside each observed share.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from moelab.explore.summary import GROUPING_IDS

MIN_TOKEN_COUNT = 10  # lift is only ranked for token ids with this many rows at the layer
TOP_TOKENS = 15
CONTEXTS_PER_TOKEN = 2
CONTEXT_RADIUS = 6


def bucket_label(b: int) -> str:
    return f"pos {4 ** b - 1}-{4 ** (b + 1) - 2}"


def share_interval(share: float, n: int, kk: float, kn: float, nn: float, seqs: int) -> tuple:
    """95% interval of a share k/n over sequences: the ratio estimator's sequence-clustered standard error,
    sqrt(S / (S - 1) * sum_s (k_s - share n_s)^2) / n, from the sums of k_s^2, k_s n_s and n_s^2."""
    if seqs < 2 or not n:  # one sequence: no spread to measure
        return None, None
    ss = max(0.0, kk - 2 * share * kn + share * share * nn)
    se = math.sqrt(seqs / (seqs - 1) * ss) / n
    return max(0.0, share - 1.96 * se), min(1.0, share + 1.96 * se)


def share_rows(counts: dict[Any, tuple[int, int]], total_e: int, total: int,
               clusters: dict[Any, tuple] | None = None) -> list[dict[str, Any]]:
    """Group -> (rows, rows choosing e) -> observed share with its interval over sequences (`clusters`:
    group -> (kk, kn, nn, seqs)), null share and its 95% band, lift = obs / null."""
    p = total_e / total if total else 0.0
    out = []
    for group, (n, k) in counts.items():
        sd = math.sqrt(p * (1 - p) * (total - n) / ((total - 1) * n)) if n and total > 1 else 0.0
        share = k / n if n else 0.0
        lo, hi = share_interval(share, n, *clusters[group]) if clusters and group in clusters else (None, None)
        out.append({"group": group, "rows": n, "count": k, "share": share, "share_lo": lo, "share_hi": hi,
                    "null": p,
                    "null_lo": max(0.0, p - 1.96 * sd), "null_hi": min(1.0, p + 1.96 * sd),
                    "lift": share / p if p else None, "outside": abs(share - p) > 1.96 * sd})
    return sorted(out, key=lambda r: -r["rows"])


@dataclasses.dataclass
class LayerCounts:
    """What an expert view needs of one (layer, expert), as plain counts: from the summary tables
    (`from_summary`) or from one scan of the layer's rows (`direct`); `view` turns either into the answer.

    cells: (domain, lang, bucket) -> (rows, rows choosing e); sums: label -> value -> (sum k_s^2,
    sum k_s n_s, sum n_s^2, sequences); tokens: token sent to e -> (rows, rows choosing e); token_rows:
    the layer's rows with a token id; load: expert -> rows; pairs: expert j -> (token, layer) groups
    holding e and j (counted over pairs of ranks)."""

    cells: dict[tuple, tuple[int, int]]
    sums: dict[str, dict[Any, tuple]]
    tokens: dict[int, tuple[int, int]]
    token_rows: int
    load: dict[int, int]
    pairs: dict[int, int]


def from_summary(cur, tables: dict[str, str], pairs_LEE, layer: int, expert: int) -> LayerCounts:
    cur.execute(f"""SELECT domain, lang, bucket, sum(n), coalesce(sum(n) FILTER (WHERE expert = ?), 0)
                    FROM {tables['labels']} WHERE layer = ? GROUP BY ALL""", [expert, layer])
    cells = {(d, g, int(b)): (int(n), int(k)) for d, g, b, n, k in cur.fetchall()}
    cur.execute(f"""SELECT t.gid, t.g, coalesce(c.kk, 0), coalesce(c.kn, 0), t.nn, t.seqs
                    FROM {tables['cluster_totals']} t LEFT JOIN {tables['clusters']} c
                    ON c.layer = t.layer AND c.gid = t.gid AND c.g = t.g AND c.expert = ?
                    WHERE t.layer = ?""", [expert, layer])
    sums: dict[str, dict[Any, tuple]] = {}
    for gid, g, kk, kn, nn, seqs in cur.fetchall():
        dim = GROUPING_IDS[gid]
        sums.setdefault(dim, {})[int(g) if dim == "bucket" else g] = (int(kk), int(kn), int(nn), int(seqs))
    cur.execute(f"SELECT coalesce(sum(n), 0) FROM {tables['tokens']} WHERE layer = ?", [layer])
    token_rows = int(cur.fetchone()[0])
    cur.execute(f"""WITH hit AS (SELECT token, n AS k FROM {tables['tokens']} WHERE layer = ? AND expert = ?)
                    SELECT hit.token, sum(t.n), any_value(hit.k) FROM hit JOIN {tables['tokens']} t
                    ON t.token = hit.token AND t.layer = ? GROUP BY hit.token""", [layer, expert, layer])
    tokens = {int(t): (int(n), int(k)) for t, n, k in cur.fetchall() if k}
    load = expert_load(cur, tables["labels"], layer)
    pairs = {j: int(pairs_LEE[layer, expert, j]) for j in range(pairs_LEE.shape[2]) if pairs_LEE[layer, expert, j]}
    return LayerCounts(cells, sums, tokens, token_rows, load, pairs)


# One scan of the layer's rows: every grouping the view needs, each with its rows and the expert's rows.
DIRECT_SETS = {"cell": "(domain, lang, bucket)", "token": "(token)", "domain": "(seq, domain)",
               "lang": "(seq, lang)", "bucket": "(seq, bucket)", "load": "(expert)"}


def direct(cur, src: str, layer: int, expert: int) -> LayerCounts:
    """The counts of one (layer, expert) from the trace itself, while the whole-trace summaries are being
    built: one scan of the layer's rows (GROUPING SETS) and one for the co-chosen experts. The same numbers
    as `from_summary`, counted from the same rows."""
    from moelab.explore.summary import BUCKET_SQL

    cols = "seq, domain, lang, bucket, token, expert"
    cur.execute(f"""SELECT GROUPING({cols}) AS gid, {cols}, count(*), count(*) FILTER (WHERE expert = ?)
                    FROM (SELECT seq, domain, lang, {BUCKET_SQL} AS bucket, token, expert FROM {src}
                          WHERE layer = ?)
                    GROUP BY GROUPING SETS ({', '.join(DIRECT_SETS.values())})""", [expert, layer])
    # GROUPING(...) bit i (from the left, of 6) is set when column i is not grouped
    gid_of = {name: sum(1 << (5 - i) for i, c in enumerate(cols.split(", ")) if c not in sets)
              for name, sets in DIRECT_SETS.items()}
    kind = {v: k for k, v in gid_of.items()}
    counts = LayerCounts({}, {}, {}, 0, {}, {})
    for gid, seq, domain, lang, bucket, token, e, n, k in cur.fetchall():
        what, n, k = kind[gid], int(n), int(k)
        if what == "cell":
            counts.cells[(domain, lang, int(bucket))] = (n, k)
        elif what == "token":
            if token is not None:  # as the summary's tokens table: rows with a token id only
                counts.token_rows += n
                if k:
                    counts.tokens[int(token)] = (n, k)
        elif what == "load":
            counts.load[int(e)] = n
        else:
            g = int(bucket) if what == "bucket" else {"domain": domain, "lang": lang}[what]
            kk, kn, nn, seqs = counts.sums.setdefault(what, {}).get(g, (0, 0, 0, 0))
            counts.sums[what][g] = (kk + k * k, kn + k * n, nn + n * n, seqs + 1)
    cur.execute(f"""SELECT expert, count(*) FROM (SELECT seq, pos, rank, expert FROM {src} WHERE layer = ?) b
                    SEMI JOIN (SELECT seq, pos, rank FROM {src} WHERE layer = ? AND expert = ?) a
                    ON a.seq = b.seq AND a.pos = b.pos AND a.rank <> b.rank GROUP BY expert""",
                [layer, layer, expert])
    counts.pairs = {int(j): int(n) for j, n in cur.fetchall()}
    return counts


def label_counts(c: LayerCounts) -> dict[str, Any]:
    """Rows and rows choosing the expert by domain, lang and position bucket, each against its null."""
    total = sum(n for n, _ in c.cells.values())
    total_e = sum(k for _, k in c.cells.values())
    views = {}
    for name, i, dim in (("domain", 0, "domain"), ("lang", 1, "lang"), ("position", 2, "bucket")):
        counts: dict[Any, list[int]] = {}
        for key in sorted(c.cells, key=str):  # one order whatever the source: ties in rows sort alike
            acc = counts.setdefault(key[i], [0, 0])
            acc[0] += c.cells[key][0]
            acc[1] += c.cells[key][1]
        rows = share_rows({g: tuple(v) for g, v in counts.items()}, total_e, total, c.sums.get(dim, {}))
        if name == "position":
            rows = sorted(rows, key=lambda r: r["group"])
            for r in rows:
                r["group"] = bucket_label(int(r["group"]))
        views[name] = rows
    return {"rows": total, "count": total_e, "share": total_e / total if total else 0.0, "by": views}


def token_stats(c: LayerCounts, top_k: int = 1) -> dict[str, list[dict[str, Any]]]:
    """Most frequent token ids sent to the expert, and those with the highest lift P(e | v) / P(e).

    `share` is the fraction of the token's occurrences whose top-k holds the expert: each occurrence has
    top_k rows and picks an expert at most once, so it is count / (rows / top_k), 1.0 for a token always
    sent there (count / rows would read 1/K)."""
    total, total_e = c.token_rows, sum(k for _, k in c.tokens.values())
    p = total_e / total if total else 0.0
    stats = [{"token": t, "rows": n, "count": k, "occurrences": n // top_k, "share": k * top_k / n,
              "lift": (k / n) / p if p else None} for t, (n, k) in c.tokens.items() if k]
    frequent = sorted(stats, key=lambda r: (-r["count"], r["token"]))[:TOP_TOKENS]
    lifted = sorted((r for r in stats if r["rows"] >= MIN_TOKEN_COUNT),
                    key=lambda r: (-r["lift"], -r["count"], r["token"]))[:TOP_TOKENS]
    return {"frequent": frequent, "lift": lifted}


def contexts(cur, src: str, layer: int, expert: int, tokens: list[int]) -> dict[int, list[dict[str, Any]]]:
    """The first places (in trace order) where each token went to the expert, with the token ids around
    them and the document and position, so the page can open the place. Trace order, not whichever rows
    a parallel scan meets first: one answer, whichever counts the view comes from. One scan for them all."""
    if not tokens:
        return {}
    marks = ", ".join("?" for _ in tokens)
    cur.execute(f"""SELECT token, seq, pos FROM (
                        SELECT token, seq, pos, row_number() OVER (PARTITION BY token ORDER BY seq, pos) AS r
                        FROM {src} WHERE layer = ? AND expert = ? AND token IN ({marks}))
                    WHERE r <= ? ORDER BY seq, pos""", [layer, expert, *tokens, CONTEXTS_PER_TOKEN])
    hits = cur.fetchall()
    out: dict[int, list[dict[str, Any]]] = {int(t): [] for t in tokens if any(h[0] == t for h in hits)}
    for t in tokens:
        for tok, s, p in (h for h in hits if h[0] == t):
            cur.execute(f"""SELECT pos, token, doc, doc_pos FROM {src} WHERE seq = ? AND layer = 0 AND rank = 0
                            AND pos BETWEEN ? AND ? ORDER BY pos""", [s, p - CONTEXT_RADIUS, p + CONTEXT_RADIUS])
            window = cur.fetchall()
            at = [q for q, *_ in window].index(p)
            out[int(t)].append({"seq": int(s), "pos": int(p), "doc": int(window[at][2]),
                                "doc_pos": int(window[at][3]), "ids": [w[1] for w in window], "at": at})
    return out


def coactivation(c: LayerCounts, expert: int, top_k: int) -> list[dict[str, Any]]:
    """Experts chosen in the same (token, layer) as `expert`, against a null that keeps every load:
    expected = tokens choosing e x (K - 1) x c_j / (all choices - c_e)."""
    if top_k < 2:
        return []
    load_E = c.load
    tokens_e = load_E.get(expert, 0)
    others = sum(load_E.values()) - tokens_e
    out = []
    for j, load_j in load_E.items():
        if j == expert:
            continue
        expected = tokens_e * (top_k - 1) * load_j / others if others else 0.0
        seen = c.pairs.get(j, 0)
        out.append({"expert": int(j), "count": seen, "expected": expected,
                    "ratio": seen / expected if expected else None})
    return sorted(out, key=lambda r: (-(r["ratio"] or 0), r["expert"]))


def expert_load(cur, labels: str, layer: int) -> dict[int, int]:
    cur.execute(f"SELECT expert, sum(n) FROM {labels} WHERE layer = ? GROUP BY expert", [layer])
    return {int(e): int(n) for e, n in cur.fetchall()}
