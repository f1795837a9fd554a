"""Whether a trace's `rank` column is the router's ranking (rank 0 = the top-1 choice).

moelab's own traces and the Hugging Face capture order each token's experts by router score, as do
OLMoE's routing files (by logit) and engines' replay arrays (top-k order). Megatron-LM's RouterTracer
does not: it writes `routing_map.nonzero()`, ascending expert id, so the first id is the real top-1 only
by chance (46% of token-layers in a hand-written file). Its imports say so in the metadata,
`extra["rank_order"] = "unknown"` (trace/formats/routed.py).

Rank-dependent analyses read rank 0 as the top-1 choice: top-1 agreement (early routing, `moelab diff`),
top-1 transitions between layers (co-activation), the expert-label MI over top-1 choices (specialisation,
`mi_ranks="top1"`) and OpenMoE's queue order (rank-0 choices first) in drop re-simulation. On such a trace
they refuse, or leave that part out and say why; the rank-independent rest (load, co-activation within a
layer, shares over all of a token's experts) is unaffected.
"""

from __future__ import annotations

from typing import Any

from moelab.config import MoelabError

UNKNOWN = "unknown"
WHY = ("its rank order is unknown: rank 0 is not the router's top-1 choice (Megatron-LM's RouterTracer "
       "lists each token's experts by ascending id)")


def rank_order_known(meta: Any) -> bool:
    """False only for a trace whose metadata says its ranks are not the router's order."""
    extra = getattr(meta, "extra", None) or {}
    return extra.get("rank_order") != UNKNOWN


def require_rank_order(trace_like: Any, what: str) -> None:
    """Refuse, in one line, a rank-dependent analysis (`what`) of a trace whose ranks mean nothing."""
    if not rank_order_known(getattr(trace_like, "meta", None)):
        where = getattr(trace_like, "path", None)
        raise MoelabError(f"{what} reads rank 0 as the top-1 choice, but trace {where or '(given)'}: {WHY}")


def unranked_note() -> str:
    """What `analyze_all` reports (results["skipped"]["rank"]) for a trace of unknown rank order."""
    return (f"No top-1 transitions, no top-1 label MI (computed over all of a token's experts instead) and no "
            f"drop re-simulation (its queue puts rank-0 choices first): the trace's {WHY[4:]}.")


def drop_top1_parts(results: dict[str, Any]) -> None:
    """Blank the co-activation's top-1 transitions, computed on ranks that are not the router's order."""
    co = results.get("coactivation")
    if co is not None:
        for name in ("transitions", "transition_p", "transition_null", "transition_mi", "transition_null_mi"):
            setattr(co, name, None)
