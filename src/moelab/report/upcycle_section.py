"""The "Expert symmetry over training" section: per MoE layer, the mean pairwise cosine between the
experts' weights at each evaluation of the run that wrote the checkpoint (`moe<i>/expert_cosine` rows of
its metrics.jsonl, logged by the trainer).

An upcycled model starts with copies of one dense FFN (cosine 1); the curve shows when, and whether,
training breaks that symmetry. Experts initialised independently start near 0, the level drawn as the
reference line. The report finds the run from a `--weights` checkpoint: `RUN/checkpoints/step_N` (or the
run folder itself) holds `metrics.jsonl`; a checkpoint without one, or a run that logged no expert
cosine (a dense run, a multi-process run), gets no section.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from moelab.analysis.common import Result
from moelab.config import MoelabError
from moelab.report.html import FigureBlock, Section, Table
from moelab.report.plotting import legend, new_figure, null_line, style_axes

KEY = re.compile(r"^moe(\d+)/expert_cosine$")


@dataclasses.dataclass
class CosineTrajectory(Result):
    metrics: str                 # the metrics.jsonl it was read from
    steps: np.ndarray            # evaluation steps, increasing
    cosine_LS: np.ndarray        # MoE layer x step; NaN where a row lacks the layer
    layers: list[int]            # the MoE layer index of each row of cosine_LS


def run_metrics(checkpoint: str | Path) -> Path | None:
    """The metrics.jsonl of the run a checkpoint belongs to (or of a run folder), or None."""
    ckpt = Path(checkpoint)
    for folder in (ckpt, ckpt.parent.parent if ckpt.parent.name == "checkpoints" else None):
        if folder is not None and (folder / "metrics.jsonl").is_file():
            return folder / "metrics.jsonl"
    return None


def read_expert_cosine(metrics: str | Path) -> CosineTrajectory | None:
    """The expert-cosine rows of a metrics.jsonl (the last row per step wins), or None if it has none.
    A line that is not a JSON object is bad input: one error naming the file and line."""
    by_step: dict[int, dict[int, float]] = {}
    with open(metrics, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                values = {int(m.group(1)): float(v) for k, v in row.items() if (m := KEY.match(k))}
                step = int(row["step"]) if values else 0
            except (json.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError):
                raise MoelabError(f"{metrics}: line {n} is not a metrics row (a JSON object with a step)") from None
            if values:
                by_step.setdefault(step, {}).update(values)
    if not by_step:
        return None
    steps = sorted(by_step)
    layers = sorted({l for v in by_step.values() for l in v})
    cos_LS = np.array([[by_step[s].get(l, np.nan) for s in steps] for l in layers], dtype=np.float64)
    return CosineTrajectory(metrics=str(metrics), steps=np.array(steps), cosine_LS=cos_LS, layers=layers)


def checkpoint_expert_cosine(checkpoint: str | Path) -> CosineTrajectory | None:
    """The trajectory of the run that wrote `checkpoint`, or None (no run metrics, or no cosine logged)."""
    metrics = run_metrics(checkpoint)
    return None if metrics is None else read_expert_cosine(metrics)


def cosine_figure(traj: CosineTrajectory) -> Figure:
    fig = new_figure(height=3.0, width=6.0)
    ax = fig.subplots()
    for l, row in zip(traj.layers, traj.cosine_LS):
        ax.plot(traj.steps, row, marker="o", markersize=3, label=f"MoE layer {l}")
    null_line(ax, 0.0, "independent random init (about 0)")
    style_axes(ax, "Mean pairwise cosine between experts' weights", "training step", "cosine")
    legend(ax, ncol=2)
    return fig


def upcycle_section(traj: CosineTrajectory) -> Section:
    first, last = traj.cosine_LS[:, 0], traj.cosine_LS[:, -1]
    rows = [[f"MoE layer {l}", f"{a:.3f}", f"{b:.3f}"] for l, a, b in zip(traj.layers, first, last)]
    return Section(
        "Expert symmetry over training",
        intro=f"From the run's {traj.metrics}: {len(traj.steps)} evaluation(s), steps "
              f"{int(traj.steps[0])} to {int(traj.steps[-1])}.",
        blocks=[FigureBlock(cosine_figure(traj),
                            "Per MoE layer, the mean cosine between every pair of experts' flattened weights at each "
                            "evaluation: 1 means identical experts (upcycled copies that have not diverged), the "
                            "dashed line at 0 what independently initialised experts give."),
                Table(["layer", f"step {int(traj.steps[0])}", f"step {int(traj.steps[-1])}"], rows)])


def cosine_metrics(traj: CosineTrajectory | None) -> dict[str, Any] | None:
    if traj is None:
        return None
    return {"metrics": traj.metrics, "steps": traj.steps.tolist(),
            "layers": {f"moe{l}": row.tolist() for l, row in zip(traj.layers, traj.cosine_LS)}}
