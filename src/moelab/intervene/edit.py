"""Act on routing from outside: a context manager that replaces what a router returns, then restores.

Legend: T tokens, E experts, K experts per token.

`edit_routing(model, {block: RoutingEdit(...)})` hooks the router of each named MoE block. The hook takes
the router's own `Routing` and redoes only the selection from its logits, so everything the model does
after selection (capacity, dispatch, combine) runs unchanged on the new value. The model gains no flags:
capacity is a call argument (rewritten by a pre-hook) and the drop policy an existing attribute, put back
on exit even after an error.

- `mask`: experts removed from selection. Their logits become -inf before the score function, which is
  the model with the expert deleted (softmax renormalises over the rest; sigmoid leaves the rest as they
  are); the weights are then formed as the router forms them (gather, renormalise or not, scale).
- `top_k`: a different number of experts per token.
- `force_ids_TK`: router replay. A row of ids replaces the selection of its token; a row holding any -1
  routes normally. The weights are gathered from the router's own full probabilities, so a backward pass
  still reaches the router.
- `capacity_factor` / `drop_policy`: capacity at inference (`NONE_CF` = dropless).
- `capacity_experts`: slots per expert computed as a layer with this many experts computes them (a model
  built without the masked experts has more slots for each remaining one). `removal(...)` builds the mask
  edit of `--ablate-capacity recompute` (the default) or `keep` (the E-expert capacity).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Iterator, Mapping

import torch

from moelab.config import MoelabError
from moelab.model.capacity import POLICIES
from moelab.model.moe import MoELayer
from moelab.model.routers import Router, Routing, group_limited, top_k_stable

KEEP = "keep"  # capacity_factor sentinel: the value the caller passed
NONE_CF = None  # dropless


@dataclasses.dataclass(frozen=True)
class RoutingEdit:
    mask: tuple[int, ...] = ()
    top_k: int | None = None
    force_ids_TK: torch.Tensor | None = None
    capacity_factor: float | str | None = KEEP
    drop_policy: str | None = None
    capacity_experts: int | None = None


ABLATE_CAPACITY = ("recompute", "keep")


def removal(layer_experts: int, experts, mode: str = "recompute") -> RoutingEdit:
    """The edit that removes `experts`: `recompute` = the model built without them (its capacity from the
    experts left), `keep` = the mask alone, capacity still computed from all of them."""
    if mode not in ABLATE_CAPACITY:
        raise MoelabError(f"--ablate-capacity {mode!r}: allowed are {', '.join(ABLATE_CAPACITY)}")
    mask = tuple(sorted(set(experts)))
    return RoutingEdit(mask=mask, capacity_experts=layer_experts - len(mask) if mode == "recompute" else None)


def moe_blocks(model: torch.nn.Module) -> dict[int, MoELayer]:
    """Block index -> MoE layer of a moelab decoder."""
    return {m.layer: m for m in model.modules() if isinstance(m, MoELayer)}


def check_edit(layer: MoELayer, edit: RoutingEdit) -> None:
    E, where = layer.num_experts, f"block {layer.layer}"
    bad = [e for e in edit.mask if not 0 <= int(e) < E]
    if bad:
        raise MoelabError(f"expert {bad[0]} is out of range for {where} (experts 0..{E - 1})")
    if len(set(edit.mask)) >= E:
        raise MoelabError(f"masking every expert of {where} leaves nothing to route to")
    k = edit.top_k if edit.top_k is not None else layer.router.top_k
    if not 1 <= k <= E - len(set(edit.mask)):
        raise MoelabError(f"top_k={k} is out of range for {where} ({E} experts, {len(set(edit.mask))} masked)")
    if edit.drop_policy is not None and edit.drop_policy not in POLICIES:
        raise MoelabError(f"drop policy {edit.drop_policy!r} is unknown (allowed: {', '.join(POLICIES)})")
    f = edit.force_ids_TK
    if f is not None and f.numel() and (int(f.max()) >= E or int(f.min()) < -1):
        raise MoelabError(f"forced expert ids of {where} hold values outside -1..{E - 1}")


def reselect(router: Router, r: Routing, edit: RoutingEdit) -> Routing:
    """The router's decision redone from its logits under `edit` (pure; the router is only read)."""
    logits_TE = r.logits_TE
    if edit.mask:
        masked_E = torch.zeros(logits_TE.shape[-1], dtype=torch.bool, device=logits_TE.device)
        masked_E[list(edit.mask)] = True
        logits_TE = logits_TE.masked_fill(masked_E, float("-inf"))
    sigmoid = router.score_fn == "sigmoid"
    probs_TE = torch.sigmoid(logits_TE) if sigmoid else torch.softmax(logits_TE, dim=-1)
    select_TE = probs_TE + router.selection_bias_E if router.use_bias else probs_TE
    if edit.mask:
        select_TE = select_TE.masked_fill(masked_E, float("-inf"))
    if router.n_group > 1:
        select_TE = group_limited(select_TE, router.n_group, router.topk_group)
    k = edit.top_k if edit.top_k is not None else router.top_k
    ids_TK = top_k_stable(select_TE.detach(), k)
    if edit.force_ids_TK is not None:
        ids_TK = _forced(ids_TK, edit.force_ids_TK.to(ids_TK.device))
    weights_TK = probs_TE.gather(-1, ids_TK)
    if router.renormalize:
        weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True).clamp_min(1e-20)
    if router.scaling != 1.0:
        weights_TK = weights_TK * router.scaling
    return Routing(ids_TK, weights_TK, logits_TE, probs_TE, r.state)


def _forced(ids_TK: torch.Tensor, force_TK: torch.Tensor) -> torch.Tensor:
    if force_TK.shape != ids_TK.shape:
        raise MoelabError(f"forced expert ids have shape {tuple(force_TK.shape)}, the router call "
                          f"routes {tuple(ids_TK.shape)} (tokens, top_k)")
    normal_T1 = (force_TK < 0).any(-1, keepdim=True)
    return torch.where(normal_T1, ids_TK, force_TK.long())


def _router_hook(edit: RoutingEdit):
    def hook(router, args, output):
        return reselect(router, output, edit)
    return hook


def _capacity_hook(cf):
    def hook(module, args, kwargs):
        if "capacity_factor" in kwargs:
            return args, {**kwargs, "capacity_factor": cf}
        args = tuple(args) + (None,) * (4 - len(args))
        return args[:3] + (cf,) + args[4:], kwargs
    return hook


def _capacity_experts_hook(num_experts: int, top_k: int):
    """Rewrites the call's capacity factor to the one that, in the layer's own E-expert formula, yields
    the slots a `num_experts`-expert layer has at this token count. The target sits mid-way between
    integers before floor/round, so float rounding cannot move it by one slot."""
    def hook(module, args, kwargs):
        args = tuple(args) + (None,) * (4 - len(args))
        cf = kwargs.get("capacity_factor", args[3])
        if cf is None:
            return None  # dropless: no capacity to recompute
        E, T = module.num_experts, args[0].shape[0]
        if module.formula == "group":
            cf_new = (round(cf * module.group_size / num_experts) + 0.25) * E / module.group_size
        else:
            cf_new = (math.floor(top_k * cf * T / num_experts) + 0.5) * E / (top_k * T)
        if "capacity_factor" in kwargs:
            return args[:4], {**kwargs, "capacity_factor": cf_new}
        return args[:3] + (cf_new,), kwargs
    return hook


@contextlib.contextmanager
def edit_routing(model: torch.nn.Module, edits: Mapping[int, RoutingEdit]) -> Iterator[None]:
    """Within the block, the MoE layer of each block index in `edits` routes as its edit says."""
    layers = moe_blocks(model)
    for block, edit in edits.items():
        if block not in layers:
            raise MoelabError(f"block {block} is not an MoE layer (MoE blocks: {sorted(layers)})")
        check_edit(layers[block], edit)
    handles, policies = [], {}
    try:
        for block, edit in edits.items():
            layer = layers[block]
            if edit.mask or edit.top_k is not None or edit.force_ids_TK is not None:
                handles.append(layer.router.register_forward_hook(_router_hook(edit)))
            if edit.capacity_factor != KEEP:
                handles.append(layer.register_forward_pre_hook(_capacity_hook(edit.capacity_factor),
                                                               with_kwargs=True))
            # after a capacity_factor edit: it recomputes from the factor that edit set
            if edit.capacity_experts is not None:
                k = edit.top_k if edit.top_k is not None else layer.router.top_k
                handles.append(layer.register_forward_pre_hook(
                    _capacity_experts_hook(edit.capacity_experts, k), with_kwargs=True))
            if edit.drop_policy is not None:
                policies[block] = layer.policy
                layer.policy = edit.drop_policy
        yield
    finally:
        for h in handles:
            h.remove()
        for block, policy in policies.items():
            layers[block].policy = policy
