import ast
from pathlib import Path

import pytest
import torch

from moelab import ModelConfig, build_model, load_preset
from moelab.config import ConfigError
from moelab.model.config import MoEConfig, RouterConfig
from moelab.presets import list_presets

SMALL = ["tiny-dense", "tiny-moe", "tiny-rmoe"]


def small_cfg(**moe):
    router = moe.pop("router", {})
    base = dict(num_experts=4, top_k=2, moe_every=1, expert_hidden=32, num_shared_experts=1)
    base.update(moe)
    return ModelConfig(vocab_size=97, d_model=32, n_layers=3, n_heads=4, ffn_hidden=48, max_seq_len=64,
                       moe=MoEConfig(router=RouterConfig(**router), **base))


VARIANTS = {
    "sequential-shared": dict(shared_placement="sequential"),
    "no-shared": dict(num_shared_experts=0, shared_placement="none"),
    "qwen-gate": dict(shared_gate=True, num_shared_experts=2, shared_hidden=16),
    "per-layer-experts": dict(num_experts=[4, 6, 2], top_k=2),
    "fine-grained": dict(num_experts=16, top_k=6, num_shared_experts=2, expert_hidden=8, dense_layers=[0],
                         num_experts_override=None),
    "rmoe-lstm-shared-proj": dict(router=dict(kind="rmoe", hidden=8, cell="lstm", shared_projection=True)),
    "rmoe-cosine": dict(router=dict(kind="rmoe", hidden=8, head="cosine")),
    "mlp": dict(router=dict(kind="mlp", hidden=8)),
    "cosine": dict(router=dict(kind="cosine", hidden=8)),
    "random": dict(router=dict(kind="random")),
    "hash": dict(router=dict(kind="hash")),
    "bias-balance": dict(router=dict(bias_balance=True)),
}


def variant(name):
    kw = dict(VARIANTS[name])
    kw.pop("num_experts_override", None)
    return small_cfg(**kw)


@pytest.mark.parametrize("name", SMALL)
def test_analytic_counts_match_built_presets(name):
    cfg = load_preset(name)
    model = build_model(cfg)
    assert cfg.num_params() == model.num_params()


@pytest.mark.parametrize("name", list(VARIANTS))
def test_analytic_counts_match_built_variants(name):
    cfg = variant(name)
    assert cfg.num_params() == build_model(cfg).num_params()


def test_counts_for_more_variants():
    for kw in [dict(tie_embeddings=True), dict(qk_norm=True), dict(n_kv_heads=2), dict(ffn_kind="openmoe"),
               dict(ffn_kind="geglu"), dict(qk_norm="head"), dict(qk_norm="full", n_kv_heads=2),
               dict(attn_bias=True), dict(attn_bias="qkv", n_kv_heads=2), dict(attn_bias="all"),
               dict(attn_bias="all", qk_norm="full", head_dim=16)]:
        cfg = ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, ffn_hidden=48,
                          moe=MoEConfig(num_experts=4, moe_every=2), **kw)
        assert cfg.num_params() == build_model(cfg).num_params(), kw


def test_active_params_count_k_experts():
    cfg = load_preset("tiny-moe")
    c = cfg.param_counts()
    per_expert = 3 * cfg.d_model * cfg.expert_hidden
    assert c["routed_experts"]["total"] == 2 * 8 * per_expert
    assert c["routed_experts"]["active"] == 2 * 2 * per_expert


def test_tiny_dense_matches_tiny_moe_active_params():
    dense, moe = load_preset("tiny-dense"), load_preset("tiny-moe")
    assert dense.num_active_params() == pytest.approx(moe.num_active_params(), rel=0.005)
    assert moe.num_params() > 1.4 * dense.num_params()


def test_every_preset_counts_without_allocating():
    for name in list_presets():
        counts = load_preset(name).param_counts()
        assert counts["all"]["active"] <= counts["all"]["total"]
    big = load_preset("openmoe-34b-32e").param_counts()["all"]
    assert 30e9 < big["total"] < 40e9
    mixtral = load_preset("mixtral-8x7b").param_counts()["all"]
    assert mixtral["total"] == pytest.approx(46.7e9, rel=0.01)
    assert mixtral["active"] == pytest.approx(12.9e9, rel=0.01)
    ds = load_preset("deepseekmoe-16b").param_counts()["all"]
    assert ds["total"] == pytest.approx(16.4e9, rel=0.01)


def test_moe_placement_rule():
    cfg = ModelConfig(n_layers=12, moe=MoEConfig(num_experts=4, moe_every=4))
    assert cfg.moe_layer_ids() == [3, 7, 11]
    cfg = ModelConfig(n_layers=4, moe=MoEConfig(num_experts=4, moe_every=1, dense_layers=[0]))
    assert cfg.moe_layer_ids() == [1, 2, 3]


@pytest.mark.parametrize("name", SMALL)
def test_output_fields_and_routing_records(name):
    cfg = load_preset(name)
    model = build_model(cfg, seed=0)
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    out = model(ids, labels=ids, return_routing=True)
    assert out.logits.shape == (2, 16, cfg.vocab_size)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    n_moe = len(cfg.moe_layer_ids())
    assert len(out.routing) == n_moe
    torch.testing.assert_close(out.aux_loss, cfg.moe.balance_coef * out.balance_loss + cfg.moe.z_coef * out.z_loss)
    for rec, E in zip(out.routing, cfg.experts_per_layer()):
        assert rec.expert_ids_TK.shape == (32, cfg.moe.top_k)
        assert rec.probs_TE.shape == (32, E)
        assert rec.dropped_TK.dtype == torch.bool
        assert (rec.weights_TK[rec.dropped_TK] == 0).all()
    assert model(ids).routing is None and model(ids).loss is None


def test_loss_is_shifted_cross_entropy():
    model = build_model(small_cfg(), seed=0)
    ids = torch.randint(0, 97, (2, 9))
    out = model(ids, labels=ids)
    ref = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 97), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, ref)
    labels = ids.clone()
    labels[:, :5] = -100
    part = torch.nn.functional.cross_entropy(out.logits[:, 4:-1].reshape(-1, 97), ids[:, 5:].reshape(-1))
    torch.testing.assert_close(model(ids, labels=labels).loss, part)


def test_capacity_factor_by_mode_and_override():
    cfg = small_cfg(capacity_factor_train=0.25, capacity_factor_eval=None, min_capacity=0)
    model = build_model(cfg, seed=0)
    ids = torch.randint(0, 97, (2, 32))
    model.train()
    assert any(r.dropped_TK.any() for r in model(ids, return_routing=True).routing)
    model.eval()
    assert not any(r.dropped_TK.any() for r in model(ids, return_routing=True).routing)
    assert any(r.dropped_TK.any() for r in model(ids, return_routing=True, capacity_factor=0.25).routing)


@pytest.mark.parametrize("placement", ["parallel", "sequential"])
def test_fully_dropped_tokens_keep_residual_and_shared_path(placement):
    cfg = small_cfg(shared_placement=placement, min_capacity=0)
    model = build_model(cfg, seed=0).eval()
    block = model.blocks[0]
    x = torch.randn(1, 8, 32)
    rope = (model.rope_cos[:8], model.rope_sin[:8])
    y, out, _ = block(x, rope, None, 0, None, torch.zeros(8, dtype=torch.long), 1e-6)
    assert out.routing.dropped_TK.all()
    h = x + block.attn(block.norm1(x), *rope)
    if placement == "parallel":
        expected = h + block.shared(block.norm2(h))
    else:
        expected = h + block.shared(block.norm3(h))
    torch.testing.assert_close(y, expected)


def test_kv_cache_matches_full_forward():
    for name in SMALL + ["hash", "rmoe-lstm-shared-proj"]:
        cfg = load_preset(name) if name in SMALL else variant(name)
        model = build_model(cfg, seed=0).eval()
        ids = torch.randint(0, cfg.vocab_size, (2, 20))
        # Dropless: with a capacity, which choices drop depends on how many tokens share a forward.
        full = model(ids, capacity_factor=None).logits
        from moelab.model.layers import KVCache
        cache = KVCache(cfg, 2, 20, "cpu", torch.float32)
        parts = [model(ids[:, :7], cache=cache, capacity_factor=None).logits,
                 model(ids[:, 7:12], cache=cache, capacity_factor=None).logits]
        parts += [model(ids[:, t:t + 1], cache=cache, capacity_factor=None).logits for t in range(12, 20)]
        torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-4, rtol=1e-4)


def test_generate_with_and_without_cache_agree():
    cfg = load_preset("tiny-moe")
    model = build_model(cfg, seed=0)
    prompt = torch.randint(0, cfg.vocab_size, (2, 5))
    a = model.generate(prompt, 12, temperature=0, capacity_factor=None)
    b = model.generate(prompt, 12, temperature=0, use_cache=False, capacity_factor=None)
    assert torch.equal(a, b) and a.shape == (2, 17) and torch.equal(a[:, :5], prompt)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    s1 = model.generate(prompt[0], 6, temperature=0.8, top_k=5, generator=g1, capacity_factor=None)
    s2 = model.generate(prompt[0], 6, temperature=0.8, top_k=5, generator=g2, use_cache=False,
                        capacity_factor=None)
    assert torch.equal(s1, s2) and s1.shape == (11,)
    assert model.training  # generate restores the mode


def test_top_k_sampling_stays_in_top_k():
    from moelab.model.transformer import sample_next
    logits = torch.tensor([[0.0, 5.0, 4.0, -1.0, 3.0]])
    seen = {int(sample_next(logits, 1.0, 2, torch.Generator().manual_seed(s))) for s in range(50)}
    assert seen == {1, 2}


@pytest.mark.parametrize("name", SMALL + ["sequential-shared", "fine-grained", "cosine", "mlp", "hash",
                                          "rmoe-cosine", "bias-balance"])
def test_one_training_step_lowers_the_loss(name):
    cfg = load_preset(name) if name in SMALL else variant(name)
    model = build_model(cfg, seed=0)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (4, 32), generator=g)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(3):
        out = model(ids, labels=ids, return_routing=True)
        (out.loss + out.aux_loss).backward()
        opt.step()
        opt.zero_grad()
        model.update_selection_biases(out.routing)
        losses.append(out.loss.item())
    assert losses[-1] < losses[0] - 0.01


def test_router_and_experts_get_gradients():
    model = build_model(load_preset("tiny-rmoe"), seed=0)
    ids = torch.randint(0, 4096, (2, 16))
    out = model(ids, labels=ids)
    (out.loss + out.aux_loss).backward()
    assert model.router_core.cell.weight_ih.grad.abs().sum() > 0
    for layer in model.moe_layers():
        assert layer.router.proj_PD.grad.abs().sum() > 0
        assert layer.experts.w_in_EDX.grad.abs().sum() > 0


def test_rmoe_core_saved_once():
    model = build_model(load_preset("tiny-rmoe"))
    keys = [k for k in model.state_dict() if "cell" in k]
    assert keys and all(k.startswith("router_core.") for k in keys)


@pytest.mark.parametrize("bad, match", [
    ({"moe": {"num_experts": 4, "top_k": 5}}, r"top_k=5 must be <= model\.moe\.num_experts \(4\)"),
    ({"n_heads": 5}, r"n_heads=5 must divide model\.d_model=32"),
    ({"moe": {"num_experts": [4, 4]}}, r"lists 2 counts but the model has 4 MoE layers"),
])
def test_bad_configs_fail_at_once(bad, match):
    with pytest.raises(ConfigError, match=match):
        ModelConfig.from_dict({"d_model": 32, **bad}, path="model")


def test_bad_capacity_and_router_fail():
    with pytest.raises(ConfigError, match=r"capacity_factor_train=0.0 must be > 0"):
        MoEConfig(num_experts=4, capacity_factor_train=0.0)
    with pytest.raises(ConfigError, match="unknown preset 'gpt5'"):
        load_preset("gpt5")


def test_out_of_vocabulary_ids_fail_clearly():
    model = build_model(small_cfg())
    with pytest.raises(ConfigError, match=r"outside the vocabulary 0\.\.96"):
        model(torch.tensor([[1, 2, 97]]))
    with pytest.raises(ConfigError, match="max_seq_len"):
        model(torch.zeros(1, 65, dtype=torch.long))


def test_model_code_never_imports_torch_distributed():
    root = Path(__file__).resolve().parents[2] / "src" / "moelab" / "model"
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            assert not any(n.startswith("torch.distributed") for n in names), path


def test_qk_norm_and_attn_bias_spellings():
    base = dict(vocab_size=97, d_model=32, n_layers=2, n_heads=4, ffn_hidden=48)
    assert ModelConfig(**base).qk_norm_kind == "none" and ModelConfig(**base, qk_norm=True).qk_norm_kind == "head"
    assert ModelConfig(**base, attn_bias=True).attn_bias_kind == "qkv"
    assert ModelConfig.from_dict({**base, "qk_norm": "full", "attn_bias": "all"}).to_dict()["qk_norm"] == "full"
    with pytest.raises(ConfigError, match="qk_norm"):
        ModelConfig.from_dict({**base, "qk_norm": "rows"})
    with pytest.raises(ConfigError, match="attn_bias"):
        ModelConfig(**base, attn_bias="out")
    # the old bool spelling builds exactly the modules it built before
    names = set(build_model(ModelConfig(**base, qk_norm=True)).state_dict())
    assert names == set(build_model(ModelConfig(**base, qk_norm="head")).state_dict())


def test_full_qk_norm_normalises_the_whole_projection():
    cfg = ModelConfig(vocab_size=97, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, ffn_hidden=48,
                      qk_norm="full", attn_bias="all")
    attn = build_model(cfg, seed=0).blocks[0].attn
    assert attn.q_norm.weight.shape == (32,) and attn.k_norm.weight.shape == (16,)
    assert attn.wq.bias.shape == (32,) and attn.wo.bias.shape == (32,)


def test_global_balance_loss_pools_layers():
    from moelab.model.losses import load_balance_loss

    cfg = small_cfg(num_shared_experts=0, balance_loss_scope="global")
    model = build_model(cfg, seed=0)
    ids = torch.randint(0, cfg.vocab_size, (2, 8))
    out = model(ids, return_routing=True)
    probs = torch.cat([r.probs_TE for r in out.routing])
    expected = load_balance_loss(probs, torch.cat([r.expert_ids_TK for r in out.routing]))
    torch.testing.assert_close(out.balance_loss, expected)
    per_layer = build_model(small_cfg(num_shared_experts=0), seed=0)(ids).balance_loss
    assert not torch.allclose(out.balance_loss, per_layer)  # pooling is not the mean of layer losses
    with pytest.raises(ConfigError, match="balance_loss_scope"):
        small_cfg(num_experts=[4, 6, 2], balance_loss_scope="global")
