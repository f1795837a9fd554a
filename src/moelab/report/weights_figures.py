"""Figures of the static weight analyses (A Closer Look): expert similarity with the dense reference row,
the paper's neuron reordering, and the z-scored PCA of expert matrices. Each takes a `WeightAnalysis`.

Every heatmap is white at its random-init level (cosine 0; for the reordering, what a best matching of
noise reaches), and every PCA panel says what share of variance exchangeable random experts would give.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from matplotlib.figure import Figure

from moelab.report.plotting import (
    centred_norm, colorbar, heatmap, layers_note, mask_diagonal, new_figure, pick_layers,
)

PARTS = ("up", "gate", "down")
REF_LABEL = "ref"


def with_reference(m_EE: np.ndarray, ref_E: np.ndarray | None) -> np.ndarray:
    """E x E similarity plus the reference as a last row and column (diagonal masked)."""
    m = mask_diagonal(m_EE)
    if ref_E is None or len(ref_E) == 0:
        return m
    E = m.shape[0]
    out = np.full((E + 1, E + 1), np.nan)
    out[:E, :E] = m
    out[E, :E] = out[:E, E] = np.asarray(ref_E, float)
    return out


def expert_similarity_heatmap(weights: Any, kind: str = "matrix") -> Figure:
    """E x E cosine of experts per layer and part: flattened matrices ("matrix") or mean neurons
    ("averaged"), with the dense reference FFN as the last row ("ref") where the model has one."""
    layers = weights.layers
    shown = pick_layers(len(layers), limit=6)
    attr, ref_attr = ("matrix_cos", "matrix_ref_cos") if kind == "matrix" else ("averaged_cos", "averaged_ref_cos")
    data = {(p, l): with_reference(getattr(layers[l], attr)[p], getattr(layers[l], ref_attr).get(p))
            for p in PARTS for l in shown}
    fig = new_figure(height=2.3 * len(PARTS) + 0.6, width=min(3.0 * len(shown) + 1.5, 12.0))
    axes = fig.subplots(len(PARTS), len(shown), squeeze=False)
    norm = centred_norm(0.0, list(data.values()), symmetric=True)
    im = None
    for r, p in enumerate(PARTS):
        for c, l in enumerate(shown):
            m = data[(p, l)]
            ticks = [str(i) for i in range(len(layers[l].matrix_cos[p]))] + ([REF_LABEL] if layers[l].reference else [])
            im = heatmap(axes[r, c], m, norm, title=f"{p}, layer {l}", xticks=ticks, yticks=ticks,
                         xlabel="expert" if r == len(PARTS) - 1 else "", ylabel="expert" if c == 0 else "")
    what = "flattened weight matrices" if kind == "matrix" else "averaged neurons"
    fig.suptitle(f"Expert similarity: cosine of {what}{layers_note(shown, len(layers))}", fontsize=11)
    colorbar(fig, im, axes.reshape(-1), "cosine", {"random init": 0.0})
    return fig


def paper_reorder_heatmap(weights: Any) -> Figure:
    """The paper's reordered similarity per layer and part: flattened cosine after each pair's own
    neuron matching (grey: pairs not matched); white is what the matching reaches on Gaussian noise."""
    layers = [l for l, lay in enumerate(weights.layers) if lay.paper_reorder is not None]
    shown = [layers[i] for i in pick_layers(len(layers), limit=6)]
    data = {(p, l): mask_diagonal(weights.layers[l].paper_reorder.flat_cos_after[p]) for p in PARTS for l in shown}
    null = float(np.mean([weights.layers[l].paper_reorder.null_after["up"] for l in shown]))
    fig = new_figure(height=2.3 * len(PARTS) + 0.6, width=min(3.0 * len(shown) + 1.5, 12.0))
    axes = fig.subplots(len(PARTS), len(shown), squeeze=False)
    norm = centred_norm(null, list(data.values()), symmetric=True)
    im = None
    for r, p in enumerate(PARTS):
        for c, l in enumerate(shown):
            im = heatmap(axes[r, c], data[(p, l)], norm, title=f"{p}, layer {l}",
                         xlabel="expert" if r == len(PARTS) - 1 else "", ylabel="expert" if c == 0 else "")
    fig.suptitle("Neuron reordering (A Closer Look): cosine of flattened matrices after matching neurons"
                 f"{layers_note(shown, len(layers))}", fontsize=11)
    colorbar(fig, im, axes.reshape(-1), "cosine after matching", {"matching of noise": null})
    return fig


def pca_scatter(weights: Any) -> Figure:
    """Per layer (rows) and part (columns): experts' z-scored flattened matrices on two principal
    components, numbered; the dense reference as a black triangle."""
    layers = weights.layers
    shown = pick_layers(len(layers), limit=6)  # a row per layer; deeper models: 6 evenly spaced ones
    fig = new_figure(height=2.4 * len(shown) + 0.5, width=10.0)
    axes = fig.subplots(len(shown), len(PARTS), squeeze=False)
    for r, l in enumerate(shown):
        lay = layers[l]
        E = lay.matrix_cos["up"].shape[0]
        for c, p in enumerate(PARTS):
            ax, pr = axes[r, c], lay.pca[p]
            coords = np.asarray(pr.coords, float).reshape(len(pr.coords), -1)
            xy = np.zeros((len(coords), 2))  # fewer than two components (two points): the rest at 0
            xy[:, : coords.shape[1]] = coords
            ax.scatter(xy[:E, 0], xy[:E, 1], s=18, color="tab:blue", label="expert")
            for e in range(E):
                ax.annotate(str(e), xy[e], fontsize=7, xytext=(2, 2), textcoords="offset points")
            if lay.reference:
                ax.scatter(xy[E:, 0], xy[E:, 1], marker="^", s=40, color="black", label=lay.reference)
            ev = ", ".join(f"PC{i + 1} {100 * v:.0f}%" for i, v in enumerate(pr.explained))
            null = f" (random {100 * pr.null_explained:.0f}% each)" if np.isfinite(pr.null_explained) else ""
            ax.set_title(f"{p}, layer {l}: {ev or 'one point'}{null}", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(True, alpha=0.3)
    if any(lay.reference for lay in layers):
        axes[0, 0].legend(fontsize=7, loc="best")
    fig.suptitle(f"PCA of z-scored expert matrices (A Closer Look){layers_note(shown, len(layers))}", fontsize=11)
    return fig
