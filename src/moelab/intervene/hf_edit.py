"""Act on a transformers MoE model's routing from outside, hooks only: the model stays as transformers built it.

Legend: T tokens, E experts, K experts per token, G expert groups.

In transformers 5.x most MoE blocks call `router(x) -> (logits, weights, ids)` and then `experts(x, ids,
weights)` (the recorder's "experts_args" decision, trace/adapters.py). `edit_hf_routing` hooks both: a
forward hook on the router keeps its logits, and a forward pre-hook on the experts module replaces the ids
and weights with a selection recomputed from those logits by the family's own rule (`HFRule`): softmax or
sigmoid scores, a selection-only correction bias, group-limited top-k, renormalisation over the k, scaling.
The edits are moelab's `RoutingEdit` (mask, top_k, force_ids_TK) and mean what they mean on a moelab model.

The recomputation is checked on every call: the unedited rule must give back the ids and weights the
model chose itself, else the edit stops with one line. A family whose router does something the rule does
not say cannot then return a silently wrong answer. Families outside the two rules are refused up front.
HF MoE blocks are dropless, so capacity edits are refused too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from typing import Iterator, Mapping

import torch

from moelab.config import MoelabError
from moelab.intervene.edit import KEEP, RoutingEdit
from moelab.trace.adapters import (DSV3, SOFTMAX_TOPK, HFRoutingRecorder, _experts_args, _first_tensor,
                                   family_entry, text_model_type)


@dataclasses.dataclass(frozen=True)
class HFRule:
    """How a family's router turns its logits into (ids, weights)."""

    score: str  # "softmax" (over all experts) or "sigmoid"
    num_experts: int
    top_k: int
    renormalize: bool
    scaling: float = 1.0
    bias_E: torch.Tensor | None = None  # selection only (DeepSeek-V3's e_score_correction_bias)
    n_group: int = 0  # 0: no grouping step; DeepSeek-V3 runs it even with one group
    topk_group: int = 1
    eps: float = 0.0  # added to the renormalising sum (DeepSeek-V3: 1e-20)


def hf_rule(family: str, router: torch.nn.Module) -> HFRule:
    """The rule of a family's router, read from the router module; one line when moelab cannot redo it."""
    entry = family_entry(family)
    if entry.refuse:
        raise MoelabError(f"cannot edit the routing of {family!r}: {entry.refuse}")
    if entry.decision == "router_scores":
        raise MoelabError(f"cannot edit the routing of {family!r}: its router hands the experts dense scores, "
                          f"not (ids, weights) that a hook can replace ({entry.rule})")
    weight = getattr(router, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
        raise MoelabError(f"cannot edit the routing of {family!r}: its router ({type(router).__name__}) is not "
                          f"one linear map with an (experts, hidden) weight whose logits moelab can reselect from")
    E, K = int(weight.shape[0]), int(getattr(router, "top_k", 0))
    dsv3 = ("e_score_correction_bias", "num_group", "topk_group", "norm_topk_prob", "routed_scaling_factor")
    if entry.rule == DSV3:
        missing = [name for name in dsv3 if not hasattr(router, name)]
        if missing:
            raise MoelabError(f"cannot edit the routing of {family!r}: its DeepSeek-V3-style router "
                              f"({type(router).__name__}) lacks {', '.join(missing)}, so its rule is not the one "
                              f"moelab recomputes")
        return HFRule("sigmoid", E, K, bool(router.norm_topk_prob), float(router.routed_scaling_factor),
                      router.e_score_correction_bias, int(router.num_group), int(router.topk_group), 1e-20)
    if entry.score == "softmax" and entry.rule.startswith(SOFTMAX_TOPK) and "bias" not in entry.rule:
        renorm = getattr(router, "norm_topk_prob", True if family == "mixtral" else None)
        if renorm is not None and K:
            return HFRule("softmax", E, K, bool(renorm))
    raise MoelabError(f"cannot edit the routing of {family!r}: moelab recomputes softmax top-k and DeepSeek-V3 "
                      f"routers only, and this family routes by: {entry.rule}")


def _group_limited(choice_TE: torch.Tensor, n_group: int, topk_group: int) -> torch.Tensor:
    """DeepSeek-V3's group step as transformers runs it: keep the best `topk_group` groups by the sum of
    their two best selection scores."""
    T, E = choice_TE.shape
    group_TG = choice_TE.view(T, n_group, E // n_group).topk(2, dim=-1)[0].sum(dim=-1)
    keep_TG = torch.zeros_like(group_TG).scatter_(1, torch.topk(group_TG, topk_group, dim=-1, sorted=False)[1], 1)
    keep_TE = keep_TG.unsqueeze(-1).expand(-1, n_group, E // n_group).reshape(T, E)
    return choice_TE.masked_fill(~keep_TE.bool(), float("-inf"))


def select(rule: HFRule, logits_TE: torch.Tensor, edit: RoutingEdit) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids_TK, weights_TK) the family's rule gives from its logits under `edit` (weights carry gradient)."""
    logits_TE = logits_TE.float()
    masked_E = None
    if edit.mask:  # the expert deleted: -inf before the score function, and never selectable
        masked_E = torch.zeros(logits_TE.shape[-1], dtype=torch.bool, device=logits_TE.device)
        masked_E[list(edit.mask)] = True
        logits_TE = logits_TE.masked_fill(masked_E, float("-inf"))
    probs_TE = torch.softmax(logits_TE, dim=-1) if rule.score == "softmax" else torch.sigmoid(logits_TE)
    choice_TE = probs_TE if rule.bias_E is None else probs_TE + rule.bias_E
    if masked_E is not None:
        choice_TE = choice_TE.masked_fill(masked_E, float("-inf"))
    if rule.n_group:
        choice_TE = _group_limited(choice_TE, rule.n_group, rule.topk_group)
    k = edit.top_k if edit.top_k is not None else rule.top_k
    chosen_TK, ids_TK = torch.topk(choice_TE.detach(), k, dim=-1, sorted=not rule.n_group)
    if edit.force_ids_TK is not None:
        force_TK = edit.force_ids_TK.to(ids_TK.device)
        if force_TK.shape != ids_TK.shape:
            raise MoelabError(f"forced expert ids have shape {tuple(force_TK.shape)}, the router call routes "
                              f"{tuple(ids_TK.shape)} (tokens, top_k)")
        normal_T1 = (force_TK < 0).any(-1, keepdim=True)
        ids_TK = torch.where(normal_T1, ids_TK, force_TK.long())
        chosen_TK = chosen_TK.masked_fill(~normal_T1, 0.0)
    if torch.isinf(chosen_TK).any():
        raise MoelabError(f"top_k={k} chooses an expert the mask or the group limit removed: fewer experts left")
    weights_TK = probs_TE.gather(-1, ids_TK)
    if rule.renormalize:
        weights_TK = weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + rule.eps)
    return ids_TK, weights_TK * rule.scaling  # x 1.0 is exact: one expression for every family


def check_edit(rule: HFRule, block: int, edit: RoutingEdit) -> None:
    E, where = rule.num_experts, f"block {block}"
    if edit.capacity_factor != KEEP or edit.drop_policy is not None:
        raise MoelabError("transformers MoE blocks are dropless: capacity edits are not available with --hf")
    bad = [e for e in edit.mask if not 0 <= int(e) < E]
    if bad:
        raise MoelabError(f"expert {bad[0]} is out of range for {where} (experts 0..{E - 1})")
    left = E - len(set(edit.mask))
    if left < 1:
        raise MoelabError(f"masking every expert of {where} leaves nothing to route to")
    k = edit.top_k if edit.top_k is not None else rule.top_k
    if not 1 <= k <= left:
        raise MoelabError(f"top_k={k} is out of range for {where} ({E} experts, {E - left} masked)")
    f = edit.force_ids_TK
    if f is not None and f.numel() and (int(f.max()) >= E or int(f.min()) < -1):
        raise MoelabError(f"forced expert ids of {where} hold values outside -1..{E - 1}")


@dataclasses.dataclass
class HFMoE:
    """The MoE blocks of a transformers model, each with its router, experts module and rule."""

    family: str
    num_layers: int
    blocks: dict  # block index -> trace.adapters.MoEBlock
    rules: dict  # block index -> HFRule

    def layout(self) -> dict[int, tuple[int, int]]:
        return {b: (r.num_experts, r.top_k) for b, r in self.rules.items()}


def hf_moe(model: torch.nn.Module, model_type: str | None = None) -> HFMoE:
    """Find the blocks (the recorder's discovery, so trace and intervene agree on them) and their rules."""
    family = model_type or text_model_type(model)
    entry = family_entry(family)
    if entry.refuse:
        raise MoelabError(f"cannot edit the routing of {family!r}: {entry.refuse}")
    found = HFRoutingRecorder(model, family).blocks  # no hooks until entered
    rules = {b.block: hf_rule(family, b.router) for b in found}
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return HFMoE(family, int(cfg.num_hidden_layers), {b.block: b for b in found}, rules)


def _replace_args(module, args, kwargs, ids_TK, weights_TK):
    if len(args) >= 3:
        return (args[0], ids_TK, weights_TK, *args[3:]), kwargs
    bound = inspect.signature(module.forward).bind(*args, **kwargs)
    names = list(bound.arguments)
    bound.arguments[names[1]], bound.arguments[names[2]] = ids_TK, weights_TK
    return bound.args, bound.kwargs


class _Hooks:
    """The per-context state of one edited block: the router's last logits and the routes it changed."""

    def __init__(self, moe: HFMoE, block: int, edit: RoutingEdit, log: dict):
        self.moe, self.block, self.edit, self.log = moe, block, edit, log
        self.rule = moe.rules[block]
        self.logits_TE = None

    def on_router(self, module, args, out):
        first = _first_tensor(out)
        self.logits_TE = first.reshape(-1, first.shape[-1])

    def on_experts(self, module, args, kwargs):
        _, own_ids, own_weights = _experts_args(module, args, kwargs)
        if self.logits_TE is None:
            raise MoelabError(f"block {self.block}: the experts ran before the router in this forward")
        logits_TE, self.logits_TE = self.logits_TE, None
        K = own_ids.shape[-1]
        with torch.no_grad():
            ids_TK, w_TK = select(self.rule, logits_TE, RoutingEdit())
        same = torch.equal(ids_TK.sort(-1).values, own_ids.reshape(-1, K).long().sort(-1).values) and torch.allclose(
            w_TK.sort(-1).values.to(own_weights.dtype), own_weights.reshape(-1, K).sort(-1).values,
            rtol=1e-3, atol=1e-6)
        if not same:
            raise MoelabError(f"cannot edit the routing of {self.moe.family!r}: moelab's recomputation of block "
                              f"{self.block}'s routing differs from the model's own choice")
        ids_TK, w_TK = select(self.rule, logits_TE, self.edit)
        self.log[self.block] = (own_ids.reshape(-1, K).detach(), ids_TK.detach())
        return _replace_args(module, args, kwargs, ids_TK.to(own_ids.dtype), w_TK.to(own_weights.dtype))


@contextlib.contextmanager
def edit_hf_routing(model: torch.nn.Module, edits: Mapping[int, RoutingEdit],
                    moe: HFMoE | None = None) -> Iterator[dict]:
    """Within the block, each named MoE block of a transformers model routes as its edit says. Yields a
    dict block -> (own ids_TK, edited ids_TK) of the last call, for counting changed routes."""
    moe = moe or hf_moe(model)
    for block, edit in edits.items():
        if block not in moe.rules:
            raise MoelabError(f"block {block} is not an MoE layer (MoE blocks: {sorted(moe.rules)})")
        check_edit(moe.rules[block], block, edit)
    log: dict = {}
    handles = []
    try:
        for block, edit in edits.items():
            hooks = _Hooks(moe, block, edit, log)
            handles.append(moe.blocks[block].router.register_forward_hook(hooks.on_router))
            handles.append(moe.blocks[block].experts.register_forward_pre_hook(hooks.on_experts, with_kwargs=True))
        yield log
    finally:
        for h in handles:
            h.remove()
