"""The MoE layer: route -> drop -> dispatch -> experts -> combine.

Legend: T tokens (in (sequence, position) order), D model dim, E experts, K experts per token.
The shared expert is composed by the block (parallel or sequential), not here.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn as nn

from moelab.model.capacity import drop_mask
from moelab.model.config import ModelConfig
from moelab.model.experts import GroupedExperts, output_std
from moelab.model.losses import load_balance_loss, router_z_loss
from moelab.model.routers import Router


class LayerRouting(NamedTuple):
    """What one MoE layer decided for each token; returned with `return_routing=True`."""

    layer: int  # block index
    expert_ids_TK: torch.Tensor  # rank order
    weights_TK: torch.Tensor  # combine weights actually applied (0 where dropped)
    probs_TE: torch.Tensor  # full router probabilities
    dropped_TK: torch.Tensor  # True where the choice lost its place to capacity
    logits_TE: torch.Tensor


class MoEOutput(NamedTuple):
    y_TD: torch.Tensor
    routing: LayerRouting
    balance_loss: torch.Tensor
    z_loss: torch.Tensor
    state: Any


class MoELayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, num_experts: int, router: Router):
        super().__init__()
        m = cfg.moe
        self.layer, self.num_experts = layer, num_experts
        self.formula, self.group_size = m.capacity_formula, m.group_size
        self.min_capacity, self.policy = m.min_capacity, m.drop_policy
        self.router = router
        self.experts = GroupedExperts(num_experts, cfg.d_model, cfg.expert_hidden, cfg.ffn_kind,
                                      cfg.init_std, output_std(cfg.init_std, cfg.n_layers))

    def forward(self, x_TD: torch.Tensor, state: Any = None, token_ids_T: torch.Tensor | None = None,
                capacity_factor: float | None = None) -> MoEOutput:
        r = self.router(x_TD, state, token_ids_T)
        scores_TK = r.probs_TE.gather(-1, r.expert_ids_TK)
        dropped_TK = drop_mask(r.expert_ids_TK, scores_TK, self.num_experts, capacity_factor,
                               formula=self.formula, group_size=self.group_size,
                               min_capacity=self.min_capacity, policy=self.policy)
        weights_TK = r.weights_TK.masked_fill(dropped_TK, 0.0)
        keep_TK = None if capacity_factor is None else ~dropped_TK
        y_TD = self.experts(x_TD, r.expert_ids_TK, weights_TK, keep_TK)
        routing = LayerRouting(self.layer, r.expert_ids_TK, weights_TK, r.probs_TE, dropped_TK,
                               r.logits_TE)
        return MoEOutput(y_TD, routing, load_balance_loss(r.probs_TE, r.expert_ids_TK),
                         router_z_loss(r.logits_TE), r.state)
