"""Compiled routing (model/route_plan.py) against the eager path and the naive rules.

torch.compile runs with the aot_eager backend here: the same aten operators as eager, traced by dynamo
and AOT autograd (what can break the graph or change the function), without inductor's C++ build. Every
router kind, capacity drops under both policies, exact ties, K = 1; values bitwise, gradients to fp32
tolerance. Compiling costs CPU seconds, so shapes are tiny and the cases share compiled graphs.
"""

import json

import pytest
import torch
import torch._dynamo as dynamo

import moelab.model.route_plan as rp
from moelab import build_model
from moelab.config import ConfigError, MoelabError
from moelab.intervene.edit import RoutingEdit, edit_routing
from moelab.model.capacity import DropRule
from moelab.model.config import ModelConfig, MoEConfig, RouterConfig
from moelab.model.dispatch import trimmed
from moelab.model.routers import RecurrentCore, build_router, keyed_top_k

E, T, D = 8, 24, 16
ROUTERS = {
    "linear": dict(kind="linear", renormalize=True),
    "mlp": dict(kind="mlp", hidden=8),
    "cosine": dict(kind="cosine", hidden=8),
    "rmoe-gru": dict(kind="rmoe", hidden=8),
    "dsv3": dict(kind="linear", score="sigmoid", n_group=4, topk_group=2, bias_balance=True, renormalize=True,
                 routed_scaling_factor=2.5),
    "hash": dict(kind="hash"),
}


def _router(name, k):
    cfg = ModelConfig(d_model=D, n_heads=2, vocab_size=64,
                      moe=MoEConfig(num_experts=E, top_k=k, router=RouterConfig(**ROUTERS[name])))
    core = RecurrentCore(cfg.moe.router, D, 0.5) if name.startswith("rmoe") else None
    torch.manual_seed(1)
    router = build_router(cfg, E, core)
    with torch.no_grad():
        # Experts 2, 5 and 6 score alike for every token: exact ties inside each row's top k.
        scoring = [p for p in router.parameters() if p.dim() == 2 and p.shape[0] == E]
        for p in scoring:
            p[5] = p[6] = p[2]
        if name == "dsv3":
            router.selection_bias_E.copy_(torch.linspace(-0.05, 0.05, E))
            router.selection_bias_E[5] = router.selection_bias_E[6] = router.selection_bias_E[2]
    return router


def _inputs(ties: bool):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(T, D, generator=g)
    if ties:  # repeated tokens: equal scores compete for the same slots (ties in the drop order)
        x[1::2] = x[0::2]
    return x, torch.randint(0, 64, (T,), generator=g)


def _run(fn, router, x, tok, rule, state=None):
    """Every tensor of the plan, and the gradients of a loss that reads weights, losses and state."""
    params = [p for p in router.parameters() if p.requires_grad]
    x = x.clone().requires_grad_()
    p = fn(router, x, state, tok, rule, E)
    g = torch.randn(p.weights_TK.shape, generator=torch.Generator().manual_seed(3))
    loss = (p.weights_TK * g).sum() + p.balance_loss + p.z_loss
    if p.routing.state is not None:
        loss = loss + p.routing.state.sum()
    if not loss.requires_grad:  # the hash router: nothing it decides depends on x or a parameter
        return p, ()
    return p, torch.autograd.grad(loss, [x, *params], allow_unused=True)


def _naive_top_k(scores_TE, k):
    return [sorted(range(len(row)), key=lambda e: (-row[e], e))[:k] for row in scores_TE.tolist()]


def _naive_drops(ids_TK, scores_TK, cap, policy):
    """Choices queue rank-major (openmoe) or by score with (rank, token) ties; a full expert drops."""
    Tn, K = ids_TK.shape
    order = [(k, t) for k in range(K) for t in range(Tn)]
    if policy == "score":
        order.sort(key=lambda kt: -scores_TK[kt[1], kt[0]].item())
    used, dropped = [0] * E, torch.zeros(Tn, K, dtype=torch.bool)
    for k, t in order:
        e = int(ids_TK[t, k])
        dropped[t, k] = used[e] >= cap
        used[e] += used[e] < cap
    return dropped


@pytest.mark.parametrize("levels", [None, 3, 1])  # no ties, many ties, every row all equal
def test_the_compiled_top_k_follows_the_rule(levels):
    g = torch.Generator().manual_seed(7)
    scores = torch.randn(200, 16, generator=g)
    if levels is not None:
        scores = (scores * levels).floor() / levels
    scores[0, 3], scores[0, 4], scores[1], scores[2, 5] = -0.0, 0.0, float("-inf"), float("-inf")
    for k in (1, 2, 6, 16):
        assert keyed_top_k(scores, k).tolist() == _naive_top_k(scores, k), (levels, k)


@pytest.fixture(scope="module")
def compiled():
    dynamo.reset()
    fn = rp.compiled_plan("aot_eager")
    yield fn
    rp._COMPILED.pop("aot_eager", None)
    dynamo.reset()


@pytest.mark.parametrize("name", list(ROUTERS))
def test_compiled_plan_equals_eager_and_the_naive_rules(compiled, name):
    cases = [(2, DropRule(4, "score", None), True), (2, DropRule(5, "openmoe", None), False), (1, None, False)]
    for k, rule, ties in cases:
        router = _router(name, k)
        x, tok = _inputs(ties)
        state = None
        if name.startswith("rmoe"):  # a later layer: the state handed on by an earlier one
            state = router.decide(torch.randn(T, D), None, tok).state.detach()
        want, want_g = _run(rp.plan_routing, router, x, tok, rule, state)
        got, got_g = _run(compiled, router, x, tok, rule, state)
        for field, a, b in zip(want._fields[1:], want[1:], got[1:]):
            assert torch.equal(a, b), (name, k, field)
        for field, a, b in zip(want.routing._fields, want.routing, got.routing):
            assert (a is None and b is None) or torch.equal(a, b), (name, k, field)
        for a, b in zip(want_g, got_g):
            assert (a is None and b is None) or torch.allclose(a, b, rtol=1e-5, atol=1e-6), name
        # the eager plan against the rules spelled out
        r = want.routing
        select = r.probs_TE + router.selection_bias_E if router.use_bias else r.probs_TE
        if router.n_group == 1:
            assert r.expert_ids_TK.tolist() == _naive_top_k(select, k)
        if rule is not None:
            naive = _naive_drops(r.expert_ids_TK, r.probs_TE.gather(1, r.expert_ids_TK), rule.capacity, rule.policy)
            assert torch.equal(want.dropped_TK, naive) and naive.any(), name
        order_N, inv_TK, offs_E = trimmed(want.order_M, want.inv_TK, want.offs_E, rule is not None)
        kept = ~want.dropped_TK.reshape(-1)
        assert sorted(order_N.tolist()) == kept.nonzero().squeeze(1).tolist()
        assert (r.expert_ids_TK.reshape(-1)[order_N].diff() >= 0).all()
        assert torch.equal(inv_TK.reshape(-1)[order_N], torch.arange(len(order_N)))


def test_the_routing_path_has_no_graph_break():
    for name in ROUTERS:
        router = _router(name, 2)
        x, tok = _inputs(True)
        for rule in (None, DropRule(4, "score", 4)):
            out = dynamo.explain(rp.plan_routing)(router, x, None, tok, rule, E)
            assert (out.graph_count, out.graph_break_count) == (1, 0), (name, out.break_reasons)
    dynamo.reset()


def _model(mode, **moe):
    cfg = ModelConfig(vocab_size=64, d_model=D, n_layers=2, n_heads=2, ffn_hidden=32, compile_routing=mode,
                      moe=MoEConfig(num_experts=E, top_k=2, num_shared_experts=1, capacity_factor_train=0.75,
                                    router=RouterConfig(jitter=0.1), **moe))
    model = build_model(cfg, seed=0).train()
    for layer in model.moe_layers():
        layer.compile_backend = "aot_eager"
    return model


def _step(model, ids, edits=None):
    torch.manual_seed(5)  # the jitter's draw
    with edit_routing(model, edits or {}):
        out = model(ids, labels=ids, return_routing=True)
    grads = torch.autograd.grad(out.loss + out.aux_loss, list(model.parameters()))
    return out, grads


def test_a_model_routes_and_trains_the_same_compiled_and_eager(compiled, monkeypatch):
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(4))
    eager, on = _model("off"), _model("on")
    calls = []
    real = rp.compiled_plan
    monkeypatch.setattr("moelab.model.moe.compiled_plan", lambda b: calls.append(b) or real(b))
    for edits in (None, {1: RoutingEdit(mask=(0, 3))}):  # a router hook: that layer routes eagerly
        calls.clear()
        want, want_g = _step(eager, ids, edits)
        got, got_g = _step(on, ids, edits)
        assert len(calls) == (2 if edits is None else 1)
        assert torch.equal(want.loss, got.loss) and torch.equal(want.aux_loss, got.aux_loss)
        for a, b in zip(want.routing, got.routing):
            assert all(torch.equal(u, v) for u, v in zip(a[1:], b[1:]))
        assert any(r.dropped_TK.any() for r in got.routing)
        for a, b in zip(want_g, got_g):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_auto_compiles_only_where_a_measurement_was_recorded(tmp_path, monkeypatch):
    record = tmp_path / "routing_compile.json"
    monkeypatch.setattr(rp, "RECORD", record)
    x = torch.zeros(4, D)
    minor = rp.torch_minor()
    cases = [(None, False), ("not json", False), ({"cpu": {"torch": minor, "compile": True}}, True),
             ({"cpu": {"torch": minor, "compile": False}}, False), ({"cpu": {"torch": "1.0", "compile": True}}, False),
             ({"NVIDIA H200": {"torch": minor, "compile": True}}, False), ({"cpu": "yes"}, False)]
    for devices, want in cases:
        rp.recorded_choice.cache_clear()
        if devices is not None:
            record.write_text(devices if isinstance(devices, str) else json.dumps({"devices": devices}))
        assert rp.use_compiled("auto", x) is want, devices
    assert rp.use_compiled("on", x) and not rp.use_compiled("off", x) and not rp.use_compiled("on", x[:0])
    rp.recorded_choice.cache_clear()


def test_the_option_is_validated_saved_and_optional_in_old_configs():
    with pytest.raises(ConfigError, match=r"model.compile_routing='fast' is unknown \(allowed: auto, on, off\)"):
        ModelConfig(compile_routing="fast").validate()
    saved = ModelConfig(compile_routing="on").to_dict()
    assert saved["compile_routing"] == "on" and ModelConfig.from_dict(saved).compile_routing == "on"
    old = {k: v for k, v in saved.items() if k != "compile_routing"}  # a checkpoint from before the option
    assert ModelConfig.from_dict(old).compile_routing == "auto"


def test_a_compiler_that_cannot_run_is_one_line(monkeypatch):
    monkeypatch.setattr(rp, "compile_supported", lambda: "torch.compile does not support this build")
    monkeypatch.setattr(rp, "_COMPILED", {})
    model = _model("on")
    with pytest.raises(MoelabError) as e:
        model(torch.zeros(1, 4, dtype=torch.long))
    assert str(e.value) == ("model.compile_routing=on: torch.compile does not support this build; "
                            "set model.compile_routing=off")


def test_capacity_counts_the_k_an_intervention_returns():
    """A hook that changes top_k changes the slots: capacity is computed from the ids the router returned."""
    from moelab.model.capacity import drop_mask

    model = _model("off", min_capacity=1)  # 4 slots at k = 2, 2 at k = 1 (24 tokens, factor 0.75)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(4))
    with edit_routing(model, {b: RoutingEdit(top_k=1) for b in (0, 1)}):
        out = model(ids, return_routing=True)
    for rec in out.routing:
        assert rec.expert_ids_TK.shape[1] == 1
        want = drop_mask(rec.expert_ids_TK, rec.probs_TE.gather(1, rec.expert_ids_TK), E, 0.75, min_capacity=1)
        assert torch.equal(rec.dropped_TK, want) and want.any()
