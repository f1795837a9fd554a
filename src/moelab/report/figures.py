"""Figures of the routing analyses: each takes plain analysis results and returns a `Figure`.

Every figure shows its null beside the value: a tick or a line (the permutation null that keeps expert
load, the queue-only drop curve, unrelated checkpoints; uniform routing in grey as a reference) or the
white of a diverging colour map (E_i(g) and P(j | i) are drawn minus their null). Error bars and shaded
bands are 95% bootstrap intervals over sequences. Layers are MoE layers, 0-based, as in the trace.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from moelab.report.plotting import (
    centred_norm, colorbar, grid, heatmap, layer_heatmaps, layers_note, legend, mask_diagonal, new_figure, null_line,
    pick_layers, style_axes,
)

MAX_GROUPS = 32  # rows of a specialisation heatmap: the most frequent groups


def specialisation_heatmap(tables: Any, *, what: str = "", bucket_size: int | None = None,
                           max_groups: int = MAX_GROUPS) -> Figure:
    """E_i(g) minus the layer's load share per layer (groups x experts) from `ShareTables`; white is the
    permutation null's expectation: a group whose choices spread like the whole layer's."""
    shown = pick_layers(len(tables.num_experts))
    data, labels = [], []
    for l in shown:
        share, n = tables.share(l), tables.tokens(l)
        load = tables.counts[l].sum(axis=0) / max(tables.counts[l].sum(), 1)
        keep = np.sort(np.argsort(-n, kind="stable")[:max_groups])
        names = tables.group_names(l)
        if bucket_size:
            names = [f"{int(v) * bucket_size}-{(int(v) + 1) * bucket_size - 1}" for v in tables.groups[l]]
        data.append(share[keep] - load[None, :])
        labels.append([names[i] for i in keep])
    rows = max(len(d) for d in data) if data else 1
    fig = new_figure(height=min(2.0 + 0.22 * rows, 7.5) * (1 + (len(shown) > 4)))
    axes = grid(fig, len(shown))
    norm = centred_norm(0.0, data, symmetric=True)
    im = None
    for i, (ax, d, l) in enumerate(zip(axes, data, shown)):
        im = heatmap(ax, d, norm, title=f"layer {l}", xlabel="expert", ylabel=(what or tables.group) if i == 0 else "",
                     yticks=labels[i])
    colorbar(fig, im, axes, "E_i(g) minus load share", {"null (the layer's load)": 0.0})
    fig.suptitle(f"Share of each {what or tables.group}'s routed choices per expert over the layer's load"
                 f"{layers_note(shown, len(tables.num_experts))}", fontsize=11)
    return fig


def specialisation_scores(vocab: Any, std_token: Any, std_position: Any) -> Figure:
    """Per layer: vocabulary specialisation (rescaled) and the std score of token IDs and positions."""
    fig = new_figure(height=3.2)
    ax1, ax2 = grid(fig, 2)
    L = np.arange(len(vocab.rescaled))
    ax1.bar(L, _nan0(vocab.rescaled), color="tab:blue", yerr=_err(vocab.estimates), capsize=3,
            label="measured (95% interval)")
    ax1.plot(L, vocab.null_rescaled, "k_", markersize=18, markeredgewidth=2, label="null: IDs shuffled")
    ax1.plot(L, vocab.uniform_rescaled, "_", color="grey", markersize=18, markeredgewidth=1.5,
             label="uniform routing (reference)")
    ax1.set_ylim(min(0.0, np.nanmin(_nan0(vocab.null_rescaled))), 1.0)
    style_axes(ax1, "Vocabulary specialisation (0 = random, 1 = perfect)", "layer", "rescaled max_e share")
    w = 0.38
    ax2.bar(L - w / 2, _nan0(std_token.mean), w, color="tab:orange", yerr=_err(std_token.estimates), capsize=2,
            label="token IDs")
    ax2.bar(L + w / 2, _nan0(std_position.mean), w, color="tab:green", yerr=_err(std_position.estimates),
            capsize=2, label="positions")
    ax2.plot(L - w / 2, std_token.null_mean, "k_", markersize=10, markeredgewidth=2, label="null: label shuffled")
    ax2.plot(L + w / 2, std_position.null_mean, "k_", markersize=10, markeredgewidth=2)
    ax2.plot(L - w / 2, std_token.uniform_mean, "_", color="grey", markersize=10, markeredgewidth=1.5,
             label="uniform routing (reference)")
    ax2.plot(L + w / 2, std_position.uniform_mean, "_", color="grey", markersize=10, markeredgewidth=1.5)
    null_line(ax2, float(np.nanmean(std_token.deterministic)), "always the same experts")
    if not np.isfinite(np.asarray(std_token.mean, float)).any():
        ax2.text(0.5, 0.5, f"no token ID seen {std_token.min_count} times:\nno token-ID score",
                 transform=ax2.transAxes, ha="center", fontsize=8, color="tab:orange")
    style_axes(ax2, "Context-independent specialisation (std of E_i(g))", "layer", "mean std over experts")
    for ax in (ax1, ax2):
        ax.set_xticks(L)
        legend(ax)
    return fig


def label_mi_bars(mis: Mapping[str, Any]) -> Figure:
    """Normalised expert-label mutual information per layer, beside its shuffled-label null."""
    fig = new_figure(height=3.0)
    ax = fig.subplots()
    names = list(mis)
    L = np.arange(len(next(iter(mis.values())).normalised)) if names else np.arange(0)
    w = 0.8 / max(2 * len(names), 1)
    for i, name in enumerate(names):
        r = mis[name]
        x = L - 0.4 + w * (2 * i + 0.5)
        ax.bar(x, _nan0(r.normalised), w, yerr=_err(r.estimates), capsize=2, label=f"{name}")
        ax.bar(x + w, _nan0(r.null_normalised), w, color="lightgrey", hatch="//",
               label="shuffled labels" if i == 0 else None)
    ax.set_xticks(L)
    style_axes(ax, "Expert-label mutual information, normalised (0 = independent, 1 = determined)",
               "layer", "MI / sqrt(H(label) H(expert))")
    legend(ax)
    return fig


def load_bars(load: Any) -> Figure:
    """Share of routed choices per expert, per layer, against the uniform 1/E."""
    shown = pick_layers(len(load.num_experts))
    fig = new_figure(height=2.6 * (1 + (len(shown) > 4)))
    axes = grid(fig, len(shown), sharey=True)
    for ax, l in zip(axes, shown):
        share = np.asarray(load.share[l])
        ax.bar(np.arange(len(share)), share, color="tab:blue")
        null_line(ax, load.uniform_share[l], "uniform 1/E")
        dead = load.dead_experts[l]
        ax.plot(dead, np.zeros(len(dead)), "rx", markersize=8, label="dead" if dead else None)
        style_axes(ax, f"layer {l}: max/mean {load.max_over_mean[l]:.2f}", "expert",
                   "share of choices" if ax is axes[0] else "")
    legend(axes[0])
    fig.suptitle(f"Expert load{layers_note(shown, len(load.num_experts))}", fontsize=11)
    return fig


def coactivation_layers(co: Any) -> list[int]:
    """Layers that have expert pairs to show (E > 1, k > 1, a null to compare with)."""
    return [l for l, (p, n) in enumerate(zip(co.p_j_given_i, co.null_p))
            if len(p) > 1 and np.isfinite(np.asarray(n, float)).any()]


def coactivation_heatmap(co: Any) -> Figure | None:
    """P(j | i) minus its null per layer (diagonal hidden); white is the null, independent draws at the
    layer's load. None when no layer has pairs (one expert, or k = 1)."""
    layers = coactivation_layers(co)
    if not layers:
        return None
    shown = [layers[i] for i in pick_layers(len(layers))]
    data = [mask_diagonal(np.asarray(co.p_j_given_i[l], float) - np.asarray(co.null_p[l], float)) for l in shown]
    fig = new_figure(height=3.0 * (1 + (len(shown) > 4)))
    axes = grid(fig, len(shown))
    norm = centred_norm(0.0, data, symmetric=True)
    im = None
    for i, (ax, d, l) in enumerate(zip(axes, data, shown)):
        e = co.strongest[l]
        im = heatmap(ax, d, norm, title=f"layer {l}: max P(j|i) {e.value:.2f}", xlabel="expert j",
                     ylabel="expert i" if i == 0 else "")
    colorbar(fig, im, axes, "P(j | i) minus null", {"null": 0.0})
    fig.suptitle(f"Co-activation P(j | i) over its load-matched null{layers_note(shown, len(co.p_j_given_i))}",
                 fontsize=11)
    return fig


def cross_layer_mi_heatmap(gates: Any) -> Figure:
    """RMoE's L x L cross-layer MI of the gate vectors, and its excess over the token-shuffled null."""
    mi, null = np.asarray(gates.cross_layer_mi, float), np.asarray(gates.cross_layer_null, float)
    fig = new_figure(height=3.6)
    ax1, ax2 = grid(fig, 2)
    finite = mi[np.isfinite(mi)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    im1 = heatmap(ax1, mi, Normalize(lo, max(hi, lo + 1e-6)), cmap="viridis",
                  title="mutual information (nats)", xlabel="layer j", ylabel="layer i")
    fig.colorbar(im1, ax=ax1, shrink=0.9).set_label("MI (nats)", fontsize=9)
    excess = mask_diagonal(mi - null)
    im2 = heatmap(ax2, excess, centred_norm(0.0, [excess], symmetric=True),
                  title="MI minus token-shuffled null (white = chance)", xlabel="layer j", ylabel="layer i")
    fig.colorbar(im2, ax=ax2, shrink=0.9).set_label("excess MI (nats)", fontsize=9)
    if len(mi) <= 8:
        for (i, j), v in np.ndenumerate(mi):
            if np.isfinite(v):  # dark text on the bright (high) end of viridis
                ax1.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                         color="black" if v > (lo + hi) / 2 else "white")
    fig.suptitle("Cross-layer mutual information of routing distributions", fontsize=11)
    return fig


def drop_curves(trained: Any, simulated: Any | None = None, queue: Any | None = None,
                simulated_queue: Any | None = None) -> Figure:
    """Dropped share of choices by position (and by turn where the trace has turns), each beside its
    queue-only baseline (the same choices re-simulated with positions shuffled within sequences)."""
    profiles = [("trained capacity", trained, "tab:red", "-")]
    if queue is not None:
        profiles.append(("queue only (trained setting)", queue, "tab:red", ":"))
    if simulated is not None:
        s = simulated.setting
        label = f"re-simulated cf {s.get('capacity_factor')} ({s.get('formula')}, {s.get('policy')})"
        profiles.append((label, simulated, "tab:purple", "--"))
    if simulated_queue is not None:
        profiles.append(("queue only (re-simulated setting)", simulated_queue, "tab:purple", ":"))
    has_turns = any(len(p.turns) for _, p, _, _ in profiles)
    fig = new_figure(height=3.2)
    axes = grid(fig, 2 if has_turns else 1)
    ax = axes[0]
    for label, p, color, style in profiles:
        x = np.asarray(p.bucket_start) + p.bucket_size / 2
        ax.plot(x, 100 * np.asarray(p.share_B, float), style, color=color, marker="o" if style != ":" else None,
                markersize=3, label=label)
        if getattr(p, "band_B", None) is not None and style != ":":
            band = 100 * np.asarray(p.band_B, float)
            ax.fill_between(x, band[0], band[1], color=color, alpha=0.15, linewidth=0)
    style_axes(ax, "Dropped share by position (dotted: what the queue alone gives)", "position in sequence",
               "dropped choices (%)")
    ax.set_ylim(bottom=0)
    legend(ax, ncol=1)
    if has_turns:
        w = 0.8 / len(profiles)
        for i, (label, p, color, _) in enumerate(profiles):
            axes[1].bar(np.asarray(p.turns) + (i - (len(profiles) - 1) / 2) * w,
                        100 * np.asarray(p.share_by_turn, float), w, color=color, label=label)
        style_axes(axes[1], "Dropped share by conversation turn", "turn", "dropped choices (%)")
        legend(axes[1], ncol=1)
    return fig


def rank_table_heatmap(dyn: Any) -> Figure:
    """A Closer Look: share of experts at each (router-score rank, output-norm rank); white = independent."""
    counts = dyn.rank_counts
    shown = pick_layers(len(counts))
    data = []
    for l in shown:
        c = np.asarray(counts[l], float)
        data.append(c / np.maximum(c.sum(axis=1, keepdims=True), 1))
    fig = new_figure(height=3.0 * (1 + (len(shown) > 4)))
    layer_heatmaps(fig, data, [dyn.null_top1_is_largest_norm[l] for l in shown],
                   [f"layer {l}: top-1 is largest {dyn.top1_is_largest_norm[l]:.0%}" for l in shown],
                   xlabel="output-norm rank", ylabel="router-score rank", label="share of the score rank's experts",
                   null_name="independent 1/E")
    fig.suptitle(f"Router score rank vs expert output-norm rank{layers_note(shown, len(counts))}", fontsize=11)
    return fig


def output_similarity(dyn: Any) -> Figure:
    """Per layer: angular similarity of expert outputs (null 0.5) and active-unit density (dense = 1)."""
    panels = [(dyn.mean_angular, dyn.null_angular, "Expert output similarity (angular)", "1 - arccos(cos)/pi",
               "unrelated outputs"),
              (dyn.mean_density, dyn.dense_baseline, "Intermediate activation density", "share |act| > 1e-3",
               "dense")]
    panels = [p for p in panels if p[0] is not None]
    fig = new_figure(height=3.0)
    for ax, (values, null, title, ylabel, null_name) in zip(grid(fig, len(panels)), panels):
        L = np.arange(len(values))
        ax.plot(L, values, "o-", color="tab:blue", label="measured")
        null_line(ax, null, null_name)
        style_axes(ax, title, "layer", ylabel)
        ax.set_xticks(L)
        legend(ax)
    return fig


def early_routing_curves(early: Any, final_step: Any = None) -> Figure:
    """Top-1 agreement, top-k overlap and JSD of each checkpoint against the final one, per layer."""
    steps = list(early.steps)
    numeric = all(isinstance(s, (int, float)) for s in steps + ([] if final_step is None else [final_step]))
    x = np.asarray(steps, float) if numeric else np.arange(len(steps), dtype=float)
    panels = [(early.top1_agreement, early.null_top1, early.uniform_top1, "Top-1 agreement", 1.0),
              (early.topk_overlap, early.null_overlap, early.uniform_overlap, "Top-k overlap (router saturation)", 1.0),
              (early.jsd, early.null_jsd, early.uniform_jsd, "JS divergence of E_i(token)", 0.0)]
    fig = new_figure(height=3.2)
    L = np.asarray(early.top1_agreement).shape[1]
    colors = [f"C{l % 10}" for l in range(L)]
    for ax, (values, null, uniform, title, at_final) in zip(grid(fig, 3), panels):
        values = np.asarray(values, float)
        for l in range(L):
            xs, ys = list(x), list(values[:, l])
            if numeric and final_step is not None:
                xs, ys = xs + [float(final_step)], ys + [at_final]
            ax.plot(xs, ys, "o-", color=colors[l], markersize=3, label=f"layer {l}")
        null_C = np.nanmean(np.asarray(null, float), axis=1) if np.isfinite(np.asarray(null, float)).any() else None
        if null_C is not None:
            ax.plot(x, null_C, "k--", linewidth=1.0, label="null: unrelated checkpoints")
        ref = np.asarray(uniform, float)
        if np.isfinite(ref).any():
            ax.axhline(float(np.nanmean(ref)), color="grey", linestyle=":", linewidth=1.0,
                       label="uniform routing (reference)")
        style_axes(ax, title, "checkpoint step" if numeric else "checkpoint", "vs final" if at_final else "nats")
        if not numeric:
            ax.set_xticks(x)
            ax.set_xticklabels([str(s) for s in steps], fontsize=7)
    handles, names = fig.axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="outside right upper", fontsize=7)
    return fig


def router_r2_bars(weights: Any) -> Figure:
    """R^2 of router-row similarity against averaged-neuron similarity, per layer and part."""
    parts = ("up", "gate", "down")
    L = len(weights.layers)
    fig = new_figure(height=3.0)
    ax = fig.subplots()
    x = np.arange(L + 1)
    w = 0.26
    for i, p in enumerate(parts):
        values = [weights.layers[l].router_r2.get(p, np.nan) for l in range(L)]
        values.append(weights.router_r2_mean.get(p, np.nan))
        ax.bar(x + (i - 1) * w, _nan0(values), w, label=p)
    null_line(ax, weights.null_r2, "unrelated similarities")
    ax.set_xticks(x)
    ax.set_xticklabels([str(l) for l in range(L)] + ["mean"])
    style_axes(ax, "Router rows vs experts: R^2 of pairwise cosine (A Closer Look)", "layer", "R^2")
    ax.set_ylim(0, max(1e-3, float(np.nanmax(_nan0(
        [v for lay in weights.layers for v in lay.router_r2.values()] + [weights.null_r2 or 0])))) * 1.15)
    legend(ax)
    return fig


def _err(estimates: Sequence[Any]) -> np.ndarray | None:
    """2 x L error-bar lengths (below, above) of 95% intervals; 0 where a layer has none."""
    if not estimates:
        return None
    v = np.array([e.value for e in estimates], float)
    lo, hi = np.array([e.ci_low for e in estimates], float), np.array([e.ci_high for e in estimates], float)
    return np.nan_to_num(np.clip(np.stack([v - lo, hi - v]), 0, None))


def _nan0(values: Sequence[Any]) -> np.ndarray:
    """Bars of NaN (no group had enough tokens) drawn as empty rather than failing."""
    return np.nan_to_num(np.asarray([np.nan if v is None else v for v in values], float))
