"""Trace diff: how two traces of the same tokens route differently (two checkpoints, fp32 vs bf16, moelab vs
transformers, before and after fine-tuning).

Legend: N tokens, L MoE layers, K experts per token, E experts.
Per layer: top-1 agreement; top-k set Jaccard pooled over tokens (sum |A & B| / sum |A | B|) beside two
baselines: the formula for n of E chosen uniformly at random, (n^2/E) / (2n - n^2/E), and the same pooled
Jaccard after pairing each token of A with a random token of B (keeps each trace's expert load); the share
of tokens whose set differs; flips (set differs) by A's router margin p_k - p_{k+1}, by domain and by position.
"""

from __future__ import annotations

import numpy as np

from moelab.analysis.rankorder import WHY, rank_order_known
from moelab.config import MoelabError
from moelab.trace.io import open_trace

MARGIN_EDGES = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0 + 1e-9)
POS_EDGES = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 1 << 62)


def read_routes(path) -> dict:
    """A trace's routing per token: ids [N, L, K], (seq, pos), domain codes and names, tokens, and A's router
    margin p_k - p_{k+1} per layer [N, L] where the trace holds probabilities. Streamed: each batch is cut
    down to per-token arrays as it is read (a token split by a batch boundary waits for the next), so the
    row columns and the [N, L, E] probabilities are never held whole (20 GiB for a 100M-row trace)."""
    trace = open_trace(path)
    L, K, E = trace.meta.num_layers, trace.meta.top_k, trace.meta.num_experts
    LK = L * K
    with_probs = "probs" in trace.columns and len({*E}) == 1
    cols = ["seq", "pos", "layer", "rank", "expert", "domain"] + [c for c in ("token",) if c in trace.columns]
    checked = [c for c in ("weight",) if c in trace.columns]  # read only to be validated (no NaN)
    ids_dtype = np.int16 if max(E) <= np.iinfo(np.int16).max else np.int32
    parts: dict[str, list] = {k: [] for k in ("ids", "seq", "pos", "domain", "token", "margin")}
    carry: dict[str, np.ndarray] | None = None
    names: list = []
    layer_LK = np.repeat(np.arange(L), K)
    for batch in trace.iter_batches(columns=cols + checked + (["probs"] if with_probs else [])):
        names = list(batch["domain.names"])
        rows = {c: batch[c] for c in cols}
        if with_probs:  # one probability row per (token, layer): its rank-0 row's
            rows["probs"] = batch["probs"]
        if carry is not None:
            rows = {c: np.concatenate([carry[c], rows[c]]) for c in rows}
        n = len(rows["seq"]) // LK
        cut = {c: n * L if c == "probs" else n * LK for c in rows}  # the whole tokens; the rest waits
        done, carry = {c: v[: cut[c]] for c, v in rows.items()}, {c: v[cut[c]:] for c, v in rows.items()}
        if not np.array_equal(done["layer"], np.tile(layer_LK, n)) or (with_probs and len(done["probs"]) < n * L):
            raise _not_diffable(path)
        first = slice(None, None, LK)
        parts["ids"].append(done["expert"].reshape(n, L, K).astype(ids_dtype))
        for c in ("seq", "pos", "domain", "token"):
            if c in done:
                parts[c].append(done[c][first])
        if with_probs:
            probs_NLE = done["probs"].reshape(n, L, E[0])
            parts["margin"].append(np.stack([margin_kk1(probs_NLE[:, l], K) for l in range(L)], axis=1))
    if carry is not None and (len(carry["seq"]) or len(carry.get("probs", ()))):
        raise _not_diffable(path)
    joined = {k: np.concatenate(v) if v else None for k, v in parts.items()}  # open_trace refuses 0 rows
    return {"path": str(path), "L": L, "K": K, "E": E, "names": names, "ids": joined["ids"], "seq": joined["seq"],
            "pos": joined["pos"], "domain": joined["domain"], "token": joined["token"], "margin": joined["margin"],
            "ranked": rank_order_known(trace.meta)}


def _not_diffable(path) -> MoelabError:
    return MoelabError(f"trace {path} does not hold every layer for every token in (seq, pos, layer, rank) "
                       f"order: it cannot be diffed")


def check_same(a: dict, b: dict) -> None:
    if a["L"] != b["L"]:
        raise MoelabError(f"traces have {a['L']} and {b['L']} MoE layers: they come from different models")
    if list(a["E"]) != list(b["E"]):
        raise MoelabError(f"traces have {a['E']} and {b['E']} experts per layer: they come from different models")
    same = (len(a["seq"]) == len(b["seq"]) and np.array_equal(a["seq"], b["seq"])
            and np.array_equal(a["pos"], b["pos"]))
    if same and a["token"] is not None and b["token"] is not None:
        same = np.array_equal(a["token"], b["token"])
    if not same:
        raise MoelabError(f"traces {a['path']} and {b['path']} are not of the same tokens "
                          f"({len(a['seq'])} and {len(b['seq'])} tokens, or other sequences, positions or ids)")


def chance_jaccard(n: int, E: int) -> float:
    """Expected |A & B| / expected |A | B| for two uniformly random n-subsets of E."""
    inter = n * n / E
    return inter / (2 * n - inter)


def set_overlap(ids_a_NK: np.ndarray, ids_b_NK: np.ndarray, E: int) -> tuple[np.ndarray, np.ndarray]:
    """Per token |A & B| and |A | B| of the two expert sets."""
    onehot_a = np.zeros((len(ids_a_NK), E), bool)
    onehot_b = np.zeros((len(ids_b_NK), E), bool)
    np.put_along_axis(onehot_a, ids_a_NK, True, axis=1)
    np.put_along_axis(onehot_b, ids_b_NK, True, axis=1)
    return (onehot_a & onehot_b).sum(1), (onehot_a | onehot_b).sum(1)


def margin_kk1(probs_NE: np.ndarray, k: int) -> np.ndarray:
    """p_k - p_{k+1}: the router's gap between the last chosen and the first unchosen expert."""
    top = -np.sort(-probs_NE, axis=1)[:, : k + 1]
    return top[:, k - 1] - top[:, k]


def _rates(keys_N: np.ndarray, flips_N: np.ndarray, labels) -> dict:
    out = {}
    for i, label in enumerate(labels):
        m = keys_N == i
        if m.any():
            out[label] = {"flip_rate": float(flips_N[m].mean()), "tokens": int(m.sum())}
    return out


def _bucket_labels(edges) -> list[str]:
    return [f"[{lo:g}, {hi:g})" if hi < 1 << 61 else f">= {lo:g}" for lo, hi in zip(edges[:-1], edges[1:])]


def diff_routes(a: dict, b: dict, seed: int = 0) -> dict:
    check_same(a, b)
    K = min(a["K"], b["K"])
    rng = np.random.default_rng(seed)
    layers, differs_NL = [], []
    for l in range(a["L"]):
        E = a["E"][l]
        ids_a, ids_b = a["ids"][:, l], b["ids"][:, l]
        inter, union = set_overlap(ids_a, ids_b, E)
        perm_inter, perm_union = set_overlap(ids_a, ids_b[rng.permutation(len(ids_b))], E)
        flips = inter < union
        differs_NL.append(flips)
        ranked = a.get("ranked", True) and b.get("ranked", True)  # rank 0 is each trace's top-1 choice
        row = {"layer": l, "top1_agreement": float(np.mean(ids_a[:, 0] == ids_b[:, 0])) if ranked else None,
               "jaccard": float(inter.sum() / union.sum()),
               "jaccard_chance": chance_jaccard(K, E) if a["K"] == b["K"] else None,
               "jaccard_permuted": float(perm_inter.sum() / perm_union.sum()),
               "set_differs": float(flips.mean())}
        if a["margin"] is not None and K < E:
            bucket = np.digitize(a["margin"][:, l], MARGIN_EDGES[1:-1])
            row["flips_by_margin"] = _rates(bucket, flips, _bucket_labels(MARGIN_EDGES))
        layers.append(row)
    flips_NL = np.stack(differs_NL, axis=1)
    any_N = flips_NL.any(1)
    pos_bucket = np.digitize(a["pos"], POS_EDGES[1:-1])
    return {"trace_a": a["path"], "trace_b": b["path"], "tokens": len(any_N), "layers": layers,
            "any_layer_differs": float(any_N.mean()),
            "by_domain": _rates(a["domain"], flips_NL.mean(1), a["names"]),
            "by_position": _rates(pos_bucket, flips_NL.mean(1), _bucket_labels(POS_EDGES)),
            "margin_note": None if a["margin"] is not None else "trace A has no router probabilities: no margins",
            "rank_note": None if a.get("ranked", True) and b.get("ranked", True) else f"top-1 agreement left out: a trace's {WHY[4:]}"}


def diff_traces(path_a, path_b) -> dict:
    return diff_routes(read_routes(path_a), read_routes(path_b))


def format_diff(r: dict) -> str:
    lines = [f"{r['tokens']:,} tokens; route differs in at least one layer: {r['any_layer_differs']:.4f}",
             f"{'layer':>5}{'top1 agree':>12}{'jaccard':>9}{'chance':>8}{'permuted':>10}{'differs':>9}"]
    for x in r["layers"]:
        chance = "-" if x["jaccard_chance"] is None else f"{x['jaccard_chance']:.4f}"
        top1 = "-" if x["top1_agreement"] is None else f"{x['top1_agreement']:.4f}"
        lines.append(f"{x['layer']:>5}{top1:>12}{x['jaccard']:>9.4f}{chance:>8}"
                     f"{x['jaccard_permuted']:>10.4f}{x['set_differs']:>9.4f}")
    for x in r["layers"]:
        if "flips_by_margin" in x:
            cells = "  ".join(f"{k}: {v['flip_rate']:.3f} (n={v['tokens']})" for k, v in x["flips_by_margin"].items())
            lines.append(f"layer {x['layer']} flips by margin p_k - p_k+1: {cells}")
    if r.get("rank_note"):
        lines.append(r["rank_note"])
    return "\n".join(lines)
