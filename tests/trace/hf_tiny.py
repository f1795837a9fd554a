"""Tiny random transformers models of every decoder MoE family (from config classes, no download).

Legend: T tokens, E experts, K experts per token.

`decoder_moe_families()` enumerates them from transformers' own config mapping: the model types whose
modeling file defines an `...Experts` module or an MoE block, minus encoder-decoder and vision-only models;
one row per modeling file (a multimodal family is traced through its text model).
"""

from __future__ import annotations

import os
import re

import torch

NOT_DECODERS = {"nllb_moe": "encoder-decoder translation model", "switch_transformers": "encoder-decoder (T5)",
                "vitpose_backbone": "vision backbone"}
HIDDEN, EXPERTS, TOP_K, VOCAB = 32, 8, 2, 128
_TINY = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=32, moe_intermediate_size=16,
             num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_hidden_layers=2,
             num_experts_per_tok=TOP_K, max_position_embeddings=64, shared_expert_intermediate_size=16,
             n_group=2, topk_group=1, first_k_dense_replace=0, num_experts=EXPERTS, num_local_experts=EXPERTS,
             n_routed_experts=EXPERTS, kv_lora_rank=8, q_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=4,
             v_head_dim=8, decoder_sparse_step=1, mlp_only_layers=[], num_dense_layers=0, moe_layer_freq=1,
             top_k_experts=TOP_K, enable_moe_block=True, expert_layer_period=1, expert_layer_offset=0,
             attn_layer_period=2, attn_layer_offset=1, num_nextn_predict_layers=0, sliding_window=16,
             moe_topk=TOP_K, zero_expert_num=2, expert_ffn_hidden_size=16, ffn_hidden_size=32, num_layers=2,
             num_kv_shared_layers=0, hidden_size_per_layer_input=0, vocab_size_per_layer_input=VOCAB,
             n_shared_experts=1, linear_num_key_heads=2, linear_num_value_heads=2, linear_key_head_dim=8,
             linear_value_head_dim=8, moe_num_experts=EXPERTS, moe_k=TOP_K, moe_intermediate_size_shared=16)


def transformers_dir() -> str:
    import transformers

    return transformers.__path__[0]


def decoder_moe_families() -> dict[str, str]:
    """{modeling module: first model_type using it} for every MoE modeling file of the installed transformers."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES, model_type_to_module_name

    root, out = transformers_dir(), {}
    for model_type in CONFIG_MAPPING_NAMES:
        mod = model_type_to_module_name(model_type)
        path = f"{root}/models/{mod}/modeling_{mod}.py"
        if mod in out or mod in NOT_DECODERS or not os.path.exists(path):
            continue
        src = open(path).read()
        if re.search(r"^class \w+Experts\(|^class \w+(MoE|Moe|CDMoE)\(", src, re.M):
            out[mod] = model_type
    return out


def _shrink(cfg) -> None:
    keys = cfg.to_dict()
    for k, v in _TINY.items():
        if k in keys:
            setattr(cfg, k, v)
    if "qk_rope_head_dim" in keys:  # MLA: the rotary part is the head_dim rotary embeddings see
        cfg.head_dim = cfg.qk_rope_head_dim
        if "qk_head_dim" in keys:
            cfg.qk_head_dim = cfg.qk_rope_head_dim + cfg.qk_nope_head_dim
    if keys.get("pad_token_id") is not None:
        cfg.pad_token_id = 0
    for k in ("bos_token_id", "eos_token_id"):
        if isinstance(keys.get(k), int) and keys[k] >= VOCAB:
            setattr(cfg, k, 1)
    n = getattr(cfg, "num_hidden_layers", 2)
    types = keys.get("layer_types")
    if isinstance(types, list) and types:
        attn = [t for t in types if "attention" in t and "linear" not in t] or types
        cfg.layer_types = [types[0], attn[-1]][:n]


def tiny_config(model_type: str):
    from transformers import AutoConfig

    cfg = AutoConfig.for_model(model_type)
    for sub in {id(c): c for c in (cfg, cfg.get_text_config())}.values():
        _shrink(sub)
    for extra in ("attn_config", "ffn_config"):  # DBRX nests its attention and FFN settings
        if hasattr(cfg, extra):
            sub = getattr(cfg, extra)
            for k, v in dict(kv_n_heads=2, rope_theta=10000.0, ffn_hidden_size=16, moe_num_experts=EXPERTS,
                             moe_top_k=TOP_K).items():
                if hasattr(sub, k):
                    setattr(sub, k, v)
    if hasattr(cfg, "d_model"):
        cfg.d_model, cfg.n_heads, cfg.n_layers, cfg.max_seq_len = HIDDEN, 4, 2, 64
    return cfg


def tiny_model(model_type: str, seed: int = 0):
    """A random tiny causal LM of the family (its text model for a multimodal one), eval mode, fp32."""
    from transformers import AutoModel, AutoModelForCausalLM

    cfg = tiny_config(model_type)
    torch.manual_seed(seed)
    for make, c in ((AutoModelForCausalLM, cfg), (AutoModelForCausalLM, cfg.get_text_config()),
                    (AutoModel, cfg.get_text_config())):
        try:
            return make.from_config(c).eval()
        except ValueError as e:
            if "Unrecognized configuration class" not in str(e):
                raise
    raise ValueError(f"no causal LM or text model class for {model_type}")
