"""Plot plumbing for the report: figures on the Agg canvas, layer grids, heatmaps centred on their null.

Figures are `matplotlib.figure.Figure` objects with their own Agg canvas: pyplot is never imported, so no
global figure registry or backend switch leaks into the caller's process. Every heatmap of a share or a
similarity is drawn on a diverging map whose white is the null (uniform rate, cosine 0), so colour means
"different from chance" and its hue says which way.
"""

from __future__ import annotations

import io
from typing import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure

PAGE_WIDTH = 10.0  # inches: at 100 dpi a figure fills a 1000-pixel column
MAX_LAYERS = 8     # panels per figure; deeper models show evenly spaced layers
DIVERGING = "RdBu_r"
NAN_COLOR = "#dddddd"


def new_figure(height: float, width: float = PAGE_WIDTH) -> Figure:
    fig = Figure(figsize=(width, max(height, 1.5)), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def to_png(fig: Figure, dpi: int = 100) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def pick_layers(num_layers: int, limit: int = MAX_LAYERS) -> list[int]:
    """All layers, or `limit` evenly spaced ones (first and last included) for deep models."""
    if num_layers <= limit:
        return list(range(num_layers))
    return sorted({int(round(i)) for i in np.linspace(0, num_layers - 1, limit)})


def layers_note(shown: Sequence[int], total: int) -> str:
    return "" if len(shown) == total else f" (layers {', '.join(map(str, shown))} of {total})"


def grid(fig: Figure, n: int, max_cols: int = 4, **kw) -> list:
    """n axes in rows of at most `max_cols`; unused cells are hidden."""
    cols = min(n, max_cols)
    rows = -(-n // cols)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False, **kw)).reshape(-1)
    for ax in axes[n:]:
        ax.set_visible(False)
    return list(axes[:n])


def centred_norm(center: float, values: Sequence[np.ndarray], floor: float | None = None,
                 symmetric: bool = False) -> TwoSlopeNorm:
    """A diverging norm with white at `center`, spanning the finite values of all panels."""
    finite = np.concatenate([np.asarray(v, np.float64)[np.isfinite(v)].reshape(-1) for v in values] + [[center]])
    lo, hi = float(finite.min()), float(finite.max())
    if symmetric:
        half = max(abs(hi - center), abs(center - lo), 1e-3)
        lo, hi = center - half, center + half
    lo = min(lo, center - 1e-6) if floor is None else min(floor, center - 1e-6)
    hi = max(hi, center + 1e-6)
    return TwoSlopeNorm(vcenter=center, vmin=lo, vmax=hi)


def heatmap(ax, data: np.ndarray, norm, *, cmap: str = DIVERGING, title: str = "", xlabel: str = "",
            ylabel: str = "", xticks: Sequence[str] | None = None, yticks: Sequence[str] | None = None):
    """imshow with NaN cells in grey and at most ~16 labelled ticks per axis; returns the image."""
    import matplotlib

    cm = matplotlib.colormaps[cmap].with_extremes(bad=NAN_COLOR)
    im = ax.imshow(np.ma.masked_invalid(np.asarray(data, np.float64)), cmap=cm, norm=norm,
                   aspect="auto", interpolation="nearest")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel, fontsize=9)
    ax.set_ylabel(ylabel, fontsize=9)
    _ticks(ax.set_xticks, ax.set_xticklabels, data.shape[1], xticks, rotate=True)
    _ticks(ax.set_yticks, ax.set_yticklabels, data.shape[0], yticks)
    ax.tick_params(labelsize=7)
    return im


def _ticks(set_ticks, set_labels, n: int, labels: Sequence[str] | None, rotate: bool = False) -> None:
    step = max(1, -(-n // 16))
    where = list(range(0, n, step))
    set_ticks(where)
    names = [str(i) for i in range(n)] if labels is None else [str(s) for s in labels]
    set_labels([names[i][:14] for i in where], rotation=90 if rotate and labels is not None else 0)


def colorbar(fig: Figure, im, axes: Sequence, label: str, marks: dict[str, float] | None = None) -> None:
    """A colorbar beside `axes`; named marks (e.g. the uniform rate) are black lines across the bar,
    explained in its label so no text crowds the tick labels."""
    bar = fig.colorbar(im, ax=list(axes), shrink=0.9, pad=0.02)
    for value in (marks or {}).values():
        bar.ax.axhline(value, color="black", linewidth=2)
    named = "; ".join(f"{name} = {value:.3g}" for name, value in (marks or {}).items())
    bar.set_label(f"{label}\n(black line: {named})" if named else label, fontsize=8)
    bar.ax.tick_params(labelsize=7)


def legend(ax, ncol: int = 2) -> None:
    """A legend in headroom above the data (the y range grows by a quarter) so it never hides a bar."""
    lo, hi = ax.get_ylim()
    ax.set_ylim(lo, hi + 0.3 * (hi - lo))
    ax.legend(fontsize=7, loc="upper center", ncol=ncol, framealpha=0.9)


def layer_heatmaps(fig: Figure, data: Sequence[np.ndarray], nulls: Sequence[float], titles: Sequence[str], *,
                   xlabel: str, ylabel: str, label: str, null_name: str,
                   yticks: Sequence[Sequence[str]] | None = None) -> list:
    """One heatmap per layer, white at each layer's null: one shared colour bar when the nulls agree,
    else (layers with different E) one bar per panel so no panel is read against another's null."""
    axes = grid(fig, len(data))
    shared = len({round(float(n), 12) for n in nulls}) == 1
    norm = centred_norm(nulls[0], data, floor=0.0) if shared else None
    im = None
    for i, (ax, d, null, title) in enumerate(zip(axes, data, nulls, titles)):
        im = heatmap(ax, d, norm or centred_norm(null, [d], floor=0.0), title=title, xlabel=xlabel,
                     ylabel=ylabel if i == 0 else "", yticks=None if yticks is None else yticks[i])
        if not shared:
            colorbar(fig, im, [ax], label, {null_name: null})
    if shared:
        colorbar(fig, im, axes, label, {null_name: nulls[0]})
    return axes


def mask_diagonal(m: np.ndarray) -> np.ndarray:
    out = np.array(m, dtype=np.float64)
    if out.ndim == 2 and out.shape[0] == out.shape[1]:
        np.fill_diagonal(out, np.nan)
    return out


def null_line(ax, value: float, label: str, *, horizontal: bool = True) -> None:
    if value is None or not np.isfinite(value):
        return
    draw = ax.axhline if horizontal else ax.axvline
    draw(value, color="black", linestyle="--", linewidth=1.0, label=label)


def style_axes(ax, title: str, xlabel: str, ylabel: str) -> None:
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel, fontsize=9)
    ax.set_ylabel(ylabel, fontsize=9)
    ax.tick_params(labelsize=8)
    ax.grid(True, alpha=0.3)
