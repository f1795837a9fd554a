"""The intervention results (`moelab intervene` JSON, `moelab diff` JSON) as report sections
(`moelab analyze ... --interventions FILE`).

Each function takes the result dict as written and returns a matplotlib Figure on its own Agg canvas (no
pyplot), or None when the result holds nothing to draw. No statistics are computed here.
"""

from __future__ import annotations

from typing import Any, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from moelab.report.headline import fmt
from moelab.report.html import FigureBlock, Note, Section, Table


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


# ---- the report's sections --------------------------------------------------------------------------

def read_intervention(path: str) -> tuple[str, dict]:
    """("intervene" | "diff", the JSON) of a `moelab intervene` or `moelab diff` result file; one line
    naming the file when it is neither."""
    import json

    from moelab.config import MoelabError

    try:
        with open(path, encoding="utf-8") as f:  # closed at once: a report reads many of these
            data = json.loads(f.read())
    except FileNotFoundError:
        raise MoelabError(f"intervention results not found: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MoelabError(f"{path} is not a JSON file: {e}") from None
    if isinstance(data, dict) and isinstance(data.get("layers"), list) and "any_layer_differs" in data:
        return "diff", data
    if isinstance(data, dict) and any(k in data for k in ("ablation", "topk", "capacity", "replay", "pruning")):
        return "intervene", data
    raise MoelabError(f"{path} is neither a `moelab intervene` result (intervene.json) nor a `moelab diff` result")


def diff_section(path: str, diff: dict) -> Section:
    keys = ("top1_agreement", "jaccard", "jaccard_chance", "jaccard_permuted", "set_differs")
    rows = [[x["layer"], *(fmt(x.get(k), ".3f") for k in keys)] for x in diff["layers"]]
    blocks: list[Any] = [Table(
        ["layer", "top-1 agreement", "top-k Jaccard", "chance (n^2/E)/(2n - n^2/E)", "tokens paired at random",
         "tokens whose set differs"], rows,
        f"{diff['trace_a']} vs {diff['trace_b']}, {diff['tokens']} tokens; "
        f"{diff['any_layer_differs']:.1%} of tokens are routed differently in at least one layer. Two baselines: "
        "the formula for n of E chosen uniformly, and the same Jaccard after pairing tokens at random (keeps "
        "each trace's expert load).")]
    fig = flips_vs_margin(diff)
    if fig is not None:
        blocks.append(FigureBlock(fig, "Share of tokens whose top-k set differs, by trace A's router margin "
                                       "p_k - p_k+1: flips concentrated at small margins are near-ties, not a "
                                       "different routing rule."))
    elif diff.get("margin_note"):
        blocks.append(Note(diff["margin_note"]))
    return Section(f"Trace diff: {path}", "Do two traces of the same tokens route them the same way?", blocks)


def intervene_section(path: str, result: dict) -> Section:
    blocks: list[Any] = []
    fig = ablation_effects(result)
    if fig is not None:
        blocks.append(FigureBlock(fig, "Loss change (nats per token) from removing each expert set from "
                                       "selection, with its 95% bootstrap interval over sequences; the null is "
                                       "no change (sign-flip test on per-sequence means), and filled markers pass "
                                       "Holm's correction at 0.05 across every ablation of the run."))
    fig = pruning_and_topk(result)
    if fig is not None:
        blocks.append(FigureBlock(fig, "Left: held-out loss as the lowest-scoring experts of each layer are "
                                       "removed; right: loss for k experts per token (the model's own k gives "
                                       "its own loss exactly)."))
    if not blocks:
        blocks.append(Note("This result holds no ablation, pruning or top-k sweep to draw (see the JSON)."))
    return Section(f"Interventions: {path}", "What removing or re-routing experts does to the loss "
                   "(`moelab intervene`, docs/INTERVENE.md).", blocks)


def intervention_sections(paths: Sequence[str]) -> tuple[list[Section], dict[str, Any]]:
    """The report sections and the metrics.json entry ({path: result}) of intervention result files."""
    sections, metrics = [], {}
    for path in paths:
        kind, data = read_intervention(str(path))
        sections.append(diff_section(str(path), data) if kind == "diff" else intervene_section(str(path), data))
        metrics[str(path)] = {"kind": kind, **data}
    return sections, metrics
