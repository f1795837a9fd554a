"""The runs rows share, named once so that every row asking for "tiny-moe, seed 0" gets the same cached run.

The base runs keep 9 evenly spaced checkpoints besides the final one (10%, 20%, ... of training) for the
early-routing and saturation rows; the snapshots cost a little disk and nothing else.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from moelab.claims.workspace import Workspace

SNAPSHOTS = 9


def base_run(ws: Workspace, preset: str, seed: int = 0) -> Path:
    """`preset` trained on the main corpus at the workspace's scale."""
    return ws.run(f"{preset}-s{seed}", preset, seed=seed, snapshots=SNAPSHOTS)


def checkpoints(run: Path) -> list[Path]:
    from moelab.train.rundir import list_checkpoints

    return list_checkpoints(run)


def final(run: Path) -> Path:
    return checkpoints(run)[-1]


def param_counts(run: Path) -> tuple[int, int]:
    """(active, total) parameters of a run's model."""
    from moelab.model.config import ModelConfig
    from moelab.train.checkpoint import read_checkpoint_config

    cfg = ModelConfig.from_dict(read_checkpoint_config(final(run))["model"])
    return cfg.num_active_params(), cfg.num_params()


def millions(n: int) -> str:
    return f"{n / 1e6:.2f}M"


def train_curve(run: Path) -> np.ndarray:
    """(step, training loss) rows of a run's metrics log."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return np.array([(r["step"], r["loss"]) for r in rows if r.get("kind") == "train"], np.float64)
