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
             linear_value_head_dim=8, moe_num_experts=EXPERTS, moe_k=TOP_K, moe_intermediate_size_shared=16,
             index_head_dim=8, index_n_heads=2, index_topk=4, moe_hidden_size=HIDDEN,
             linear_head_dim=8, linear_num_heads=4)


# What the generic shrink cannot guess: keys spelled per family, or tied to another (mamba heads, mrope).
FAMILY_OVERRIDES: dict[str, dict] = {
    "bailing_hybrid": dict(num_expert_group=2, topk_group=1, num_experts_per_token=TOP_K, layer_group_size=2),
    "deepseek_ocr2": dict(n_group=1, topk_group=1),
    "deepseek_v4": dict(mlp_layer_types=["hash_moe", "moe"], head_dim=32, qk_rope_head_dim=4),
    "ernie4_5_vl_moe": dict(moe_intermediate_size=[16, 16], moe_num_shared_experts=1,
                            rope_parameters={"rope_type": "default", "rope_theta": 500000.0,
                                             "mrope_section": [1, 1, 2]}),
    # GLM-5-Next's sparse attention is NoPE and pools index keys in blocks that must divide index_topk.
    "glm5_next": dict(qk_rope_head_dim=0, index_kpool=2),
    "glm4v_moe": dict(head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                    "partial_rotary_factor": 0.5, "mrope_section": [1, 1, 2]}),
    "granitemoehybrid": dict(mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8, mamba_chunk_size=8),
    # Kolibri 1.1 rounds keys in blocks of 16 along head_dim; its indexer scores with <= heads per key head.
    # HY-V4-VL's mrope sections (time, height, width) must sum to half its rotary dims.
    "hy_v4_vl": dict(qk_rope_head_dim=8, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                          "mrope_section": [2, 1, 1]}),
    # Inkling2 checkpoints pad the unembedding to vocab_size; save pads it back from unpadded_vocab_size
    # (200058 by default, more rows than the tiny vocab). 8 padded rows, so the round trip does work.
    "inkling2": dict(unpadded_vocab_size=VOCAB - 8),
    "inkling2_loop": dict(unpadded_vocab_size=VOCAB - 8),
    "kolibri1_1": dict(head_dim=16, index_num_heads=2),
    "lfm2_moe": dict(layer_types=["conv", "full_attention"]),
    "qwen4_exp": dict(indexer_budget=8, indexer_compress_ratio=2, indexer_head_dim=8, indexer_n_heads=2,
                      indexer_kv_heads=1),
    "step3p7": dict(share_expert_dim=16),
    "zaya": dict(num_experts_per_tok=1),  # ZAYA routes each token to one expert (its validator says so)
}


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
        own = next((t for t in (mod, f"{mod}_text") if t in CONFIG_MAPPING_NAMES), model_type)
        if model_type != own:
            continue  # the family's own model_type (or its text model's) comes up in its turn
        with open(path, encoding="utf-8") as f:  # a few hundred files: one ResourceWarning each when left to the GC
            src = f.read()
        if re.search(r"^class \w+Experts\(|^class \w+(MoE|Moe|CDMoE)\(", src, re.M):
            out[mod] = model_type
    return out


def _overrides(keys: dict) -> dict:
    """Tiny values for the keys a config has (passed to its constructor so derived fields follow)."""
    out = {k: v for k, v in _TINY.items() if k in keys}
    if "qk_rope_head_dim" in keys:  # MLA: the rotary part is the head_dim rotary embeddings see
        out["head_dim"] = out["qk_rope_head_dim"]
        out["num_key_value_heads"] = out["num_attention_heads"]  # MLA has no grouped keys
        if "qk_head_dim" in keys:
            out["qk_head_dim"] = out["qk_rope_head_dim"] + out["qk_nope_head_dim"]
    if keys.get("pad_token_id") is not None:
        out["pad_token_id"] = 0
    for k in ("bos_token_id", "eos_token_id"):
        if isinstance(keys.get(k), int) and keys[k] >= VOCAB:
            out[k] = 1
    n = out.get("num_hidden_layers", 2)
    if "mlp_layer_types" in keys:
        out["mlp_layer_types"] = ["sparse"] * n
    types = keys.get("layer_types")
    if isinstance(types, list) and types:
        attn = [t for t in types if "attention" in t and "linear" not in t] or types
        out["layer_types"] = [types[0], attn[-1]][:n]
    return out


def _tiny_kwargs(model_type: str):
    """(the family's full-size text config, the tiny values its constructor gets)."""
    from transformers import AutoConfig

    text = AutoConfig.for_model(model_type).get_text_config()
    keys = text.to_dict()
    kw = _overrides(keys)
    for extra, tiny in (("attn_config", dict(kv_n_heads=2, rope_theta=10000.0)),  # DBRX nests these
                        ("ffn_config", dict(ffn_hidden_size=16, moe_num_experts=EXPERTS, moe_top_k=TOP_K))):
        if isinstance(keys.get(extra), dict):
            kw[extra] = {**keys[extra], **{k: v for k, v in tiny.items() if k in keys[extra]}}
    if "d_model" in keys:
        kw.update(d_model=HIDDEN, n_heads=4, n_layers=2, max_seq_len=64)
    kw.update(FAMILY_OVERRIDES.get(model_type.removesuffix("_text"), {}))
    return text, kw


def tiny_config(model_type: str):
    """The tiny config of the family's text decoder (a multimodal family's text config alone). Built by its
    constructor, so its validators run: a tiny config they reject could not be saved and read back, as
    users load a model, and fails here (the fix is a FAMILY_OVERRIDES row)."""
    text, kw = _tiny_kwargs(model_type)
    cfg = type(text)(**kw)
    if hasattr(cfg, "attn_config") and not hasattr(cfg.attn_config, "rope_theta"):
        cfg.attn_config.rope_theta = 10000.0  # DBRX's model reads keys its 5.x config lost
        cfg.attn_config.clip_qkv = getattr(cfg.attn_config, "clip_qkv", None) or 8.0
    return cfg


def unshrunk_fields(model_type: str) -> list[str]:
    """The family's integer config fields the tiny builder left at their full-size defaults: the usual
    suspects when a new family's tiny build fails (head counts, head or block sizes that must divide
    another). Named in the failure so the fix is a FAMILY_OVERRIDES row."""
    from transformers import AutoConfig

    full = AutoConfig.for_model(model_type).get_text_config().to_dict()
    try:
        tiny = tiny_config(model_type).to_dict()
    except Exception:  # noqa: BLE001 - a config its validators reject: the values it was given
        tiny = {**full, **_tiny_kwargs(model_type)[1]}
    return sorted(f"{k}={v}" for k, v in tiny.items() if type(v) is int and v > 1 and v == full.get(k)
                  and not k.endswith("_token_id") and k != "max_position_embeddings")


def tiny_model(model_type: str, seed: int = 0):
    """A random tiny causal LM of the family (its text model for a multimodal one), eval mode, fp32."""
    from transformers import AutoModel, AutoModelForCausalLM

    text = tiny_config(model_type)
    torch.manual_seed(seed)
    for make in (AutoModelForCausalLM, None, AutoModel):
        try:
            return (make.from_config(text) if make else _text_model_class(text)(text)).eval()
        except ValueError as e:
            if not str(e).startswith(("Unrecognized configuration class", "no text model class")):
                raise
    raise ValueError(f"no causal LM or text model class for {model_type}")


def _text_model_class(text_config):
    """The modeling file's class built from the text config (its text decoder), for families the auto
    classes reach only through a multimodal wrapper."""
    import importlib
    import inspect

    text_config_class = type(text_config)
    modeling = importlib.import_module(text_config_class.__module__.replace(".configuration_", ".modeling_"))
    found = [c for n, c in vars(modeling).items() if inspect.isclass(c) and n.endswith(("TextModel", "ForCausalLM"))
             and getattr(c, "config_class", None) is text_config_class]
    if not found:
        raise ValueError(f"no text model class for {text_config_class.__name__}")
    return sorted(found, key=lambda c: not c.__name__.endswith("ForCausalLM"))[0]
