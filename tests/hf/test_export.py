"""moelab checkpoint -> transformers: the family that fits, the same logits in transformers, lossless back."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from moelab.config import MoelabError
from moelab.hf.convert import export_hf, import_hf
from moelab.hf.export_config import choose_family
from moelab.model.config import ModelConfig, MoEConfig, RouterConfig
from moelab.model.transformer import build_model
from moelab.train.checkpoint import load_model, save_checkpoint


def moelab_cfg(moe=None, router=None, **model):
    base = dict(vocab_size=97, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, ffn_hidden=40, max_seq_len=64,
                rope_base=5e5, norm_eps=1e-5)
    moe_kw = dict(num_experts=6, top_k=2, expert_hidden=24, num_shared_experts=0, shared_placement="none")
    moe_kw.update(moe or {})
    return ModelConfig(**{**base, **model},
                       moe=MoEConfig(**moe_kw, router=RouterConfig(**{"renormalize": True, **(router or {})})))


# name -> (config, the family it must export to)
FITTING = {
    "mixtral": (moelab_cfg(tie_embeddings=True), "mixtral"),
    "qwen2-shared-sparse-step": (moelab_cfg(attn_bias="qkv", moe=dict(
        num_shared_experts=2, shared_hidden=12, shared_placement="parallel", shared_gate=True, moe_every=2),
        router=dict(renormalize=False)), "qwen2_moe"),
    "qwen3-head-norm-dense-layer": (moelab_cfg(qk_norm="head", attn_bias="all", head_dim=16,
                                               moe=dict(dense_layers=[1])), "qwen3_moe"),
    "olmoe-full-norm": (moelab_cfg(qk_norm="full", n_kv_heads=4, router=dict(renormalize=False)), "olmoe"),
    # raw softmax weights with no shared expert: Qwen2-MoE with a zero-width shared expert
    "raw-softmax-plain": (moelab_cfg(router=dict(renormalize=False)), "qwen2_moe"),
}


@torch.no_grad()
def _random_model(cfg, seed=0):
    model = build_model(cfg, seed=seed).eval()
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "norm" in name or name.endswith(".bias"):
            p.copy_((1.0 if "norm" in name else 0.0) + 0.2 * torch.randn(p.shape, generator=g))
    return model


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")  # the zero-width shared expert
@pytest.mark.parametrize("name", list(FITTING))
def test_exported_model_gives_the_same_logits_in_transformers(name, tmp_path):
    cfg, family = FITTING[name]
    assert choose_family(cfg) == family
    model = _random_model(cfg)
    save_checkpoint(tmp_path / "ckpt", model, {"model": cfg.to_dict()}, step=3)
    export_hf(tmp_path / "ckpt", tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == family
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours, theirs = model(ids, return_routing=True), hf(ids, output_router_logits=True)
    diff = (ours.logits - theirs.logits).abs().max().item()
    print(f"{name} -> {family}: max |logit difference| = {diff:.2e}")
    assert diff < 1e-4
    for rec, logits in zip(ours.routing, theirs.router_logits):
        assert torch.equal(rec.expert_ids_TK, torch.topk(logits.float().softmax(-1), cfg.moe.top_k).indices)
    # and back: export then import is the identity on weights
    import_hf(tmp_path / "hf", tmp_path / "back")
    back = load_model(tmp_path / "back").state_dict()
    assert set(back) == set(model.state_dict())
    assert all(torch.equal(back[k], v) for k, v in model.state_dict().items())


BLOCKED = {
    "capacity": (moelab_cfg(moe=dict(capacity_factor_eval=2.0)), "capacity-based dropping"),
    "rmoe": (moelab_cfg(router=dict(kind="rmoe", hidden=8)), "rmoe router"),
    "cosine": (moelab_cfg(router=dict(kind="cosine", hidden=8)), "cosine router"),
    "hash": (moelab_cfg(router=dict(kind="hash")), "hash router"),
    "per-layer-experts": (moelab_cfg(moe=dict(num_experts=[4, 6, 4])), "per-layer expert counts"),
    "geglu": (moelab_cfg(ffn_kind="geglu"), "ffn_kind='geglu'"),
    "openmoe-ffn": (moelab_cfg(ffn_kind="openmoe"), "ffn_kind='openmoe'"),
    "ungated-shared": (moelab_cfg(moe=dict(num_shared_experts=1, shared_placement="parallel")),
                       "without a sigmoid gate"),
    "sequential-shared": (moelab_cfg(moe=dict(num_shared_experts=1, shared_placement="sequential",
                                              shared_gate=True)), "sequential shared expert"),
    "shared-with-head-norm": (moelab_cfg(qk_norm="head", moe=dict(
        num_shared_experts=1, shared_placement="parallel", shared_gate=True)), "shared expert"),
    "olmoe-with-dense-blocks": (moelab_cfg(qk_norm="full", moe=dict(moe_every=2)), "dense blocks"),
    "dense": (moelab_cfg(moe=dict(num_experts=0)), "dense"),
}


@pytest.mark.parametrize("name", list(BLOCKED))
def test_settings_without_counterpart_are_named(name):
    cfg, words = BLOCKED[name]
    with pytest.raises(MoelabError, match="cannot export") as err:
        choose_family(cfg)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_asked_family_must_fit():
    cfg = moelab_cfg(router=dict(renormalize=False))
    with pytest.raises(MoelabError, match="renormalize=false.*mixtral"):
        choose_family(cfg, "mixtral")
    assert choose_family(moelab_cfg(), "qwen2_moe") == "qwen2_moe"
    with pytest.raises(MoelabError, match="unknown family"):
        choose_family(moelab_cfg(), "llama")


def test_export_refuses_before_writing(tmp_path):
    cfg = BLOCKED["capacity"][0]
    save_checkpoint(tmp_path / "ckpt", build_model(cfg, seed=0), {"model": cfg.to_dict()}, step=0)
    with pytest.raises(MoelabError, match="capacity_factor_eval=2.0"):
        export_hf(tmp_path / "ckpt", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
