"""edit_routing against hand-built references: a deleted expert, the model's own routing, its own k."""

import copy

import pytest
import torch

from moelab.config import MoelabError
from moelab.intervene.edit import RoutingEdit, edit_routing, moe_blocks
from moelab.model.config import ModelConfig, MoEConfig, RouterConfig
from moelab.model.transformer import build_model


def tiny(router="linear", **moe):
    base = dict(num_experts=6, top_k=2, moe_every=1, expert_hidden=16, capacity_factor_eval=None)
    base.update(moe)
    rkw = dict(kind=router, hidden=8) if router in ("rmoe", "mlp", "cosine") else dict(kind=router)
    rkw.update(base.pop("router_kw", {}))
    cfg = ModelConfig(vocab_size=40, d_model=16, n_layers=3, n_heads=2, ffn_hidden=32, max_seq_len=32,
                      moe=MoEConfig(router=RouterConfig(**rkw), **base))
    return build_model(cfg, seed=0).eval()


IDS = torch.randint(0, 40, (3, 10), generator=torch.Generator().manual_seed(1))


def deleted_expert_reference(model, block, e):
    """The same model with expert e's weights zeroed and its router logit forced to -inf."""
    ref = copy.deepcopy(model)
    layer = moe_blocks(ref)[block]
    with torch.no_grad():
        for w in layer.experts.parameters():
            w[e].zero_()
    score = layer.router.score

    def score_without_e(x_TD, state, token_ids_T):
        logits_TE, new_state = score(x_TD, state, token_ids_T)
        logits_TE = logits_TE.clone()
        logits_TE[:, e] = float("-inf")
        return logits_TE, new_state

    layer.router.score = score_without_e
    return ref


@pytest.mark.parametrize("router,moe", [
    ("linear", {}),
    ("linear", {"router_kw": {"renormalize": True}}),
    ("linear", {"router_kw": {"score": "sigmoid", "renormalize": True}}),
    ("rmoe", {}),
    ("linear", {"capacity_factor_eval": 1.0}),
    ("linear", {"router_kw": {"score": "sigmoid", "renormalize": True, "bias_balance": True, "n_group": 2,
                              "topk_group": 1, "routed_scaling_factor": 2.5}}),  # DeepSeek-V3's router
])
def test_ablation_equals_deleted_expert(router, moe):
    model = tiny(router, **moe)
    for m in model.moe_layers():  # a selection bias that matters (zero at initialisation)
        m.router.selection_bias_E.copy_(torch.linspace(-0.05, 0.05, 6))
    base = model(IDS).logits
    ref = deleted_expert_reference(model, 1, 3)(IDS).logits
    with edit_routing(model, {1: RoutingEdit(mask=(3,))}):
        out = model(IDS, return_routing=True)
    torch.testing.assert_close(out.logits, ref, rtol=0, atol=1e-6)
    assert not (out.routing[1].expert_ids_TK == 3).any()
    assert not torch.allclose(out.logits, base)  # the expert mattered, so the test can fail
    assert torch.equal(model(IDS).logits, base)  # restored on exit
    assert all(not m.router._forward_hooks for m in model.moe_layers())


def test_replay_of_own_routing_is_exact_and_trains_the_router():
    model = tiny(capacity_factor_eval=1.0).train()
    model.config.moe.router.jitter = 0.0
    out = model(IDS, labels=IDS, return_routing=True, capacity_factor=1.0)
    out.loss.backward()
    grad = moe_blocks(model)[1].router.weight_ED.grad.clone()
    model.zero_grad()
    edits = {r.layer: RoutingEdit(force_ids_TK=r.expert_ids_TK) for r in out.routing}
    with edit_routing(model, edits):
        replayed = model(IDS, labels=IDS, capacity_factor=1.0)
    assert torch.equal(replayed.logits, out.logits)
    replayed.loss.backward()
    assert torch.equal(moe_blocks(model)[1].router.weight_ED.grad, grad)
    assert grad.abs().sum() > 0


def test_replay_with_one_token_changed_in_the_last_layer_changes_only_that_token():
    model = tiny()
    out = model(IDS, return_routing=True)
    last = out.routing[-1]
    forced_TK = torch.full_like(last.expert_ids_TK, -1)
    t = 13  # sequence 1, position 3
    forced_TK[t] = torch.tensor([e for e in range(6) if e not in last.expert_ids_TK[t].tolist()][:2])
    with edit_routing(model, {last.layer: RoutingEdit(force_ids_TK=forced_TK)}):
        new = model(IDS, return_routing=True)
    changed_BS = (new.logits != out.logits).any(-1)
    expected_BS = torch.zeros_like(changed_BS)
    expected_BS.view(-1)[t] = True
    assert torch.equal(changed_BS, expected_BS)
    assert torch.equal(new.routing[-1].expert_ids_TK[t], forced_TK[t])


def test_replay_in_a_middle_layer_changes_nothing_before_it():
    model = tiny()
    out = model(IDS, return_routing=True)
    forced_TK = torch.full_like(out.routing[1].expert_ids_TK, -1)
    t = 13
    forced_TK[t] = out.routing[1].expert_ids_TK[t].flip(0)  # same experts, the other way round: same output
    forced_TK[t + 1] = torch.tensor([5, 4]) if 5 not in out.routing[1].expert_ids_TK[t + 1] else torch.tensor([0, 1])
    with edit_routing(model, {1: RoutingEdit(force_ids_TK=forced_TK)}):
        new = model(IDS, return_routing=True)
    assert torch.equal(new.routing[0].expert_ids_TK, out.routing[0].expert_ids_TK)
    changed_BS = (new.logits - out.logits).abs().amax(-1) > 1e-6
    assert not changed_BS[0].any() and not changed_BS[2].any()  # other sequences
    assert not changed_BS[1, :4].any() and changed_BS[1, 4]  # causal: before token 14 nothing moves


@pytest.mark.parametrize("moe", [{}, {"capacity_factor_eval": 1.0}, {"router_kw": {"renormalize": True}}])
def test_own_k_gives_own_loss_exactly_and_other_k_differs(moe):
    model = tiny(**moe)
    loss = model(IDS, labels=IDS).loss
    with edit_routing(model, {b: RoutingEdit(top_k=2) for b in moe_blocks(model)}):
        same = model(IDS, labels=IDS).loss
    with edit_routing(model, {b: RoutingEdit(top_k=1) for b in moe_blocks(model)}):
        k1 = model(IDS, labels=IDS, return_routing=True)
    assert torch.equal(same, loss)
    assert k1.loss != loss and k1.routing[0].expert_ids_TK.shape[1] == 1


def test_capacity_and_policy_edits_match_the_model_built_that_way():
    model = tiny(capacity_factor_eval=1.0)
    scored = tiny(capacity_factor_eval=1.0, drop_policy="score")
    with edit_routing(model, {b: RoutingEdit(drop_policy="score", capacity_factor=0.5) for b in moe_blocks(model)}):
        out = model(IDS, return_routing=True)
    ref = scored(IDS, capacity_factor=0.5, return_routing=True)
    assert torch.equal(out.logits, ref.logits)
    assert out.routing[0].dropped_TK.any()
    assert all(m.policy == "openmoe" for m in model.moe_layers())
    with edit_routing(model, {0: RoutingEdit(capacity_factor=None)}):
        dropless = model(IDS, return_routing=True)
    assert not dropless.routing[0].dropped_TK.any()


@pytest.mark.parametrize("edits,msg", [
    ({1: RoutingEdit(mask=(6,))}, "expert 6 is out of range"),
    ({7: RoutingEdit(mask=(0,))}, "block 7 is not an MoE layer"),
    ({0: RoutingEdit(top_k=6, mask=(1,))}, "top_k=6 is out of range"),
    ({0: RoutingEdit(drop_policy="fifo")}, "drop policy 'fifo'"),
])
def test_bad_edits_are_one_line_errors(edits, msg):
    model = tiny()
    with pytest.raises(MoelabError, match=msg):
        with edit_routing(model, edits):
            pass


def physically_removed(model, block, e):
    """The same model with expert e of `block` gone: a layer built with E-1 experts (and E-1 router rows),
    so capacity is computed from E-1 experts as such a model computes it."""
    from moelab.model.moe import MoELayer
    from moelab.model.routers import build_router

    ref = copy.deepcopy(model)
    old = moe_blocks(ref)[block]
    E = old.num_experts
    keep = [i for i in range(E) if i != e]
    new = MoELayer(ref.config, block, E - 1, build_router(ref.config, E - 1))
    state = {k: (v[keep] if v.shape[:1] == (E,) else v) for k, v in old.state_dict().items()}
    new.load_state_dict(state)
    for mod in ref.modules():
        for name, child in mod.named_children():
            if child is old:
                setattr(mod, name, new.eval())
    assert moe_blocks(ref)[block].num_experts == E - 1
    return ref


@pytest.mark.parametrize("formula", ["topk", "group"])
def test_ablation_under_capacity_keep_and_recompute_each_equal_their_reference(formula):
    """26-37% drops in the issue: at a finite capacity the mask alone (keep) is the E-expert capacity,
    while the model without the expert (recompute) has more slots per expert."""
    from moelab.intervene.edit import removal
    from moelab.intervene.runner import ablation_losses

    model = tiny(capacity_factor_eval=1.0, capacity_formula=formula, group_size=8, min_capacity=1)
    ids = torch.randint(0, 40, (4, 16), generator=torch.Generator().manual_seed(2))
    kept_ref = deleted_expert_reference(model, 1, 3)(ids, return_routing=True)
    removed_ref = physically_removed(model, 1, 3)(ids, return_routing=True)
    assert kept_ref.routing[1].dropped_TK.any()  # capacity binds, so the two can differ
    assert not torch.allclose(kept_ref.logits, removed_ref.logits, atol=1e-4)
    for mode, ref in (("keep", kept_ref), ("recompute", removed_ref)):
        with edit_routing(model, {1: removal(6, (3,), mode)}):
            out = model(ids, return_routing=True)
        torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=1e-5)
        assert torch.equal(out.routing[1].dropped_TK.sum(), ref.routing[1].dropped_TK.sum())
        # the CLI's path (cached prefix, the rest re-run) gives the same losses
        labels = ids.clone()
        _, (loss,) = ablation_losses(model, ids, labels, [(1, (3,))], 1.0, ablate_capacity=mode)
        from moelab.intervene.runner import token_loss
        torch.testing.assert_close(loss, token_loss(ref.logits, labels), rtol=0, atol=1e-5)
    with pytest.raises(MoelabError, match="--ablate-capacity 'both'"):
        removal(6, (3,), "both")
