"""Two traces of the same tokens (two checkpoints, two capacity factors): where did the route change?

Per token and layer: the top-1 expert and the top-k set in each trace, and each trace's router margin
(probability of its top-1 minus that of its second choice; how near the router was to choosing
otherwise). A token's route "changed" at a layer when its top-k set, its first choice, or which of its
choices were dropped (capacity) differs; `set_changed`, `top1_changed` and `drop_changed` say which.
Pure functions over `queries.doc_routes` results.
"""

from __future__ import annotations

from typing import Any

from moelab.config import MoelabError


def margin(probs_K: list[float | None]) -> float | None:
    """prob(rank 0) - prob(rank 1): None without probabilities or with top-1 routing."""
    if len(probs_K) < 2 or probs_K[0] is None or probs_K[1] is None:
        return None
    return probs_K[0] - probs_K[1]


def diff_routes(a: dict[str, Any], b: dict[str, Any], num_layers: int) -> dict[str, Any]:
    """Token-by-token comparison of one document's routes in trace a and trace b."""
    ta, tb = a["tokens"], b["tokens"]
    if [(t["seq"], t["pos"]) for t in ta] != [(t["seq"], t["pos"]) for t in tb]:
        raise MoelabError("the two traces do not hold the same token positions for this document")
    if any(x["token"] != y["token"] for x, y in zip(ta, tb)):
        raise MoelabError("the two traces hold different token ids for this document: not the same tokens")
    tokens, changed_L, top1_L, drop_L = [], [0] * num_layers, [0] * num_layers, [0] * num_layers
    for x, y in zip(ta, tb):
        layers = []
        for l in range(num_layers):
            ea, eb = x["experts"][l], y["experts"][l]
            set_changed = set(ea) != set(eb)
            top1 = ea[0] != eb[0]
            drops = _dropped(ea, x, l) != _dropped(eb, y, l)
            changed = set_changed or top1 or drops
            changed_L[l] += changed
            top1_L[l] += top1
            drop_L[l] += drops
            layers.append({"a": ea, "b": eb, "changed": changed, "set_changed": set_changed,
                           "top1_changed": top1, "drop_changed": drops,
                           "dropped_a": _dropped(ea, x, l), "dropped_b": _dropped(eb, y, l),
                           "margin_a": margin(x["probs"][l]), "margin_b": margin(y["probs"][l])})
        tokens.append({"seq": x["seq"], "pos": x["pos"], "token": x["token"], "layers": layers})
    n = len(tokens)
    summary = [{"layer": l, "changed": changed_L[l], "top1_changed": top1_L[l], "drop_changed": drop_L[l],
                "share": changed_L[l] / n if n else 0.0} for l in range(num_layers)]
    return {"doc": a["doc"], "tokens": tokens, "summary": summary,
            "truncated": a.get("truncated", False) or b.get("truncated", False)}


def _dropped(experts_K: list, token: dict[str, Any], layer: int) -> list:
    """The experts whose choice was dropped, sorted: the same expert dropped in both traces is no change
    even when its rank differs."""
    flags = (token.get("dropped") or [[]] * (layer + 1))[layer] or []
    return sorted(e for e, d in zip(experts_K, flags) if d)
