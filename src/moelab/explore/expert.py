"""What one expert of one layer takes: its load by domain, language and position bucket against a null,
its most frequent and highest-lift tokens (with contexts), and the experts chosen beside it.

Counts are choices before dropping, all ranks (docs/TRACE.md's convention). The null for a group's
share keeps the expert's load: if labels were shuffled over the layer's rows, a group of n rows would
give the expert its overall share p = c_e / N on average, with the hypergeometric spread
sqrt(p (1 - p) (N - n) / ((N - 1) n)); the page shows p and that 95% band beside each observed share.
"""

from __future__ import annotations

import math
from typing import Any

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


def cluster_sums(cur, tables: dict[str, str], layer: int, expert: int) -> dict[str, dict[str, tuple]]:
    """label -> value -> (sum k_s^2, sum k_s n_s, sum n_s^2, sequences) for this expert at this layer."""
    from moelab.explore.summary import GROUPING_IDS

    cur.execute(f"""SELECT t.gid, t.g, coalesce(c.kk, 0), coalesce(c.kn, 0), t.nn, t.seqs
                    FROM {tables['cluster_totals']} t LEFT JOIN {tables['clusters']} c
                    ON c.layer = t.layer AND c.gid = t.gid AND c.g = t.g AND c.expert = ?
                    WHERE t.layer = ?""", [expert, layer])
    out: dict[str, dict[str, tuple]] = {}
    for gid, g, kk, kn, nn, seqs in cur.fetchall():
        out.setdefault(GROUPING_IDS[gid], {})[g] = (float(kk), float(kn), float(nn), int(seqs))
    return out


def label_counts(cur, tables: dict[str, str], layer: int, expert: int) -> dict[str, Any]:
    """Rows and rows choosing `expert` by domain, lang and position bucket (from the summary tables)."""
    labels = tables["labels"]
    cur.execute(f"""SELECT domain, lang, bucket, sum(n), coalesce(sum(n) FILTER (WHERE expert = ?), 0)
                    FROM {labels} WHERE layer = ? GROUP BY ALL""", [expert, layer])
    cells = cur.fetchall()
    total = sum(c[3] for c in cells)
    total_e = sum(c[4] for c in cells)
    views = {}
    sums = cluster_sums(cur, tables, layer, expert)
    for name, i, dim in (("domain", 0, "domain"), ("lang", 1, "lang"), ("position", 2, "bucket")):
        counts: dict[Any, list[int]] = {}
        for c in cells:
            acc = counts.setdefault(c[i], [0, 0])
            acc[0] += c[3]
            acc[1] += c[4]
        clusters = {(int(g) if dim == "bucket" else g): v for g, v in sums.get(dim, {}).items()}
        rows = share_rows({g: tuple(v) for g, v in counts.items()}, total_e, total, clusters)
        if name == "position":
            rows = sorted(rows, key=lambda r: r["group"])
            for r in rows:
                r["group"] = bucket_label(int(r["group"]))
        views[name] = rows
    return {"rows": total, "count": total_e, "share": total_e / total if total else 0.0, "by": views}


def token_stats(cur, tokens: str, layer: int, expert: int, top_k: int = 1) -> dict[str, list[dict[str, Any]]]:
    """Most frequent token ids sent to the expert, and those with the highest lift P(e | v) / P(e).

    `share` is the fraction of the token's occurrences whose top-k holds the expert: each occurrence has
    top_k rows and picks an expert at most once, so it is count / (rows / top_k), 1.0 for a token always
    sent there (count / rows would read 1/K)."""
    cur.execute(f"SELECT sum(n), coalesce(sum(n) FILTER (WHERE expert = ?), 0) FROM {tokens} WHERE layer = ?",
                [expert, layer])
    total, total_e = cur.fetchone()
    p = total_e / total if total else 0.0
    cur.execute(f"""WITH hit AS (SELECT token, n AS k FROM {tokens} WHERE layer = ? AND expert = ?)
                    SELECT hit.token, sum(t.n), any_value(hit.k) FROM hit JOIN {tokens} t
                    ON t.token = hit.token AND t.layer = ? GROUP BY hit.token""", [layer, expert, layer])
    rows = cur.fetchall()
    stats = [{"token": int(t), "rows": int(n), "count": int(k), "occurrences": int(n) // top_k,
              "share": k * top_k / n,
              "lift": (k / n) / p if p else None} for t, n, k in rows if k]
    frequent = sorted(stats, key=lambda r: (-r["count"], r["token"]))[:TOP_TOKENS]
    lifted = sorted((r for r in stats if r["rows"] >= MIN_TOKEN_COUNT),
                    key=lambda r: (-r["lift"], -r["count"], r["token"]))[:TOP_TOKENS]
    return {"frequent": frequent, "lift": lifted}


def contexts(cur, src: str, layer: int, expert: int, tokens: list[int]) -> dict[int, list[dict[str, Any]]]:
    """A few places where each token went to the expert, with the token ids around it. One query per
    token with a LIMIT, so DuckDB stops at the first rows it finds instead of scanning the file."""
    hits = []
    for tok in tokens:
        cur.execute(f"""SELECT seq, pos FROM {src} WHERE layer = ? AND expert = ? AND token = ? LIMIT ?""",
                    [layer, expert, tok, CONTEXTS_PER_TOKEN])
        hits += [(tok, s, p) for s, p in sorted(cur.fetchall())]
    out: dict[int, list[dict[str, Any]]] = {}
    for t, s, p in hits:
        cur.execute(f"""SELECT pos, token FROM {src} WHERE seq = ? AND layer = 0 AND rank = 0
                        AND pos BETWEEN ? AND ? ORDER BY pos""", [s, p - CONTEXT_RADIUS, p + CONTEXT_RADIUS])
        window = cur.fetchall()
        out.setdefault(int(t), []).append({"seq": s, "pos": p, "ids": [tok for _, tok in window],
                                           "at": [q for q, _ in window].index(p)})
    return out


def coactivation(pairs_LEE, load_E: dict[int, int], layer: int, expert: int, top_k: int) -> list[dict[str, Any]]:
    """Experts chosen in the same (token, layer) as `expert`, against a null that keeps every load:
    expected = tokens choosing e x (K - 1) x c_j / (all choices - c_e)."""
    if top_k < 2:
        return []
    tokens_e = load_E.get(expert, 0)
    others = sum(load_E.values()) - tokens_e
    out = []
    for j, c in load_E.items():
        if j == expert:
            continue
        expected = tokens_e * (top_k - 1) * c / others if others else 0.0
        seen = int(pairs_LEE[layer, expert, j])
        out.append({"expert": int(j), "count": seen, "expected": expected,
                    "ratio": seen / expected if expected else None})
    return sorted(out, key=lambda r: (-(r["ratio"] or 0), r["expert"]))


def expert_load(cur, labels: str, layer: int) -> dict[int, int]:
    cur.execute(f"SELECT expert, sum(n) FROM {labels} WHERE layer = ? GROUP BY expert", [layer])
    return {int(e): int(n) for e, n in cur.fetchall()}
