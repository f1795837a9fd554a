"""The load-balance loss of the global batch under data and expert parallelism (`parallel.balance_reduce`).

The loss E * sum_e f_e * P_e is a product of two batch statistics, so the mean over ranks of per-rank
losses is not the loss of the global batch (2.0465 vs 2.0564 at step 1 of a dp=2 run). With "world",
as Megatron's global aux loss, f_e is counted over every rank's tokens (an all-reduce of the expert
counts; f carries no gradient) and P_e stays this rank's mean probability. With equal token counts per
rank (every rank takes batch_size / world rows of seq_len tokens):
  * value: mean_r E sum_e f_e P_e^(r) = E sum_e f_e mean_r P_e^(r) = E sum_e f_e P_e, the global loss;
  * gradient: d/dp_t on rank r is E f_e / T_r = W * E f_e / T, and the gradient mean over the W ranks
    (DDP, FSDP, `sync_gradients`) divides by W: E f_e / T, the single-process gradient.
So with "world" a distributed step matches one process on the global batch, balance loss included.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from moelab.distributed.mesh import collective


def _counts(rec) -> torch.Tensor:
    E = rec.probs_TE.shape[-1]
    return torch.bincount(rec.expert_ids_TK.reshape(-1), minlength=E).to(torch.float64)


def world_balance_loss(routing, scope: str, group=None) -> torch.Tensor:
    """Balance loss with f over the whole group's tokens and P over this rank's; `scope` "layer" (the
    mean of per-layer losses) or "global" (every layer's tokens pooled), as `model.moe.balance_loss_scope`."""
    counts = [_counts(r) for r in routing] if scope == "layer" else [sum(_counts(r) for r in routing)]
    tokens = float(sum(r.probs_TE.shape[0] for r in routing)) / (len(routing) if scope == "layer" else 1)
    stats = torch.cat([*counts, counts[0].new_tensor([tokens])])
    if dist.is_initialized():
        with collective("balance-loss expert counts"):
            dist.all_reduce(stats, group=group)
    f_list = torch.split(stats[:-1] / stats[-1], [c.numel() for c in counts])  # per layer (E may differ)
    if scope == "layer":
        return torch.stack([_product(f_E, r.probs_TE) for f_E, r in zip(f_list, routing)]).mean()
    return _product(f_list[0], torch.cat([r.probs_TE for r in routing]))


def _product(f_E: torch.Tensor, probs_TE: torch.Tensor) -> torch.Tensor:
    return probs_TE.shape[-1] * (f_E.to(probs_TE.dtype) * probs_TE.mean(0)).sum()
