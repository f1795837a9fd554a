"""DeepSeek-V3-style transformers families -> moelab (dots1, GLM-4 MoE): same logits and routing, or a
one-line refusal naming what moelab's model lacks (MLA attention, partial rotary embeddings, ...)."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from moelab.config import MoelabError  # noqa: E402
from moelab.hf.convert import export_hf, import_hf  # noqa: E402
from moelab.train.checkpoint import load_model  # noqa: E402

TOL = 1e-4
COMMON = dict(vocab_size=101, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, head_dim=8, n_routed_experts=8, n_shared_experts=2,
              num_experts_per_tok=3, n_group=4, topk_group=2, first_k_dense_replace=1, routed_scaling_factor=2.5,
              max_position_embeddings=64)


def _hf(family, **kw):
    torch.manual_seed(0)
    if family == "dots1":
        model = transformers.Dots1ForCausalLM(transformers.Dots1Config(**{**COMMON, **kw}))
    else:
        rope = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 1.0}
        model = transformers.Glm4MoeForCausalLM(transformers.Glm4MoeConfig(
            **{**COMMON, "rope_parameters": rope, "attention_bias": True, "use_qk_norm": True, **kw}))
    with torch.no_grad():  # a visible correction bias, so a conversion that dropped it would mis-route
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.randn(buf.shape) * 0.2)
        for p in model.parameters():  # random init scale big enough for routing to depend on the input
            p.normal_(0, 0.3) if p.dim() > 1 else None
    return model.eval()


@pytest.mark.parametrize("family,kw", [("dots1", {"norm_topk_prob": True}), ("dots1", {"norm_topk_prob": False}),
                                       ("glm4_moe", {"norm_topk_prob": True})])
def test_logits_and_routing_match_transformers(family, kw, tmp_path):
    hf = _hf(family, **kw)
    hf.save_pretrained(tmp_path / "hf")
    try:
        ours = load_model(import_hf(tmp_path / "hf", tmp_path / "ours"))
    except MoelabError as e:  # an older release's defaults (GLM-4.5's partial rotary in 5.17): refused in one line
        from moelab.trace.adapters import transformers_older_than_checked

        if transformers_older_than_checked() and "\n" not in str(e):
            pytest.skip(f"transformers {transformers.__version__}'s {family} defaults: {e}")
        raise
    cfg = json.loads((tmp_path / "ours" / "config.json").read_text())["model"]
    assert cfg["moe"]["router"]["score"] == "sigmoid" and cfg["moe"]["dense_layers"] == [0]
    ids = torch.randint(0, 101, (3, 20), generator=torch.Generator().manual_seed(1))
    got = []
    hooks = [m.register_forward_hook(lambda mod, a, out: got.append(out)) for m in hf.modules()
             if type(m).__name__.endswith("TopkRouter")]
    with torch.no_grad():
        ref = hf(ids).logits
        out = ours(ids, return_routing=True)
    for h in hooks:
        h.remove()
    diff = (out.logits - ref).abs().max().item()
    print(f"{family} {kw}: max |logit difference| = {diff:.2e}")
    assert diff < TOL
    for rec, (_, w_ref, ids_ref) in zip(out.routing, got):
        mine, theirs = rec.expert_ids_TK.sort(-1), ids_ref.sort(-1)
        assert torch.equal(mine.values, theirs.values)
        torch.testing.assert_close(rec.weights_TK.gather(1, mine.indices), w_ref.gather(1, theirs.indices))


@pytest.mark.parametrize("model_type,piece", [("deepseek_v3", "multi-head latent attention"),
                                              ("kimi_linear", "linear-attention"),
                                              ("glm4_moe_lite", "multi-head latent attention")])
def test_families_with_missing_blocks_are_refused_naming_them(model_type, piece, tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": model_type}))
    with pytest.raises(MoelabError, match=piece) as err:
        import_hf(tmp_path / "m", tmp_path / "out")
    assert "\n" not in str(err.value) and not (tmp_path / "out").exists()


def test_real_glm4_moe_partial_rotary_is_refused(tmp_path):
    transformers.Glm4MoeConfig(**COMMON).save_pretrained(tmp_path / "m")  # default: partial_rotary_factor 0.5
    with pytest.raises(MoelabError, match="partial rotary embeddings are missing"):
        import_hf(tmp_path / "m", tmp_path / "out")


def test_a_converted_dsv3_model_does_not_export(tmp_path):
    _hf("dots1").save_pretrained(tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "ours")
    with pytest.raises(MoelabError, match="cannot export"):
        export_hf(tmp_path / "ours", tmp_path / "back")
