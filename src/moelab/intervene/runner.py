"""Run a moelab decoder under routing edits over batches: per-token losses, reusing what an edit cannot change.

Legend: B batch rows, S sequence, T = B*S tokens, D model dim, V vocabulary, E experts, K experts per token.

An edit of block l cannot change blocks 0..l-1, so `prefix` runs them once per batch and `suffix` runs only
blocks l.. per edit: ablating E experts of a layer costs one prefix plus E suffixes, not E whole passes.
The two halves together are the decoder's own forward (tests hold them to its logits exactly).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from moelab.intervene.edit import RoutingEdit, edit_routing, moe_blocks, removal
from moelab.model.moe import MoELayer


class Prefix(NamedTuple):
    x_BSD: torch.Tensor  # residual stream entering block `first`
    state: Any  # recurrent router state entering block `first`
    token_ids_T: torch.Tensor
    rope: tuple[torch.Tensor, torch.Tensor]
    first: int


@torch.no_grad()
def prefix(model, input_ids_BS: torch.Tensor, first: int, cf) -> Prefix:
    """Embed and run blocks 0..first-1 (the activations every edit at or above `first` shares)."""
    S = input_ids_BS.shape[1]
    input_ids_BS = input_ids_BS.long()
    rope = (model.rope_cos[:S], model.rope_sin[:S])
    start = Prefix(model.embed(input_ids_BS), None, input_ids_BS.reshape(-1), rope, 0)
    return advance(model, start, first, cf)


@torch.no_grad()
def advance(model, pre: Prefix, first: int, cf) -> Prefix:
    """Run blocks pre.first..first-1 on top of a prefix."""
    x_BSD, state = pre.x_BSD, pre.state
    for block in model.blocks[pre.first:first]:
        x_BSD, _, state = block(x_BSD, pre.rope, None, 0, state, pre.token_ids_T, cf)
    return pre._replace(x_BSD=x_BSD, state=state, first=first)


@torch.no_grad()
def suffix(model, pre: Prefix, cf) -> torch.Tensor:
    """Blocks first.. and the head: logits [B, S, V]."""
    x_BSD, state = pre.x_BSD, pre.state
    for block in model.blocks[pre.first:]:
        x_BSD, _, state = block(x_BSD, pre.rope, None, 0, state, pre.token_ids_T, cf)
    h_BSD = model.norm(x_BSD)
    return h_BSD @ model.embed.weight.t() if model.head is None else model.head(h_BSD)


def token_loss(logits_BSV: torch.Tensor, labels_BS: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of predicting labels[:, t+1] at t, [B, S-1]; nan where the label is ignored (-100)."""
    V = logits_BSV.shape[-1]
    target_BS = labels_BS[:, 1:].to(logits_BSV.device)
    loss = F.cross_entropy(logits_BSV[:, :-1].reshape(-1, V).float(), target_BS.reshape(-1),
                           ignore_index=-100, reduction="none").view(target_BS.shape)
    return loss.masked_fill(target_BS == -100, float("nan"))


@torch.no_grad()
def ablation_losses(model, input_ids_BS, labels_BS, targets: list[tuple[int, tuple[int, ...]]], cf,
                    reuse: bool = True, ablate_capacity: str = "recompute") -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Base per-token loss [B, S-1] and one per target (block, experts removed; `ablate_capacity` as in
    edit.removal). `reuse=False` runs the whole model per target (the reference the benchmark compares
    against)."""
    layers = moe_blocks(model)
    pre = prefix(model, input_ids_BS, targets[0][0] if reuse and targets else 0, cf)
    base = token_loss(suffix(model, pre, cf), labels_BS)  # the unedited forward, split where edits begin
    out = []
    for block, experts in targets:
        if reuse and block != pre.first:  # sorted by block, the shared activations only move forward
            pre = advance(model, pre, block, cf) if block > pre.first else prefix(model, input_ids_BS, block, cf)
        cached = pre if reuse else prefix(model, input_ids_BS, 0, cf)
        with edit_routing(model, {block: removal(layers[block].num_experts, experts, ablate_capacity)}):
            out.append(token_loss(suffix(model, cached, cf), labels_BS))
    return base, out


@torch.no_grad()
def layer_inputs(model, input_ids_BS, cf) -> dict[int, tuple]:
    """Each MoE block's call arguments (x_TD, state, token_ids_T) in the unedited forward."""
    seen: dict[int, tuple] = {}

    def grab(module: MoELayer, args, kwargs):
        seen[module.layer] = tuple(args[:3])

    handles = [m.register_forward_pre_hook(grab, with_kwargs=True) for m in moe_blocks(model).values()]
    try:
        model(input_ids_BS, capacity_factor=cf)
    finally:
        for h in handles:
            h.remove()
    return seen


@torch.no_grad()
def k_cosines(model, input_ids_BS, valid_T: torch.Tensor, cf) -> dict[int, dict[str, float]]:
    """Per MoE block, on its unedited input: mean cosine of the k=1 output with the model's own-k output
    and with the all-experts (k=E) output, over the real tokens."""
    out = {}
    layers = moe_blocks(model)
    for block, args in layer_inputs(model, input_ids_BS, cf).items():
        layer = layers[block]
        outputs = {}
        for name, k in (("k1", 1), ("own", None), ("all", layer.num_experts)):
            with edit_routing(model, {block: RoutingEdit(top_k=k)}):
                outputs[name] = layer(*args, capacity_factor=cf).y_TD.float()[valid_T]
        out[block] = {f"k1_vs_{name}": float(F.cosine_similarity(outputs["k1"], outputs[name], dim=-1).mean())
                      for name in ("own", "all")}
    return out


def layout(model) -> dict[int, tuple[int, int]]:
    """MoE block -> (experts, top_k)."""
    return {b: (m.num_experts, m.router.top_k) for b, m in moe_blocks(model).items()}


def max_top_k(model) -> int:
    """The largest k a top-k sweep can set on every MoE block."""
    return min(m.num_experts for m in moe_blocks(model).values())


@torch.no_grad()
def edited_loss(model, input_ids_BS, labels_BS, edits: dict[int, RoutingEdit], cf) -> tuple[torch.Tensor, float]:
    """Per-token loss [B, S-1] under `edits`, and the share of choices dropped."""
    with edit_routing(model, edits):
        out = model(input_ids_BS, capacity_factor=cf, return_routing=True)
    dropped = torch.stack([r.dropped_TK.float().mean() for r in out.routing]).mean()
    return token_loss(out.logits, labels_BS), float(dropped)


def sweep_loss(model, input_ids_BS, labels_BS, edit: RoutingEdit, cf) -> tuple[torch.Tensor, float]:
    """Per-token loss [B, S-1] with `edit` on every MoE block, and the share of choices dropped."""
    return edited_loss(model, input_ids_BS, labels_BS, {b: edit for b in moe_blocks(model)}, cf)


@torch.no_grad()
def replay_pass(model, input_ids_BS, edits: dict[int, RoutingEdit], cf, keep_T: torch.Tensor):
    """(own logits, replayed logits, routes changed, routes counted) of one batch: only (token, layer)
    routes the replay covers at positions `keep_T` (inside the --tokens cut) are counted."""
    from moelab.intervene.replay import covered_routes

    base = model(input_ids_BS, capacity_factor=cf, return_routing=True)
    with edit_routing(model, edits):
        out = model(input_ids_BS, capacity_factor=cf, return_routing=True)
    changed = routes = 0
    for block, r0, r1 in zip(moe_blocks(model), base.routing, out.routing):
        m_T = covered_routes(edits.get(block), keep_T.to(r0.expert_ids_TK.device))
        differs_T = (r0.expert_ids_TK.sort(-1).values != r1.expert_ids_TK.sort(-1).values).any(-1)
        changed += int((differs_T & m_T).sum())
        routes += int(m_T.sum())
    return base.logits, out.logits, changed, routes


@torch.no_grad()
def expert_calls(model, input_ids_BS, cf):
    """Per MoE block: (E, x_TD, ids_TK, weights_TK, dropped_TK, expert_output(x_RD, e) -> y_RD)."""
    seen: dict[int, tuple] = {}
    layers = moe_blocks(model)

    def grab(module, args, output):
        r = output.routing
        seen[module.layer] = (module.num_experts, args[0], r.expert_ids_TK, r.weights_TK, r.dropped_TK,
                              module.experts.expert_output)

    handles = [m.register_forward_hook(grab) for m in layers.values()]
    try:
        model(input_ids_BS, capacity_factor=cf)
    finally:
        for h in handles:
            h.remove()
    return seen
