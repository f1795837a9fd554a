"""The 8-layer models the RMoE and Closer Look rows share: RMoE's small setup scaled to this machine.

RMoE's small setup (PAPERS.md section 2): 8 blocks, every block MoE, top-2 of 16 experts, renormalised
top-k weights, no shared expert, no token dropping (its baselines are dropless SMoEs), D = 352, a GRU of
width p = 128. Here D = 64, expert hidden 64 and p = 32 (p about D / 2.75, as in the paper), so that one
run takes a few minutes on one CPU thread while others share the machine; every variant differs from the
linear-router model in the router alone, so a loss difference is the router's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from moelab.claims.workspace import Workspace
from moelab.config import MoelabError

# Shared by every variant: the model around the router.
MODEL = ("model.n_layers=8", "model.d_model=64", "model.n_heads=4", "model.moe.moe_every=1",
         "model.moe.num_experts=16", "model.moe.top_k=2", "model.moe.expert_hidden=64",
         "model.moe.num_shared_experts=0", "model.moe.shared_placement=none",
         "model.moe.capacity_factor_train=none", "model.moe.capacity_factor_eval=none",
         "model.moe.router.renormalize=true")
GRU = ("model.moe.router.kind=rmoe", "model.moe.router.cell=gru", "model.moe.router.hidden=32")
# variant -> (preset, router overrides)
VARIANTS = {
    "linear": ("tiny-moe", ("model.moe.router.kind=linear",)),
    "gru": ("tiny-rmoe", GRU),
    "np": ("tiny-rmoe", GRU + ("model.moe.router.pass_state=false",)),
    "detach": ("tiny-rmoe", GRU + ("model.moe.router.detach_state=true",)),
}
LABEL = {"linear": "linear router (SMoE)", "gru": "RMoE (GRU router)", "np": "RMoE without passed state (NP)",
         "detach": "RMoE with detached state"}


def seeds(ws: Workspace, variant: str) -> int:
    """Every variant uses every seed of the scale: a comparison over fewer than 3 seeds is not decided
    (claims/verdict.py), so the ablations no longer save a seed."""
    return ws.scale.seeds


def rmoe8_run(ws: Workspace, variant: str, seed: int) -> Path:
    preset, router = VARIANTS[variant]
    return ws.run(f"rmoe8-{variant}-s{seed}", preset, overrides=[*MODEL, *router], seed=seed)


def describe(run: Path) -> str:
    """The model as trained, read from its checkpoint's config (nothing here is typed in by hand)."""
    from moelab.claims.models import final, millions, param_counts
    from moelab.train.checkpoint import read_checkpoint_config

    m = read_checkpoint_config(final(run))["model"]
    moe, r = m["moe"], m["moe"]["router"]
    active, total = param_counts(run)
    router = f"GRU router width {r['hidden']}" if r["kind"] == "rmoe" else f"{r['kind']} router"
    return (f"{m['n_layers']} blocks (MoE every {moe['moe_every']}), top-{moe['top_k']} of {moe['num_experts']} "
            f"experts of hidden {moe['expert_hidden']}, {moe['num_shared_experts']} shared, renormalised "
            f"{r['renormalize']}, capacity {moe['capacity_factor_train']}, d_model {m['d_model']}, {router}; "
            f"{millions(active)} active of {millions(total)} parameters")


def trace_arrays(path: Path, columns: tuple[str, ...]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(seq_T, column -> L x T x W) of a trace's per-token list columns, tokens in trace order."""
    from moelab.analysis.common import rank0_list, token_key
    from moelab.trace.io import open_trace

    seq: dict[int, list] = {}
    parts: dict[str, dict[int, list]] = {c: {} for c in columns}
    for b in open_trace(path).iter_batches(columns=["seq", "pos", "layer", "rank", *columns]):
        first = b["rank"] == 0
        for l in np.unique(b["layer"][first]):
            rows = first & (b["layer"] == l)
            seq.setdefault(int(l), []).append(token_key(b)[rows])
            for c in columns:
                parts[c].setdefault(int(l), []).append(rank0_list(b, c, rows))
    layers = sorted(seq)
    seqs = [np.concatenate(seq[l]) for l in layers]
    if any(not np.array_equal(s, seqs[0]) for s in seqs):
        raise MoelabError(f"trace {path}: the MoE layers cover different tokens")
    return seqs[0] >> 32, {c: np.stack([np.concatenate(parts[c][l]) for l in layers]) for c in columns}
