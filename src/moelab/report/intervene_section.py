"""Figures for the intervention results (`moelab intervene` JSON, `moelab diff` JSON), for the report to hook in.

Each function takes the result dict as written and returns a matplotlib Figure on its own Agg canvas (no
pyplot), or None when the result holds nothing to draw. No statistics are computed here.
"""

from __future__ import annotations

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def _figure(width: float = 10.0, height: float = 3.2) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def flips_vs_margin(diff: dict) -> Figure | None:
    """Share of tokens whose top-k set differs, per bucket of trace A's margin p_k - p_{k+1}, one line per layer."""
    layers = [x for x in diff["layers"] if x.get("flips_by_margin")]
    if not layers:
        return None
    fig = _figure()
    ax = fig.add_subplot()
    for x in layers:
        buckets = list(x["flips_by_margin"].items())
        ax.plot(range(len(buckets)), [v["flip_rate"] for _, v in buckets], marker="o", label=f"layer {x['layer']}")
        ax.set_xticks(range(len(buckets)), [k for k, _ in buckets], fontsize=8)
    ax.set_xlabel("router margin p_k - p_k+1 (trace A)")
    ax.set_ylabel("share of tokens routed differently")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=8)
    return fig


def ablation_effects(result: dict) -> Figure | None:
    """Loss change of each ablation with its 95% interval; filled markers pass Holm at 0.05."""
    rows = result.get("ablation") or []
    if not rows:
        return None
    fig = _figure(height=3.0)
    ax = fig.add_subplot()
    for i, r in enumerate(rows):
        a = r["all"]
        if a["lo"] is None or a["hi"] is None:
            continue
        ax.errorbar([i], [a["mean"]], yerr=[[a["mean"] - a["lo"]], [a["hi"] - a["mean"]]], fmt="o",
                    color="C0", mfc="C0" if a.get("p_holm", 1.0) < 0.05 else "white")
    ax.axhline(0.0, color="0.5", lw=0.8)
    ax.set_xticks(range(len(rows)), [f"{r['block']}:{','.join(map(str, r['experts']))}" for r in rows],
                  rotation=90, fontsize=7)
    ax.set_ylabel("loss change (nats/token)")
    return fig


def pruning_and_topk(result: dict) -> Figure | None:
    """Loss vs experts removed per layer (pruning), and loss vs k (top-k sweep), side by side."""
    curve = (result.get("pruning") or {}).get("curve")
    topk = {k: v for k, v in (result.get("topk") or {}).items() if k.startswith("k=")}
    if not curve and not topk:
        return None
    fig = _figure()
    if curve:
        ax = fig.add_subplot(1, 2, 1)
        ax.plot([c["removed_per_layer"] for c in curve], [c["loss"] for c in curve], marker="o")
        ax.set_xlabel(f"experts removed per layer (by {result['pruning']['by']})")
        ax.set_ylabel("loss")
    if topk:
        ax = fig.add_subplot(1, 2, 2)
        ks = [int(k[2:]) for k in topk]
        ax.plot(ks, [v["loss"]["all"]["mean"] for v in topk.values()], marker="o")
        ax.set_xlabel("experts per token k")
        ax.set_ylabel("loss")
    return fig
