"""RMoE's depth scan: does the recurrent router's advantage over the linear router grow with depth?

RMoE attributes its gain to information shared across layers; a deeper model has more layers to share
across. The scan trains the RMoE rows' model (rmoe8.py: every block MoE, top-2 of 16, dropless, renormalised
top-k, D = 64, GRU width 32) at DEPTHS blocks, linear and GRU router, every seed of the scale; depth 8 is
the RMoE rows' own runs (one cache entry). Only the number of blocks changes between depths, and only the
router between the two models of a depth, so the gap at a depth is the router's and its change over
depths is depth's. Per seed the statistic is the least-squares slope of the held-out loss gap (linear
minus GRU, nats per token) on log2(depth): the change of RMoE's advantage per doubling of depth.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from moelab.claims.heldout import seq_losses
from moelab.claims.models import final, train_curve
from moelab.claims.preconditions import gap_settled
from moelab.claims.record import ClaimResult
from moelab.claims.registry import row
from moelab.claims.rmoe8 import MODEL, VARIANTS, describe, rmoe8_run
from moelab.claims.rows_rmoe import PAPER_BPC
from moelab.claims.verdict import Claim, Measure, Precondition
from moelab.claims.workspace import Workspace

DEPTHS = (2, 4, 8)


def depth_overrides(depth: int) -> list[str]:
    """The RMoE rows' model at `depth` blocks: their overrides with n_layers replaced, nothing else."""
    return [f"model.n_layers={depth}" if o.startswith("model.n_layers=") else o for o in MODEL]


def depth_run(ws: Workspace, variant: str, seed: int, depth: int) -> Path:
    if depth == 8:  # the RMoE rows' runs: same settings, same cache entry
        return rmoe8_run(ws, variant, seed)
    preset, router = VARIANTS[variant]
    return ws.run(f"rmoe{depth}-{variant}-s{seed}", preset, overrides=[*depth_overrides(depth), *router], seed=seed)


def gap_nats(worse_S: np.ndarray, better_S: np.ndarray, counts_S: np.ndarray) -> float:
    """Held-out loss of `worse` minus `better`, nats per token, from per-sequence loss sums on one text."""
    return float((np.sum(worse_S) - np.sum(better_S)) / np.sum(counts_S))


def depth_slope(depths: Sequence[int], gaps_D: Sequence[float]) -> float:
    """Least-squares slope of the gaps on log2(depth): change of the gap per doubling of depth."""
    x, y = np.log2(np.asarray(depths, np.float64)), np.asarray(gaps_D, np.float64)
    if len(x) < 2 or np.ptp(x) == 0 or not np.isfinite(y).all():
        return float("nan")
    return float(np.polyfit(x, y, 1)[0])


def margin_of(gru_loss: float, depths: Sequence[int]) -> float:
    """Half the paper's relative 8-layer gain (the rmoe-beats-linear margin, at the GRU loss measured), as
    a rise over the whole scan, per doubling: the advantage must grow by at least that from the shallowest
    to the deepest model."""
    rel = 1 - PAPER_BPC["gru"] / PAPER_BPC["linear"]
    return rel / 2 * gru_loss / float(np.log2(max(depths) / min(depths)))


def settled_everywhere(checks: dict[int, Precondition]) -> Precondition:
    """gap_settled at every depth: a slope over depths of gaps still moving would be a slope of speeds."""
    first = next(iter(checks.values()))
    return Precondition(f"{first.needs}, at every depth",
                        "; ".join(f"depth {d}: {c.measured}" for d, c in checks.items()),
                        all(c.met for c in checks.values()))


@row("rmoe-depth-scan", "RMoE")
def depth_scan(ws: Workspace) -> ClaimResult:
    s, corpus = ws.scale, ws.corpus()
    n = s.seeds
    gaps_ND, losses, checks = np.zeros((n, len(DEPTHS))), {}, {}
    for j, depth in enumerate(DEPTHS):
        for seed in range(n):
            lin_S, counts_S = seq_losses(final(depth_run(ws, "linear", seed, depth)), corpus, s.seq_len, s.batch_size,
                                  device=ws.eval_device)
            gru_S, _ = seq_losses(final(depth_run(ws, "gru", seed, depth)), corpus, s.seq_len, s.batch_size,
                                  device=ws.eval_device)
            gaps_ND[seed, j] = gap_nats(lin_S, gru_S, counts_S)
            losses.setdefault(depth, []).append({"seed": seed, "linear": float(lin_S.sum() / counts_S.sum()),
                                                 "gru": float(gru_S.sum() / counts_S.sum())})
    slopes = [depth_slope(DEPTHS, g) for g in gaps_ND]
    gru_loss = float(np.mean([p["gru"] for p in losses[max(DEPTHS)]]))
    margin = margin_of(gru_loss, DEPTHS)
    for depth in DEPTHS:  # each depth's gap moved less than the change per doubling the row counts
        checks[depth] = gap_settled([train_curve(depth_run(ws, "linear", i, depth)) for i in range(n)],
                                    [train_curve(depth_run(ws, "gru", i, depth)) for i in range(n)], margin)
    return ClaimResult(
        row="rmoe-depth-scan", paper="RMoE",
        claim="RMoE's advantage over the linear router grows with depth (more layers to share routing "
              "information across).",
        paper_number=f"No depth scan in the reference notes (PAPERS.md) or the seed abstract; its only size is the "
                     f"8-layer small setup: enwik8 BPC {PAPER_BPC['linear']} (linear) -> {PAPER_BPC['gru']} (RMoE), "
                     f"{1 - PAPER_BPC['gru'] / PAPER_BPC['linear']:.1%} relative. The claim is the paper's account of "
                     "that gain (cross-layer information sharing) applied to depth.",
        measured="Per seed, the least-squares slope on log2(depth) of the held-out loss gap (linear-router model minus "
                 f"GRU-router model, nats per token, same held-out sequences) at depths {', '.join(map(str, DEPTHS))}: "
                 "the change of RMoE's advantage per doubling of depth. Null 0 (an advantage, or a deficit, the same "
                 "at every depth). 95% interval: t over seeds. Details: the gaps per depth and seed.",
        measure=Measure(float(np.nanmean(slopes)), float("nan"), float("nan"), 0.0), test=Claim("greater", margin),
        unit=" nats", seed_values=slopes, seeds=n, precondition=settled_everywhere(checks),
        setup=(f"The RMoE rows' model at {', '.join(map(str, DEPTHS))} blocks (every block MoE), linear and GRU "
               f"router, seeds 0-{n - 1}; depth {min(DEPTHS)}: {describe(depth_run(ws, 'gru', 0, min(DEPTHS)))}; depth "
               f"{max(DEPTHS)}: {describe(depth_run(ws, 'gru', 0, max(DEPTHS)))}. {s.describe()}, main corpus; "
               f"{int(counts_S.sum()):,} held-out tokens."),
        details={"depths": list(DEPTHS), "gap_per_seed_per_depth": gaps_ND.round(5).tolist(),
                 "gap_mean_per_depth": gaps_ND.mean(axis=0).tolist(), "losses": {str(k): v for k, v in losses.items()},
                 "margin_over_scan": margin * float(np.log2(max(DEPTHS) / min(DEPTHS)))},
        note=f"Margin {margin:.4f} nats per doubling: the advantage must grow over the scan by half the paper's "
             f"8-layer relative gain at the deepest GRU model's loss ({gru_loss:.3f}), the rmoe-beats-linear margin. "
             "The precondition is the loss rows': the training-loss gap settled at every depth, else the slope "
             "compares how fast the routers learn, not where they end.")
