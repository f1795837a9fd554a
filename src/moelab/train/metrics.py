"""Training metrics from the routing records, each with its declared cross-process reduction.

Only `distributed/` ever reduces across processes; here every metric says how it would be reduced.
"""

from __future__ import annotations

import torch

# How each metric combines across data-parallel ranks.
REDUCTIONS = {
    "loss": "mean", "aux_loss": "mean", "balance_loss": "mean", "z_loss": "mean", "grad_norm": "max",
    "tokens": "sum", "load_max_over_mean": "max", "dropped_share": "mean", "router_entropy": "mean",
}


@torch.no_grad()
def routing_metrics(routing) -> dict[str, float]:
    """Per MoE layer: expert load max/mean (1 = even), dropped share, mean router entropy (nats)."""
    out: dict[str, float] = {}
    for i, rec in enumerate(routing):
        E = rec.probs_TE.shape[1]
        load_E = torch.bincount(rec.expert_ids_TK.reshape(-1), minlength=E).float()
        mean = load_E.mean().clamp_min(1e-9)
        probs = rec.probs_TE.float()
        entropy = -(probs * probs.clamp_min(1e-30).log()).sum(-1).mean()
        out[f"moe{i}/load_max_over_mean"] = float(load_E.max() / mean)
        out[f"moe{i}/dropped_share"] = float(rec.dropped_TK.float().mean()) if rec.dropped_TK.numel() else 0.0
        out[f"moe{i}/router_entropy"] = float(entropy)
    return out


def reduction_of(name: str) -> str:
    return REDUCTIONS[name.split("/")[-1]]
