"""Expert capacity and token dropping: pure functions on (T x K) expert ids and scores.

No tensor of size tokens x experts x capacity is ever built: each choice's place in its expert's queue is
its rank within a stable sort by (group, expert) of the choices laid out in the policy's priority order.
Tokens are in (sequence, position) order, as the decoder flattens its batch.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

FORMULAS = ("group", "topk")
POLICIES = ("openmoe", "score")


def expert_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float,
                    formula: str = "topk", group_size: int = 4096, min_capacity: int = 4) -> int:
    """Slots per expert (per group for `group`).

    `group` (OpenMoE's JAX code): round(cf * G / E), no factor k.
    `topk` (its PyTorch port): floor(k * cf * N / E) over the N tokens of the batch, rounded up to even.
    Both at least `min_capacity`. `round` is Python's (half to even), as numpy's.
    """
    if formula == "group":
        cap = round(capacity_factor * group_size / num_experts)
    elif formula == "topk":
        cap = math.floor(top_k * capacity_factor * num_tokens / num_experts)
        cap += cap % 2
    else:
        raise ValueError(f"capacity formula {formula!r} is unknown (allowed: {', '.join(FORMULAS)})")
    return max(cap, min_capacity)


def priority_order(scores_TK: torch.Tensor, policy: str) -> torch.Tensor:
    """Flat choice indices (t * K + k) in the order choices claim their expert's slots.

    `openmoe`: all rank-0 choices before any rank-1 choice; within a rank, tokens in order.
    `score`: highest router probability first; ties by (rank, token).
    """
    T, K = scores_TK.shape
    device = scores_TK.device
    # Rank-major layout: position j = k * T + t holds choice (t, k).
    rank_major = torch.arange(T * K, device=device).view(T, K).t().reshape(-1)
    if policy == "openmoe":
        return rank_major
    if policy == "score":
        s = scores_TK.detach().t().reshape(-1)
        return rank_major[torch.sort(s, descending=True, stable=True).indices]
    raise ValueError(f"drop policy {policy!r} is unknown (allowed: {', '.join(POLICIES)})")


def slot_positions(expert_ids_TK: torch.Tensor, order: torch.Tensor, num_experts: int,
                   group_size: int | None = None) -> torch.Tensor:
    """For each choice (T x K), how many earlier choices (in `order`) went to the same expert and group."""
    T, K = expert_ids_TK.shape
    flat = expert_ids_TK.reshape(-1)
    key = flat
    if group_size is not None:
        group = torch.arange(T, device=flat.device).repeat_interleave(K) // group_size
        key = group * num_experts + flat
    key_ordered = key[order]
    sort = torch.sort(key_ordered, stable=True)
    # Each run's first index by a search of the sorted keys: no bincount sized by key.max(), which is a
    # host sync (and a graph break under torch.compile).
    starts = torch.searchsorted(sort.values, sort.values)
    pos_sorted = torch.arange(key.numel(), device=flat.device) - starts
    pos_ordered = torch.empty_like(pos_sorted)
    pos_ordered[sort.indices] = pos_sorted
    pos_flat = torch.empty_like(pos_ordered)
    pos_flat[order] = pos_ordered
    return pos_flat.view(T, K)


def drop_mask(expert_ids_TK: torch.Tensor, scores_TK: torch.Tensor, num_experts: int,
              capacity_factor: float | None, *, formula: str = "topk", group_size: int = 4096,
              min_capacity: int = 4, policy: str = "openmoe") -> torch.Tensor:
    """Bool (T x K): True where a choice lost its place to capacity. None capacity: nothing drops."""
    T, K = expert_ids_TK.shape
    rule = drop_rule(T, num_experts, K, capacity_factor, formula=formula, group_size=group_size,
                     min_capacity=min_capacity, policy=policy)
    if rule is None:
        return torch.zeros(T, K, dtype=torch.bool, device=expert_ids_TK.device)
    return drop_mask_at(expert_ids_TK, scores_TK, num_experts, rule)


class DropRule(NamedTuple):
    """A capacity already computed for the call's token count: plain values, so a compiled routing
    function specialises on them instead of recomputing them from a traced shape."""

    capacity: int  # slots per expert (per group when group_size is set)
    policy: str
    group_size: int | None  # None: one queue per expert over the whole batch (the `topk` formula)


def drop_rule(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float | None, *,
              formula: str = "topk", group_size: int = 4096, min_capacity: int = 4,
              policy: str = "openmoe") -> DropRule | None:
    """The rule `drop_mask` applies to a call of `num_tokens` tokens; None: nothing drops."""
    if capacity_factor is None or num_tokens == 0:
        return None
    cap = expert_capacity(num_tokens, num_experts, top_k, capacity_factor, formula, group_size, min_capacity)
    return DropRule(cap, policy, group_size if formula == "group" else None)


def drop_mask_at(expert_ids_TK: torch.Tensor, scores_TK: torch.Tensor, num_experts: int,
                 rule: DropRule) -> torch.Tensor:
    """Bool (T x K): True where a choice finds its expert's `rule.capacity` slots taken."""
    order = priority_order(scores_TK, rule.policy)
    return slot_positions(expert_ids_TK, order, num_experts, rule.group_size) >= rule.capacity

