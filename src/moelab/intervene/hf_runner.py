"""The model runs of the studies (runner.py's interface) for a transformers MoE model edited by hooks.

Legend: B batch rows, S sequence, T = B*S tokens, D model dim, E experts, K experts per token.

study.py and observe.py call these through the same names as runner.py's, so a study is written once.
Unlike runner.py, an ablation reruns the whole model: transformers' decoder loop cannot start at a block
without editing the model, so the activations below the ablated block are not reused. HF blocks are
dropless: the dropped share is 0 and the capacity argument `cf` is unused.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from moelab.intervene.edit import RoutingEdit
from moelab.intervene.hf_edit import HFMoE, edit_hf_routing, hf_moe
from moelab.intervene.runner import token_loss
from moelab.trace.adapters import _experts_args, _first_tensor


# Weak keys: a cache that held the model (an lru_cache did) kept a 7B model's GPU memory alive after its
# last user let go of it. The blocks found hold submodules, never the model, so the entry dies with it.
_FOUND: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _moe(model) -> HFMoE:
    if model not in _FOUND:
        _FOUND[model] = hf_moe(model)
    return _FOUND[model]


def layout(model) -> dict[int, tuple[int, int]]:
    """MoE block -> (experts, top_k)."""
    return _moe(model).layout()


def max_top_k(model) -> int:
    """The largest k a top-k sweep can set on every MoE block: a group limit leaves topk_group groups."""
    rules = _moe(model).rules.values()
    return min(r.num_experts // r.n_group * r.topk_group if r.n_group else r.num_experts for r in rules)


def logits(model, input_ids_BS: torch.Tensor, edits: dict[int, RoutingEdit]) -> torch.Tensor:
    with edit_hf_routing(model, edits, _moe(model)):
        return model(input_ids=input_ids_BS.long(), use_cache=False).logits


@torch.no_grad()
def ablation_losses(model, input_ids_BS, labels_BS, targets, cf=None, reuse: bool = True,
                    ablate_capacity: str = "recompute"):  # dropless: both capacity modes are the mask
    """Base per-token loss [B, S-1] and one per target (block, experts masked), a whole forward each."""
    base = token_loss(logits(model, input_ids_BS, {}), labels_BS)
    return base, [token_loss(logits(model, input_ids_BS, {b: RoutingEdit(mask=tuple(e))}), labels_BS)
                  for b, e in targets]


@torch.no_grad()
def edited_loss(model, input_ids_BS, labels_BS, edits: dict[int, RoutingEdit], cf=None) -> tuple[torch.Tensor, float]:
    """Per-token loss [B, S-1] under `edits`, and the share of choices dropped (none: dropless)."""
    return token_loss(logits(model, input_ids_BS, edits), labels_BS), 0.0


def sweep_loss(model, input_ids_BS, labels_BS, edit: RoutingEdit, cf=None) -> tuple[torch.Tensor, float]:
    return edited_loss(model, input_ids_BS, labels_BS, {b: edit for b in layout(model)}, cf)


@torch.no_grad()
def replay_pass(model, input_ids_BS, edits: dict[int, RoutingEdit], cf, keep_T: torch.Tensor):
    """(own logits, replayed logits, routes changed, routes counted) of one batch: only (token, layer)
    routes the replay covers at positions `keep_T` (inside the --tokens cut) are counted."""
    from moelab.intervene.replay import covered_routes

    moe = _moe(model)
    base = model(input_ids=input_ids_BS.long(), use_cache=False).logits
    with edit_hf_routing(model, edits, moe) as log:
        out = model(input_ids=input_ids_BS.long(), use_cache=False).logits
    changed = routes = 0
    for block, (own, new) in log.items():
        m_T = covered_routes(edits.get(block), keep_T.to(own.device))
        changed += int(((own.sort(-1).values != new.sort(-1).values).any(-1) & m_T).sum())
        routes += int(m_T.sum())
    return base, out, changed, routes


def _block_calls(model, input_ids_BS) -> dict[int, dict]:
    """Each MoE block's input and its experts module's (x_TD, ids_TK, weights_TK), unedited forward."""
    moe, seen, handles = _moe(model), {}, []

    def on_block(b):
        return lambda module, args, kwargs: seen.setdefault(b, {}).update(args=args, kwargs=kwargs)

    def on_experts(b):
        return lambda module, args, kwargs: seen.setdefault(b, {}).update(call=_experts_args(module, args, kwargs))

    try:
        for b, blk in moe.blocks.items():
            handles.append(blk.module.register_forward_pre_hook(on_block(b), with_kwargs=True))
            handles.append(blk.experts.register_forward_pre_hook(on_experts(b), with_kwargs=True))
        model(input_ids=input_ids_BS.long(), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return seen


@torch.no_grad()
def k_cosines(model, input_ids_BS, valid_T: torch.Tensor, cf=None) -> dict[int, dict[str, float]]:
    """Per MoE block, on its unedited input: mean cosine of the k=1 output with the model's own-k output
    and with the all-experts output, over the real tokens."""
    moe, out = _moe(model), {}
    for b, call in _block_calls(model, input_ids_BS).items():
        outputs = {}
        for name, k in (("k1", 1), ("own", None), ("all", moe.rules[b].num_experts)):
            with edit_hf_routing(model, {b: RoutingEdit(top_k=k)}, moe):
                y = _first_tensor(moe.blocks[b].module(*call["args"], **call["kwargs"]))
            outputs[name] = y.reshape(-1, y.shape[-1]).float()[valid_T]
        out[b] = {f"k1_vs_{name}": float(F.cosine_similarity(outputs["k1"], outputs[name], dim=-1).mean())
                  for name in ("own", "all")}
    return out


@torch.no_grad()
def expert_calls(model, input_ids_BS, cf=None):
    """Per MoE block: (E, x_TD, ids_TK, weights_TK, dropped_TK, expert_output(x_RD, e) -> y_RD)."""
    moe, out = _moe(model), {}
    for b, call in _block_calls(model, input_ids_BS).items():
        x_TD, ids, weights = call["call"]
        K = ids.shape[-1]
        ids_TK = ids.reshape(-1, K).long()
        experts = moe.blocks[b].experts

        def one_expert(x_RD, e, experts=experts):  # the experts module with every row sent to e at weight 1
            R = x_RD.shape[0]
            return experts(x_RD, torch.full((R, 1), e, dtype=ids.dtype, device=x_RD.device),
                           torch.ones(R, 1, dtype=weights.dtype, device=x_RD.device))

        out[b] = (moe.rules[b].num_experts, x_TD.reshape(-1, x_TD.shape[-1]), ids_TK, weights.reshape(-1, K),
                  torch.zeros_like(ids_TK, dtype=torch.bool), one_expert)
    return out
