"""The MoE layer: route -> drop -> dispatch -> experts -> combine.

Routing, drops and the sort by expert are one function (route_plan.py), compiled where that measured
faster (`model.compile_routing`).

Legend: T tokens (in (sequence, position) order), D model dim, E experts, K experts per token.
The shared expert is composed by the block (parallel or sequential), not here.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn as nn

from moelab.model.capacity import drop_rule
from moelab.model.config import ModelConfig
from moelab.model.dispatch import trimmed
from moelab.model.experts import GroupedExperts, output_std
from moelab.model.route_plan import compiled_plan, has_hooks, plan_from, use_compiled
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
        self.compile_routing = cfg.compile_routing  # route_plan.py: auto, on, off
        self.compile_backend = "inductor"  # torch.compile's; CPU tests use aot_eager (no C++ build)

    def forward(self, x_TD: torch.Tensor, state: Any = None, token_ids_T: torch.Tensor | None = None,
                capacity_factor: float | None = None) -> MoEOutput:
        if use_compiled(self.compile_routing, x_TD) and not has_hooks(self.router):
            rule = self._drop_rule(x_TD.shape[0], self.router.top_k, capacity_factor)
            p = compiled_plan(self.compile_backend)(self.router, self.router.jittered(x_TD), state,
                                                    token_ids_T, rule, self.num_experts)
        else:
            r = self.router(x_TD, state, token_ids_T)
            # K from the returned ids: a hook may have changed it (an intervention's top_k)
            rule = self._drop_rule(x_TD.shape[0], r.expert_ids_TK.shape[1], capacity_factor)
            p = plan_from(r, rule, self.num_experts)
        r = p.routing
        perm = trimmed(p.order_M, p.inv_TK, p.offs_E, dropping=rule is not None)
        keep_TK = None if rule is None else ~p.dropped_TK
        if isinstance(self.experts, GroupedExperts):
            y_TD = self.experts(x_TD, r.expert_ids_TK, p.weights_TK, keep_TK, perm=perm)
        else:  # a wrapper (expert parallelism) sorts the choices itself
            y_TD = self.experts(x_TD, r.expert_ids_TK, p.weights_TK, keep_TK)
        routing = LayerRouting(self.layer, r.expert_ids_TK, p.weights_TK, r.probs_TE, p.dropped_TK,
                               r.logits_TE)
        return MoEOutput(y_TD, routing, p.balance_loss, p.z_loss, r.state)

    def _drop_rule(self, num_tokens: int, top_k: int, capacity_factor: float | None):
        return drop_rule(num_tokens, self.num_experts, top_k, capacity_factor, formula=self.formula,
                         group_size=self.group_size, min_capacity=self.min_capacity, policy=self.policy)
