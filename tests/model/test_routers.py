import pytest
import torch

from moelab.model.config import ModelConfig, MoEConfig, RouterConfig
from moelab.model.losses import load_balance_loss, router_z_loss
from moelab.model.routers import (LinearRouter, RecurrentCore, Routing, build_router, top_k_stable)


def _linear_from_logits(logits_TE, k, renormalize):
    """A linear router whose scores equal the given logits: identity inputs, weights = logits^T."""
    T, E = logits_TE.shape
    r = LinearRouter(RouterConfig(renormalize=renormalize), E, k, d_model=T, init_std=0.02)
    with torch.no_grad():
        r.weight_ED.copy_(logits_TE.t())
    return r, torch.eye(T)


def test_linear_router_matches_reference_vectors(vectors):
    for case in vectors["routing"]:
        logits = torch.tensor(case["logits_TE"], dtype=torch.float64).float()
        exp = case["expected"]
        for renorm, key in ((False, "weights_raw_TK"), (True, "weights_renormalised_TK")):
            router, x = _linear_from_logits(logits, case["k"], renorm)
            out = router(x)
            assert isinstance(out, Routing) and out.state is None
            torch.testing.assert_close(out.probs_TE, torch.tensor(exp["probs_TE"]), atol=1e-6, rtol=0)
            assert out.expert_ids_TK.tolist() == exp["expert_ids_TK"]
            torch.testing.assert_close(out.weights_TK, torch.tensor(exp[key]), atol=1e-6, rtol=0)
        lb = load_balance_loss(out.probs_TE.double(), out.expert_ids_TK)
        assert lb.item() == pytest.approx(exp["load_balance_loss"], abs=1e-6)
        assert router_z_loss(logits.double()).item() == pytest.approx(exp["router_z_loss"], abs=1e-5)


def test_balance_loss_hand_worked():
    # Two tokens, two experts, top-1. Token 0 -> e0 with p=(0.75, 0.25); token 1 -> e0 with p=(0.5, 0.5).
    probs = torch.tensor([[0.75, 0.25], [0.5, 0.5]])
    ids = torch.tensor([[0], [0]])
    # f = (1, 0), P = (0.625, 0.375): E * sum f P = 2 * 0.625
    assert load_balance_loss(probs, ids).item() == pytest.approx(1.25)
    # Uniform routing reaches the minimum, k.
    uniform = torch.full((4, 4), 0.25)
    assert load_balance_loss(uniform, torch.tensor([[0, 1], [2, 3], [0, 1], [2, 3]])).item() == pytest.approx(2.0)


def test_z_loss_hand_worked():
    logits = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    expected = (torch.log(torch.tensor(2.0)) ** 2 + (1 + torch.log(torch.tensor(2.0))) ** 2) / 2
    assert router_z_loss(logits).item() == pytest.approx(expected.item(), rel=1e-6)


def test_top_k_ties_go_to_lower_index():
    scores = torch.tensor([[0.2, 0.4, 0.4, 0.0], [0.3, 0.3, 0.3, 0.1]])
    assert top_k_stable(scores, 2).tolist() == [[1, 2], [0, 1]]


def _naive_top_k(scores_TE, k):
    """The rule spelled out: highest score first, equal scores by lower expert index."""
    return [sorted(range(len(row)), key=lambda e: (-row[e], e))[:k] for row in scores_TE.tolist()]


@pytest.mark.parametrize("levels", [None, 3, 1])  # None: no ties; 3: many ties; 1: every row all equal
@pytest.mark.parametrize("E, k", [(8, 2), (64, 6), (5, 5)])
def test_top_k_stable_matches_the_naive_rule(levels, E, k):
    g = torch.Generator().manual_seed(E + k)
    scores = torch.rand(300, E, generator=g)
    if levels is not None:  # quantised scores tie within the top k and across its boundary
        scores = (scores * levels).floor() / max(levels, 1)
    ids = top_k_stable(scores, k)
    assert ids.tolist() == _naive_top_k(scores, k)
    if levels == 1:
        assert (ids == torch.arange(k)).all()


def _rmoe_cfg(**router):
    r = RouterConfig(kind="rmoe", hidden=4, **router)
    return ModelConfig(d_model=6, n_heads=3, moe=MoEConfig(num_experts=5, top_k=2, router=r))


def _rmoe_routers(vec, **router):
    cfg = _rmoe_cfg(**router)
    core = RecurrentCore(cfg.moe.router, cfg.d_model, 0.02)
    with torch.no_grad():
        core.cell.weight_ih.copy_(torch.tensor(vec["gru_weight_ih"]))
        core.cell.weight_hh.copy_(torch.tensor(vec["gru_weight_hh"]))
        core.cell.bias_ih.copy_(torch.tensor(vec["gru_bias_ih"]))
        core.cell.bias_hh.copy_(torch.tensor(vec["gru_bias_hh"]))
    routers = []
    for w1, w2 in zip(vec["W1_per_layer"], vec["W2_per_layer"]):
        r = build_router(cfg, 5, core)
        with torch.no_grad():
            r.proj_PD.copy_(torch.tensor(w1))
            r.head.weight.copy_(torch.tensor(w2))
        routers.append(r)
    return routers, core


@pytest.mark.parametrize("pass_state, key", [(True, "expected_logits_per_layer_TE"),
                                             (False, "expected_logits_no_state_passed_TE")])
def test_rmoe_router_matches_reference_vectors(vectors, pass_state, key):
    vec = vectors["rmoe"]
    routers, _ = _rmoe_routers(vec, pass_state=pass_state)
    state = None
    for layer, r in enumerate(routers):
        out = r(torch.tensor(vec["inputs_per_layer_TD"][layer]), state)
        state = out.state
        torch.testing.assert_close(out.logits_TE, torch.tensor(vec[key][layer]), atol=1e-5, rtol=0)


def test_rmoe_state_changes_later_layers_but_not_the_first():
    torch.manual_seed(1)
    cfg = _rmoe_cfg()
    core = RecurrentCore(cfg.moe.router, cfg.d_model, 0.5)
    r0, r1 = build_router(cfg, 5, core), build_router(cfg, 5, core)
    x = torch.randn(3, 6)
    s = r0(x).state
    with_state = r1(x, s).logits_TE
    without = r1(x, None).logits_TE
    assert not torch.allclose(with_state, without)


@pytest.mark.parametrize("detach, expect_grad", [(False, True), (True, False)])
def test_recurrent_gradient_flows_through_the_state(detach, expect_grad):
    cfg = _rmoe_cfg(detach_state=detach)
    core = RecurrentCore(cfg.moe.router, cfg.d_model, 0.5)
    r0, r1 = build_router(cfg, 5, core), build_router(cfg, 5, core)
    x = torch.randn(3, 6)
    out = r1(x, r0(x).state)
    out.logits_TE.square().sum().backward()
    got = r0.proj_PD.grad is not None and r0.proj_PD.grad.abs().sum() > 0
    assert got == expect_grad


@pytest.mark.parametrize("cell", ["gru", "rnn", "lstm"])
@pytest.mark.parametrize("head", ["linear", "cosine"])
def test_rmoe_cells_and_heads(cell, head):
    cfg = _rmoe_cfg(cell=cell, head=head, shared_projection=True)
    core = RecurrentCore(cfg.moe.router, cfg.d_model, 0.5)
    r0, r1 = build_router(cfg, 5, core), build_router(cfg, 5, core)
    assert r0.proj_PD is None and core.proj_PD is not None
    x = torch.randn(7, 6)
    out = r1(x, r0(x).state)
    assert out.expert_ids_TK.shape == (7, 2) and out.probs_TE.shape == (7, 5)
    if cell == "lstm":
        assert isinstance(out.state, tuple) and len(out.state) == 2
    torch.testing.assert_close(out.probs_TE.sum(-1), torch.ones(7))


def _router(kind, E=8, k=2, D=16, V=50, **kw):
    cfg = ModelConfig(vocab_size=V, d_model=D, n_heads=2,
                      moe=MoEConfig(num_experts=E, top_k=k, router=RouterConfig(kind=kind, hidden=8, **kw)))
    core = RecurrentCore(cfg.moe.router, D, 0.02) if kind == "rmoe" else None
    return build_router(cfg, E, core)


@pytest.mark.parametrize("kind", ["linear", "mlp", "cosine", "random", "hash", "rmoe"])
def test_every_router_returns_a_routing_value(kind):
    r = _router(kind)
    x, ids = torch.randn(10, 16), torch.randint(0, 50, (10,))
    out = r(x, None, ids)
    assert out.expert_ids_TK.shape == (10, 2) and out.expert_ids_TK.dtype == torch.int64
    assert (out.expert_ids_TK[:, 0] != out.expert_ids_TK[:, 1]).all()
    torch.testing.assert_close(out.weights_TK, out.probs_TE.gather(1, out.expert_ids_TK))
    assert out.logits_TE.dtype == torch.float32


def test_hash_router_depends_on_token_id_only():
    r = _router("hash")
    ids = torch.tensor([3, 7, 3, 3, 7])
    a = r(torch.randn(5, 16), None, ids).expert_ids_TK
    b = r(torch.randn(5, 16), None, ids).expert_ids_TK
    assert torch.equal(a, b)
    assert torch.equal(a[0], a[2]) and torch.equal(a[1], a[4])
    assert torch.equal(a, r.table_VK[ids])
    # every chosen expert carries ~1/k of the mass
    torch.testing.assert_close(r(torch.randn(5, 16), None, ids).weights_TK, torch.full((5, 2), 0.5), atol=1e-5, rtol=0)


def test_random_router_is_frozen_and_seeded():
    a, b = _router("random"), _router("random")
    assert not a.weight_ED.requires_grad
    assert torch.equal(a.weight_ED, b.weight_ED)
    assert not torch.equal(a.weight_ED, _router("random", seed=1).weight_ED)


def test_cosine_router_logits_bounded_by_temperature():
    r = _router("cosine", cosine_temperature=0.5)
    out = r(torch.randn(20, 16) * 100)
    assert out.logits_TE.abs().max() <= 2.0 + 1e-5


def test_jitter_only_in_training():
    r = _router("linear", jitter=0.5)
    x = torch.randn(6, 16)
    r.eval()
    torch.testing.assert_close(r(x).logits_TE, r(x).logits_TE)
    r.train()
    assert not torch.allclose(r(x).logits_TE, r(x).logits_TE)


def test_selection_bias_shifts_choice_not_weights():
    r = _router("linear", E=4, k=1, bias_balance=True, bias_update_rate=1.0)
    x = torch.randn(32, 16)
    before = r(x)
    load = torch.bincount(before.expert_ids_TK.reshape(-1), minlength=4)
    r.update_selection_bias(load)
    assert r.selection_bias_E.requires_grad is False
    assert (r.selection_bias_E[load > load.float().mean()] < 0).all()
    # with bias larger than any probability gap, the least loaded expert is picked by everyone
    r.selection_bias_E.copy_(torch.tensor([0.0, 0.0, 0.0, 0.0]))
    r.selection_bias_E[2] = 5.0
    after = r(x)
    assert (after.expert_ids_TK[:, 0] == 2).all()
    torch.testing.assert_close(after.weights_TK[:, 0], after.probs_TE[:, 2])
    assert "selection_bias_E" in r.state_dict()


def test_unknown_router_kind_names_allowed_values():
    from moelab.config import ConfigError
    with pytest.raises(ConfigError, match=r"router\.kind='gshard'.*linear, rmoe"):
        RouterConfig(kind="gshard")


# ---- DeepSeek-V3 routing: sigmoid scores, correction bias, group-limited top-k, routed scaling -------------
def _dsv3(E=16, k=4, D=24, n_group=4, topk_group=2, scaling=2.5, renormalize=True):
    return _router("linear", E=E, k=k, D=D, score="sigmoid", n_group=n_group, topk_group=topk_group,
                   routed_scaling_factor=scaling, renormalize=renormalize, bias_balance=True, bias_update_rate=0.0)


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("groups", [(4, 2), (1, 1), (8, 3)])
def test_sigmoid_group_router_matches_transformers_deepseek_v3(renormalize, groups):
    """The independent reference is transformers' own DeepseekV3TopkRouter, same weights and bias."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    n_group, topk_group = groups
    ours = _dsv3(n_group=n_group, topk_group=topk_group, renormalize=renormalize)
    cfg = transformers.DeepseekV3Config(hidden_size=24, n_routed_experts=16, num_experts_per_tok=4,
                                        n_group=n_group, topk_group=topk_group, routed_scaling_factor=2.5,
                                        norm_topk_prob=renormalize)
    ref = DeepseekV3TopkRouter(cfg)
    torch.manual_seed(3)
    with torch.no_grad():
        ours.weight_ED.normal_(0, 0.5)
        ours.selection_bias_E.copy_(torch.randn(16) * 0.3)
        ref.weight.copy_(ours.weight_ED)
        ref.e_score_correction_bias.copy_(ours.selection_bias_E)
    x = torch.randn(200, 24)
    out = ours(x)
    _, w_ref, ids_ref = ref(x)
    order = ids_ref.sort(-1)  # transformers' top-k is unsorted: compare sets, weights by expert
    mine = out.expert_ids_TK.sort(-1)
    assert torch.equal(mine.values, order.values)
    torch.testing.assert_close(out.weights_TK.gather(1, mine.indices), w_ref.gather(1, order.indices))
    torch.testing.assert_close(out.probs_TE, torch.sigmoid(x @ ours.weight_ED.t()))


def test_group_limit_hand_worked():
    """Two groups of 3; group scores = sum of the two best: g0 = 0.9 + 0.8, g1 = 0.95 + 0.1. With
    topk_group=1 the top-2 must come from g0 although expert 3 (0.95) is the best single score."""
    from moelab.model.routers import group_limited

    s = torch.tensor([[0.9, 0.8, 0.0, 0.95, 0.1, 0.05]])
    masked = group_limited(s, n_group=2, topk_group=1)
    assert torch.isinf(masked[0, 3:]).all() and torch.equal(masked[0, :3], s[0, :3])
    assert top_k_stable(masked, 2).tolist() == [[0, 1]]
    assert torch.equal(group_limited(s, n_group=2, topk_group=2), s)  # nothing: every group kept


def test_correction_bias_is_the_balancing_bias_and_selects_only():
    """One buffer: aux-loss-free balancing updates it, and it moves the choice but never the weights."""
    r = _dsv3(n_group=1, topk_group=1, scaling=1.0, renormalize=False)
    r.bias_update_rate = 0.5
    x = torch.randn(50, 24)
    before = r(x)
    r.update_selection_bias(torch.tensor([100.0] + [0.0] * 15))  # expert 0 overloaded
    assert r.selection_bias_E[0] < 0 and (r.selection_bias_E[1:] > 0).all()
    after = r(x)
    # weights are the sigmoid scores of whichever experts were chosen, bias or not
    torch.testing.assert_close(after.weights_TK, after.probs_TE.gather(1, after.expert_ids_TK))
    assert not torch.equal(before.expert_ids_TK, after.expert_ids_TK) or r.selection_bias_E.abs().max() == 0
    assert "selection_bias_E" in r.state_dict()


def test_scaling_and_renormalisation():
    r = _dsv3(n_group=1, topk_group=1, scaling=2.5, renormalize=True)
    out = r(torch.randn(30, 24))
    torch.testing.assert_close(out.weights_TK.sum(-1), torch.full((30,), 2.5))


def test_dsv3_config_is_validated():
    from moelab.config import ConfigError

    with pytest.raises(ConfigError, match="n_group=3 must divide"):
        MoEConfig(num_experts=16, top_k=2, router=RouterConfig(n_group=3, topk_group=1))
    with pytest.raises(ConfigError, match="topk_group=5 must be in 1..n_group"):
        RouterConfig(n_group=4, topk_group=5)
    with pytest.raises(ConfigError, match="score='tanh'"):
        RouterConfig(score="tanh")
    with pytest.raises(ConfigError, match="exceeds the experts"):
        MoEConfig(num_experts=16, top_k=8, router=RouterConfig(n_group=4, topk_group=1))


def test_tiny_dsv3_preset_builds_counts_and_trains_its_bias():
    import moelab

    model = moelab.build_model("tiny-dsv3", seed=0)
    assert model.config.num_params() == sum(p.numel() for p in model.parameters())
    router = model.moe_layers()[0].router
    assert router.score_fn == "sigmoid" and router.n_group == 4 and router.use_bias
    out = model(torch.randint(0, 4096, (2, 16)), return_routing=True)
    assert torch.isfinite(out.logits).all()
    w = out.routing[0].weights_TK
    torch.testing.assert_close(w.sum(-1), torch.full((32,), 2.5))
    model.update_selection_biases(out.routing)  # aux-loss-free balancing moves the same buffer
    assert router.selection_bias_E.abs().sum() > 0


_AUTOCAST_KINDS = [("linear", {}), ("mlp", {}), ("cosine", {}), ("random", {}), ("hash", {}), ("rmoe", {}),
                   ("rmoe", {"head": "cosine", "cell": "lstm"}),
                   ("linear", {"score": "sigmoid", "n_group": 4, "topk_group": 2, "bias_balance": True})]


@pytest.mark.parametrize("kind,kw", _AUTOCAST_KINDS)
def test_router_scores_in_fp32_under_bf16_autocast(kind, kw):
    """bf16 autocast must not reach the router: logits, scores and choices equal the fp32 run bit for bit."""
    torch.manual_seed(0)
    r = _router(kind, E=16, k=4, D=64, **kw)
    x, ids = torch.randn(32, 64), torch.randint(0, 50, (32,))
    state = None
    if kind == "rmoe":  # a carried state from an earlier layer goes through the cell too
        state = r(torch.randn(32, 64), None, ids).state
    ref = r(x, state, ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = r(x, state, ids)
        # The check has teeth: the same product outside the router does round to bf16 here.
        assert (x @ x.t()).dtype == torch.bfloat16
    assert out.logits_TE.dtype == torch.float32
    assert torch.equal(out.logits_TE, ref.logits_TE)
    assert torch.equal(out.probs_TE, ref.probs_TE)
    assert torch.equal(out.expert_ids_TK, ref.expert_ids_TK)
