"""A moelab ModelConfig -> the transformers family that computes the same function, and its config.json.

Each setting that matters either fits every family or narrows the candidates (`FEATURES`); the first
setting that no remaining family has is named in the error. When several fit, PREFERENCE picks one.
Training-only settings are left out: the z-loss (transformers has none), a training capacity factor
(inference there is dropless, as is moelab's with capacity_factor_eval unset) and the balance-loss scope
(transformers always pools the layers: moelab's balance_loss_scope = "global").
"""

from __future__ import annotations

from typing import Any

from moelab.config import MoelabError
from moelab.hf.families import ARCHITECTURES, FAMILIES
from moelab.model.config import ModelConfig

PREFERENCE = ("mixtral", "qwen3_moe", "olmoe", "qwen2_moe")
ALL = frozenset(PREFERENCE)  # FAMILIES: the DeepSeek-V3-style ones convert one way only


def unsupported(cfg: ModelConfig) -> str | None:
    """The first setting no transformers MoE family has, whatever the family."""
    m, r = cfg.moe, cfg.moe.router
    checks = [
        (not cfg.is_moe, "the model is dense (model.moe.num_experts=0)"),
        (isinstance(m.num_experts, list), f"per-layer expert counts (model.moe.num_experts={m.num_experts})"),
        (cfg.ffn_kind != "swiglu", f"model.ffn_kind={cfg.ffn_kind!r} (transformers' MoE experts are SwiGLU)"),
        (r.kind != "linear", f"the {r.kind} router (model.moe.router.kind={r.kind!r})"),
        (r.bias_balance, "aux-loss-free selection biases (model.moe.router.bias_balance=true)"),
        (r.score != "softmax", f"{r.score} router scores (model.moe.router.score={r.score!r})"),
        (r.n_group > 1, f"group-limited routing (model.moe.router.n_group={r.n_group})"),
        (r.routed_scaling_factor != 1.0,
         f"a routed scaling factor (model.moe.router.routed_scaling_factor={r.routed_scaling_factor})"),
        (r.jitter > 0, f"router input jitter (model.moe.router.jitter={r.jitter})"),
        (m.capacity_factor_eval is not None,
         f"capacity-based dropping (model.moe.capacity_factor_eval={m.capacity_factor_eval})"),
        (cfg.num_shared and m.shared_placement == "sequential",
         "a sequential shared expert (model.moe.shared_placement='sequential')"),
        (cfg.num_shared and not m.shared_gate,
         "a parallel shared expert without a sigmoid gate (model.moe.shared_gate=false)"),
    ]
    return next((what for bad, what in checks if bad), None)


def features(cfg: ModelConfig) -> list[tuple[str, frozenset[str]]]:
    """(setting, families that have it) for every setting that narrows the choice."""
    m = cfg.moe
    qk = cfg.qk_norm_kind
    bias = cfg.attn_bias_kind
    return [
        (f"model.qk_norm={qk!r}", {"none": frozenset({"mixtral", "qwen2_moe"}),
                                   "head": frozenset({"qwen3_moe"}), "full": frozenset({"olmoe"})}[qk]),
        (f"model.attn_bias={bias!r}", {"none": ALL, "qkv": frozenset({"qwen2_moe"}),
                                       "all": frozenset({"qwen3_moe", "olmoe"})}[bias]),
        ("a gated shared expert (model.moe.num_shared_experts)",
         frozenset({"qwen2_moe"}) if cfg.num_shared else ALL),
        (f"dense blocks (model.moe.moe_every={m.moe_every}, dense_layers={m.dense_layers})",
         frozenset({"qwen2_moe", "qwen3_moe"}) if len(cfg.moe_layer_ids()) < cfg.n_layers else ALL),
        ("raw softmax combine weights (model.moe.router.renormalize=false)",
         ALL - {"mixtral"} if not m.router.renormalize else ALL),
        (f"model.head_dim={cfg.head_dim} != d_model / n_heads",
         ALL - {"olmoe"} if cfg.head_size * cfg.n_heads != cfg.d_model else ALL),
    ]


def choose_family(cfg: ModelConfig, family: str | None = None) -> str:
    """The transformers family for cfg (or check that `family` fits); MoelabError names the blocker."""
    bad = unsupported(cfg)
    if bad:
        raise MoelabError(f"cannot export to transformers: {bad} has no counterpart there")
    if family is not None and family not in PREFERENCE:
        raise MoelabError(f"unknown family {family!r} (known: {', '.join(FAMILIES)})")
    left = frozenset({family}) if family else ALL
    for what, fits in features(cfg):
        if not left & fits:
            where = family or " or ".join(sorted(left))
            raise MoelabError(f"cannot export to transformers: {what} has no counterpart in {where}")
        left &= fits
    return next(f for f in PREFERENCE if f in left)


def hf_config(cfg: ModelConfig, family: str, dtype: str = "float32") -> dict[str, Any]:
    """config.json of `family` describing the same model as cfg (choose_family must have accepted it)."""
    m = cfg.moe
    out: dict[str, Any] = {
        "architectures": [ARCHITECTURES[family]], "model_type": family, "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads, "hidden_act": "silu", "max_position_embeddings": cfg.max_seq_len,
        "initializer_range": cfg.init_std, "rms_norm_eps": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
        "rope_theta": cfg.rope_base, "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_base},
        "attention_dropout": 0.0, "num_experts_per_tok": m.top_k, "router_aux_loss_coef": m.balance_coef,
        "output_router_logits": False, "use_cache": True, "dtype": dtype,
        # a moelab checkpoint does not know its tokenizer's special ids; the families' defaults may not fit
        "bos_token_id": None, "eos_token_id": None, "pad_token_id": None,
    }
    if family != "olmoe":
        out["head_dim"] = cfg.head_size
    if family == "mixtral":
        out.update(intermediate_size=cfg.expert_hidden, num_local_experts=m.num_experts, sliding_window=None,
                   router_jitter_noise=0.0)
        return out
    out.update(num_experts=m.num_experts, norm_topk_prob=m.router.renormalize)
    if family == "olmoe":
        out.update(intermediate_size=cfg.expert_hidden, attention_bias=cfg.attn_bias_kind == "all",
                   clip_qkv=None)
        return out
    out.update(intermediate_size=cfg.ffn_hidden, moe_intermediate_size=cfg.expert_hidden,
               decoder_sparse_step=m.moe_every, mlp_only_layers=sorted(m.dense_layers),
               use_sliding_window=False)
    if family == "qwen3_moe":
        out["attention_bias"] = cfg.attn_bias_kind == "all"
    else:  # a zero-width shared expert adds nothing, which is how a model without one is written
        out.update(qkv_bias=cfg.attn_bias_kind == "qkv", max_window_layers=cfg.n_layers,
                   shared_expert_intermediate_size=cfg.num_shared * cfg.shared_hidden if cfg.num_shared else 0)
    return out
