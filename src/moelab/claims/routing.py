"""The routing analysis the OpenMoE and OLMoE rows share: every checkpoint of a base run traced on the
held-out split, and one `analyze` of the final trace with the snapshots as its early-routing series.

Traces and the analysis are cached under names of their own ("ckpt-...", "routing-..."), so the rows that
read them (context-independent specialisation, early routing, saturation, vocabulary and domain
specialisation) pay for them once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moelab.claims.models import base_run, checkpoints
from moelab.claims.verdict import Measure
from moelab.claims.workspace import Workspace

MIN_COUNT = 128  # OpenMoE counts a token ID when it is seen >= 128 times
SMOKE_MIN_COUNT = 8  # a smoke trace (2k tokens) holds no token ID 128 times: the rows would have no value


def min_count(ws: Workspace) -> int:
    return MIN_COUNT if ws.scale.steps >= 100 else SMOKE_MIN_COUNT


def step_of(checkpoint: Path) -> int:
    from moelab.train.checkpoint import checkpoint_step

    return int(checkpoint_step(checkpoint))


def checkpoint_traces(ws: Workspace, preset: str = "tiny-moe", seed: int = 0) -> list[Path]:
    """A held-out trace of every checkpoint of the base run, in training order (the final one last)."""
    return [ws.trace(c, f"ckpt-{preset}-s{seed}-{step_of(c)}") for c in checkpoints(base_run(ws, preset, seed))]


def routing_metrics(ws: Workspace, preset: str = "tiny-moe", seed: int = 0) -> dict[str, Any]:
    """metrics.json's entry for the final checkpoint, with early routing over the snapshots."""
    traces = checkpoint_traces(ws, preset, seed)
    m = ws.analyze(f"routing-{preset}-s{seed}", [traces[-1]], names=[preset], early={preset: traces[:-1]},
                   options={"min_count": min_count(ws)})
    return m["models"][preset]


def measure_of(estimate: dict[str, Any]) -> Measure:
    """A metrics.json Estimate (None where no number) as the verdict's Measure."""
    def num(key: str) -> float:
        v = estimate.get(key)
        return float("nan") if v is None else float(v)

    sd = estimate.get("null_sd")
    return Measure(num("value"), num("ci_low"), num("ci_high"), num("null_mean"), None if sd is None else float(sd))


def training_fraction(ws: Workspace, checkpoint: Path) -> float:
    return step_of(checkpoint) / ws.scale.steps


def describe_run(ws: Workspace, preset: str = "tiny-moe", seed: int = 0, seeds: int = 1) -> str:
    """The run's model and training, from its saved config (never typed by hand); `seeds` > 1: the runs of
    seeds 0 .. seeds - 1, which share that config."""
    from moelab.claims.models import final, millions, param_counts
    from moelab.model.config import ModelConfig
    from moelab.train.checkpoint import read_checkpoint_config

    run = base_run(ws, preset, seed)
    cfg = ModelConfig.from_dict(read_checkpoint_config(final(run))["model"])
    active, total = param_counts(run)
    moe = cfg.moe
    which = f"seed {seed}" if seeds == 1 else f"seeds 0-{seeds - 1}"
    return (f"{preset} {which} ({millions(active)} active of {millions(total)} parameters; "
            f"{len(cfg.moe_layer_ids())} MoE of {cfg.n_layers} blocks, top-{moe.top_k} of {moe.num_experts} "
            f"experts), {ws.scale.describe()}, main corpus")


def final_models(ws: Workspace, preset: str = "tiny-moe") -> list[dict[str, Any]]:
    """Each seed's metrics.json entry (headline, analyses) of its final checkpoint (seed 0 from `routing_metrics`, the others
    from an analysis of their final trace alone): the per-seed values of the single-checkpoint rows."""
    from moelab.claims.models import final

    out = [routing_metrics(ws, preset, 0)]
    for seed in range(1, ws.scale.seeds):
        trace = ws.trace(final(base_run(ws, preset, seed)), f"final-{preset}-s{seed}")
        m = ws.analyze(f"final-{preset}-s{seed}", [trace], names=[preset], options={"min_count": min_count(ws)})
        out.append(m["models"][preset])
    return out


def over_seeds(models: list[dict[str, Any]], key: str) -> tuple[Measure, list[float], list[dict]]:
    """(seed 0's measure with the nulls' mean over seeds, the per-seed values each paired with its own null
    (`seeds.null_paired`), per-seed estimates)."""
    import dataclasses

    from moelab.claims.seeds import null_paired

    each = [measure_of(m["headline"][key]["estimate"]) for m in models]
    paired, null = null_paired([m.value for m in each], [m.null for m in each])
    return dataclasses.replace(each[0], null=null), paired, [dataclasses.asdict(m) for m in each]
