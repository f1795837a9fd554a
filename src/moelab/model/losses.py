"""Router auxiliary losses (pure functions).

Legend: T tokens, E experts, K experts per token.
"""

from __future__ import annotations

import torch


def load_balance_loss(probs_TE: torch.Tensor, expert_ids_TK: torch.Tensor) -> torch.Tensor:
    """E * sum_e f_e * P_e.

    f_e: share of tokens with e among their top-k choices, before dropping (so sum_e f_e = k);
    P_e: mean router probability of e. Equals transformers' `load_balancing_loss_func` on one layer.
    Uniform routing gives k; its minimum.
    """
    T, E = probs_TE.shape
    if T == 0:
        return probs_TE.sum() * 0.0
    counts_E = torch.zeros(E, device=probs_TE.device, dtype=probs_TE.dtype)
    counts_E.index_add_(0, expert_ids_TK.reshape(-1),
                        torch.ones(expert_ids_TK.numel(), device=probs_TE.device, dtype=probs_TE.dtype))
    f_E = counts_E / T
    P_E = probs_TE.mean(0)
    return E * (f_E * P_E).sum()


def pooled_balance_loss(routing) -> torch.Tensor:
    """`load_balance_loss` over every layer's tokens at once (transformers' `load_balancing_loss_func`):
    f_e and P_e are averaged over (layer, token) pairs, so it is not the mean of the per-layer losses.
    `routing`: records with probs_TE and expert_ids_TK, all layers with the same E."""
    probs_NE = torch.cat([r.probs_TE for r in routing])
    return load_balance_loss(probs_NE, torch.cat([r.expert_ids_TK for r in routing]))


def router_z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """mean over tokens of logsumexp(logits)^2 (ST-MoE): keeps router logits small."""
    if logits_TE.shape[0] == 0:
        return logits_TE.sum() * 0.0
    return torch.logsumexp(logits_TE.float(), dim=-1).square().mean()
