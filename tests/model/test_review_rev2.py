"""Review (rev2): a hook inside a router (on a submodule, or on RMoE's shared recurrent core, which the
router holds outside its children) keeps that layer's routing eager, as a hook on the router does: the
compiled path, traced once, would route as if the hook were not there."""

import pytest
import torch
import torch._dynamo as dynamo

import moelab.model.route_plan as rp
from moelab import build_model
from moelab.model.config import ModelConfig, MoEConfig, RouterConfig

ROUTERS = {"cosine": (dict(kind="cosine", hidden=8), lambda r: r.head),
           "rmoe-gru": (dict(kind="rmoe", hidden=8), lambda r: r.core.cell)}


@pytest.fixture(scope="module", autouse=True)
def fresh_compiler():
    dynamo.reset()
    yield
    rp._COMPILED.pop("aot_eager", None)
    dynamo.reset()


def model(mode, router):
    cfg = ModelConfig(vocab_size=64, d_model=16, n_layers=2, n_heads=2, ffn_hidden=32, compile_routing=mode,
                      moe=MoEConfig(num_experts=8, top_k=2, moe_every=1, expert_hidden=16,
                                    router=RouterConfig(**router)))
    m = build_model(cfg, seed=0).eval()
    for layer in m.moe_layers():
        layer.compile_backend = "aot_eager"
    return m


def ids_of(m, x):
    with torch.no_grad():
        out = m(x, return_routing=True)
    return [r[1] for r in out.routing]  # LayerRouting.expert_ids_TK per layer


@pytest.mark.parametrize("name", list(ROUTERS))
def test_a_hook_inside_the_router_routes_as_eager(name):
    router, inner = ROUTERS[name]
    x = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(3))
    on, off = model("on", router), model("off", router)
    before = ids_of(on, x)  # compiled once, without the hook
    flip = lambda mod, args, out: -out if isinstance(out, torch.Tensor) else out  # noqa: E731
    hooks = [inner(m.moe_layers()[0].router).register_forward_hook(flip) for m in (on, off)]
    try:
        want, got = ids_of(off, x), ids_of(on, x)
    finally:
        for h in hooks:
            h.remove()
    assert not torch.equal(want[0], before[0])  # the hook changes the routing (else this test shows nothing)
    assert all(torch.equal(a, b) for a, b in zip(want, got))
    assert all(torch.equal(a, b) for a, b in zip(ids_of(on, x), before))  # removed: back to compiled
