"""Tiny random transformers models of each family, built from their config classes (no download)."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

COMMON = dict(vocab_size=101, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=64)

# family -> (config class, model class, config kwargs): each exercises the family's own settings.
FAMILY_SPECS = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                dict(num_hidden_layers=2, intermediate_size=48, num_local_experts=8, num_experts_per_tok=2,
                     rope_theta=1e6)),
    # a shared expert with its gate, MoE every second block, q/k/v biases, raw softmax weights
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(num_hidden_layers=4, intermediate_size=40, moe_intermediate_size=24,
                       shared_expert_intermediate_size=36, num_experts=6, num_experts_per_tok=2,
                       decoder_sparse_step=2, norm_topk_prob=False, qkv_bias=True)),
    # per-head QK-norm, mlp_only_layers, head_dim != hidden / heads, renormalised top-3, all-attention biases
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(num_hidden_layers=3, intermediate_size=40, moe_intermediate_size=24, num_experts=8,
                       num_experts_per_tok=3, norm_topk_prob=True, mlp_only_layers=[0], head_dim=16,
                       attention_bias=True)),
    # QK-norm over the full projection width, tied embeddings
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM",
              dict(num_hidden_layers=2, intermediate_size=24, num_experts=8, num_experts_per_tok=2,
                   tie_word_embeddings=True, pad_token_id=0, eos_token_id=1)),
}
FAMILIES = list(FAMILY_SPECS)  # the order of moelab.hf.families.FAMILIES, which test files parametrize over


def hf_config(family, **overrides):
    cfg_cls, _, kw = FAMILY_SPECS[family]
    return getattr(transformers, cfg_cls)(**{**COMMON, **kw, **overrides})


@torch.no_grad()
def randomize_norms_and_biases(model, seed=0):
    """Norm weights start at 1 and biases at 0, which would hide a swapped or dropped tensor."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "norm" in name or name.endswith(".bias"):
            centre = 1.0 if "norm" in name else 0.0
            p.copy_(centre + 0.2 * torch.randn(p.shape, generator=g))


def build_hf(family, seed=0, **overrides):
    _, model_cls, _ = FAMILY_SPECS[family]
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(hf_config(family, **overrides)).eval()
    randomize_norms_and_biases(model, seed)
    return model


@pytest.fixture(scope="session")
def make_hf():
    """build_hf(family, seed=0, **config_overrides) -> a tiny random transformers model in eval mode."""
    return build_hf


@pytest.fixture(scope="session")
def hf_dirs(tmp_path_factory):
    """family -> folder of a saved tiny model (hub layout: one tensor per expert)."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for family in FAMILIES:
        build_hf(family).save_pretrained(root / family)
        out[family] = root / family
    return out


@pytest.fixture(scope="session")
def converted(hf_dirs, tmp_path_factory):
    """family -> moelab checkpoint folder converted from hf_dirs[family]."""
    from moelab.hf.convert import import_hf

    root = tmp_path_factory.mktemp("moelab")
    return {family: import_hf(path, root / family) for family, path in hf_dirs.items()}
