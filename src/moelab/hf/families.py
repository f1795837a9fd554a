"""The transformers MoE families moelab converts, and their config.json -> a moelab ModelConfig.

Mixtral: every block MoE, top-k renormalised, no shared expert. Qwen2-MoE: a shared expert scaled by
sigmoid(x w), MoE every `decoder_sparse_step` blocks except `mlp_only_layers`, biases on q/k/v. Qwen3-MoE:
Qwen2's placement without a shared expert, RMSNorm on each query/key head. OLMoE: every block MoE,
RMSNorm on the whole query/key projections. All: RMSNorm pre-norm blocks, rotary embeddings over the full
head, SwiGLU experts, softmax router with transformers' `load_balancing_loss_func` (one loss over all
layers' tokens: moelab's balance_loss_scope = "global") and no z-loss.

DeepSeek-V3-style families whose other blocks moelab expresses (CONVERT_DSV3: dots1, GLM-4 MoE) convert
too: sigmoid router scores, the correction bias (moelab's selection bias, frozen), group-limited top-k,
routed scaling, `first_k_dense_replace` dense blocks and ungated shared experts. Families whose other
blocks moelab lacks are refused naming the missing piece (MISSING_PIECE).

config.json is read as plain JSON so a conversion needs no transformers install; fields it leaves out take
the defaults of transformers' config classes (DEFAULTS, checked against those classes by the tests). A
setting moelab cannot reproduce raises a one-line MoelabError naming it rather than converting something else.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from moelab.config import ConfigError, MoelabError
from moelab.model.config import ModelConfig, MoEConfig, RouterConfig

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")  # both directions, softmax routers
CONVERT_DSV3 = ("dots1", "glm4_moe")  # transformers -> moelab only
ARCHITECTURES = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
                 "qwen3_moe": "Qwen3MoeForCausalLM", "olmoe": "OlmoeForCausalLM",
                 "dots1": "Dots1ForCausalLM", "glm4_moe": "Glm4MoeForCausalLM"}
_MLA = "multi-head latent attention (MLA: low-rank compressed keys/values, kv_lora_rank)"
MISSING_PIECE = {
    "deepseek_v2": _MLA, "deepseek_v3": _MLA, "glm4_moe_lite": _MLA, "mistral4": _MLA, "mistral_large4": _MLA,
    "deepseek_v32": _MLA + " and a sparse-attention indexer", "glm_moe_dsa": _MLA + " and a sparse-attention indexer",
    "kimi_linear": "linear-attention (KDA) layers and " + _MLA, "longcat_flash": "zero-computation experts and " + _MLA,
    "solar_open": "its attention layout", "exaone_moe": "sliding-window attention layers",
    "mimo_v2_flash": "sliding-window attention layers with attention sinks",
    "nemotron_h": "Mamba-2 layers and squared-ReLU experts", "bailing_hybrid": "linear-attention layers",
    "glm4v_moe": "multimodal rotary embeddings (M-RoPE) and the vision tower",
}
_COMMON = {"hidden_act": "silu", "initializer_range": 0.02, "tie_word_embeddings": False,
           "attention_dropout": 0.0, "head_dim": None}
_QWEN = {"decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": False, "use_sliding_window": False,
         "router_aux_loss_coef": 0.001, "vocab_size": 151936, "hidden_size": 2048, "num_hidden_layers": 24,
         "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 10000.0}
DEFAULTS: dict[str, dict[str, Any]] = {
    "mixtral": {**_COMMON, "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
                "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 1e6,
                "sliding_window": None, "num_experts_per_tok": 2, "num_local_experts": 8,
                "router_aux_loss_coef": 0.001, "router_jitter_noise": 0.0},
    "qwen2_moe": {**_COMMON, **_QWEN, "intermediate_size": 5632, "num_attention_heads": 16,
                  "num_key_value_heads": 16, "moe_intermediate_size": 1408,
                  "shared_expert_intermediate_size": 5632, "num_experts_per_tok": 4, "num_experts": 60,
                  "qkv_bias": True},
    "qwen3_moe": {**_COMMON, **_QWEN, "intermediate_size": 6144, "num_attention_heads": 32,
                  "num_key_value_heads": 4, "moe_intermediate_size": 768, "num_experts_per_tok": 8,
                  "num_experts": 128, "attention_bias": False},
    "dots1": {**_COMMON, "vocab_size": 152064, "hidden_size": 4608, "intermediate_size": 10944,
              "moe_intermediate_size": 1408, "num_hidden_layers": 62, "num_attention_heads": 32,
              "num_key_value_heads": 32, "n_shared_experts": None, "n_group": 1, "topk_group": 1,
              "first_k_dense_replace": 0, "norm_topk_prob": False, "max_position_embeddings": 2048,
              "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "attention_bias": False, "routed_scaling_factor": 1.0},
    "glm4_moe": {**_COMMON, "vocab_size": 151552, "hidden_size": 4096, "intermediate_size": 10944,
                 "num_hidden_layers": 46, "num_attention_heads": 96, "num_key_value_heads": 8,
                 "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
                 "attention_bias": False, "moe_intermediate_size": 1408, "num_experts_per_tok": 8,
                 "n_shared_experts": 1, "n_routed_experts": 128, "routed_scaling_factor": 1.0, "n_group": 1,
                 "topk_group": 1, "first_k_dense_replace": 1, "norm_topk_prob": True, "use_qk_norm": False},
    "olmoe": {**_COMMON, "vocab_size": 50304, "hidden_size": 2048, "intermediate_size": 2048,
              "num_hidden_layers": 16, "num_attention_heads": 16, "num_key_value_heads": None,
              "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
              "attention_bias": False, "clip_qkv": None, "num_experts_per_tok": 8, "num_experts": 64,
              "router_aux_loss_coef": 0.01, "norm_topk_prob": False},
}


def read_hf_config(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise MoelabError(f"{folder} has no config.json: not a transformers checkpoint")
    try:
        raw = json.loads(path.read_text())
    except ValueError as e:  # JSONDecodeError, or UnicodeDecodeError for bytes that are not text
        raise MoelabError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise MoelabError(f"{path} is not a JSON object")
    return raw


def family_of(raw: dict[str, Any]) -> str:
    """The family of a config.json, from model_type (or the architecture class name)."""
    kind = raw.get("model_type")
    if kind in MISSING_PIECE:
        raise MoelabError(f"cannot convert {kind!r}: moelab's model has no {MISSING_PIECE[kind]} "
                          "(trace it with `moelab trace --hf` instead)")
    if kind not in FAMILIES + CONVERT_DSV3:
        by_arch = {a: f for f, a in ARCHITECTURES.items()}
        kind = next((by_arch[a] for a in raw.get("architectures") or [] if a in by_arch), None)
    if kind is None:
        what = raw.get("model_type") or (raw.get("architectures") or ["(no model_type)"])[0]
        raise MoelabError(f"unsupported architecture {what!r}: moelab converts "
                          f"{', '.join(FAMILIES + CONVERT_DSV3)}")
    return kind


class HFFields:
    """config.json values with the family's defaults filled in; errors name the field."""

    def __init__(self, raw: dict[str, Any], family: str):
        self.raw, self.family = raw, family
        self.defaults = DEFAULTS[family]

    def __getitem__(self, key: str) -> Any:
        value = self.raw.get(key, self.defaults.get(key))
        return self.defaults.get(key) if value is None and key in self.raw else value

    @property
    def num_experts(self) -> int:
        """Configs of one family spell it num_experts or num_local_experts, by transformers version."""
        for key in ("num_local_experts", "num_experts", "n_routed_experts"):
            if self.raw.get(key) is not None:
                return self.raw[key]
        d = self.defaults
        return d.get("num_local_experts", d.get("num_experts", d.get("n_routed_experts")))

    def refuse(self, key: str, value: Any, why: str) -> None:
        raise MoelabError(f"{self.family} config: {key}={value!r} is not supported ({why})")


def rope_base(f: HFFields) -> float:
    """rope_theta of plain rotary embeddings (transformers 5's rope_parameters or 4's rope_theta)."""
    params = f.raw.get("rope_parameters") or {}
    scaling = f.raw.get("rope_scaling")
    if scaling:
        f.refuse("rope_scaling", scaling, "moelab's rotary embedding has no scaling")
    if params.get("rope_type", "default") != "default":
        f.refuse("rope_parameters.rope_type", params["rope_type"], "only the default rotary embedding")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        f.refuse("rope_parameters.partial_rotary_factor", params["partial_rotary_factor"],
                 "moelab's rotary embedding turns the whole head: partial rotary embeddings are missing")
    extra = sorted(set(params) - {"rope_type", "rope_theta", "partial_rotary_factor"})
    if extra:
        f.refuse(f"rope_parameters.{extra[0]}", params[extra[0]], "only rope_theta is mapped")
    if f.raw.get("partial_rotary_factor", 1.0) != 1.0:
        f.refuse("partial_rotary_factor", f.raw["partial_rotary_factor"], "rotation covers the full head")
    return float(params.get("rope_theta", f["rope_theta"]))


def check_common(f: HFFields) -> None:
    if f["hidden_act"] not in ("silu", "swish"):
        f.refuse("hidden_act", f["hidden_act"], "moelab's SwiGLU uses silu")
    if f["attention_dropout"]:
        f.refuse("attention_dropout", f["attention_dropout"], "moelab attention has no dropout")
    if f.raw.get("quantization_config"):
        f.refuse("quantization_config", f.raw["quantization_config"].get("quant_method", "?"),
                 "convert an unquantised checkpoint")
    if f.raw.get("use_sliding_window"):
        f.refuse("use_sliding_window", True, "moelab attention is full causal")
    window = f.raw.get("sliding_window") if f.family == "mixtral" else None
    if window is not None and window < f["max_position_embeddings"]:
        f.refuse("sliding_window", window, "moelab attention is full causal")
    kinds = set(f.raw.get("layer_types") or []) - {"full_attention"}
    if kinds:
        f.refuse("layer_types", sorted(kinds)[0], "moelab attention is full causal")
    if f.family == "mixtral" and f["router_jitter_noise"]:
        f.refuse("router_jitter_noise", f["router_jitter_noise"],
                 "Mixtral jitters the experts' input too, moelab only the router's")
    if f.family == "olmoe" and f["clip_qkv"] is not None:
        f.refuse("clip_qkv", f["clip_qkv"], "moelab attention does not clip q, k, v")


def _dsv3_moe_config(f: HFFields) -> MoEConfig:
    """dots1 / GLM-4 MoE: DeepSeek-V3's router, dense first blocks, ungated shared experts."""
    shared = f["n_shared_experts"] or 0
    router = RouterConfig(kind="linear", score="sigmoid", renormalize=bool(f["norm_topk_prob"]),
                          n_group=f["n_group"], topk_group=f["topk_group"],
                          routed_scaling_factor=float(f["routed_scaling_factor"]),
                          bias_balance=True, bias_update_rate=0.0)  # the checkpoint's correction bias, frozen
    return MoEConfig(
        num_experts=f.num_experts, top_k=f["num_experts_per_tok"], moe_every=1,
        dense_layers=list(range(min(f["first_k_dense_replace"], f["num_hidden_layers"]))),
        expert_hidden=f["moe_intermediate_size"], num_shared_experts=shared,
        shared_hidden=f["moe_intermediate_size"] if shared else None,
        shared_placement="parallel" if shared else "none", shared_gate=False,
        capacity_factor_train=None, capacity_factor_eval=None, balance_coef=0.0, z_coef=0.0, router=router)


def _moe_config(f: HFFields) -> MoEConfig:
    fam = f.family
    if fam in CONVERT_DSV3:
        return _dsv3_moe_config(f)
    shared = f["shared_expert_intermediate_size"] if fam == "qwen2_moe" else 0
    qwen = fam in ("qwen2_moe", "qwen3_moe")
    experts = f.num_experts
    expert_hidden = f["moe_intermediate_size"] if qwen else f["intermediate_size"]
    return MoEConfig(
        num_experts=experts, top_k=f["num_experts_per_tok"],
        moe_every=f["decoder_sparse_step"] if qwen else 1,
        dense_layers=sorted(set(f["mlp_only_layers"])) if qwen else [],
        expert_hidden=expert_hidden, num_shared_experts=1 if shared else 0, shared_hidden=shared or None,
        shared_placement="parallel" if shared else "none", shared_gate=bool(shared),
        capacity_factor_train=None, capacity_factor_eval=None,
        balance_coef=float(f["router_aux_loss_coef"]), z_coef=0.0, balance_loss_scope="global",
        router=RouterConfig(kind="linear", renormalize=fam == "mixtral" or bool(f["norm_topk_prob"])))


def _attention(f: HFFields) -> dict[str, Any]:
    D, H = f["hidden_size"], f["num_attention_heads"]
    head_dim = f["head_dim"] or D // H
    if f.family == "olmoe" and head_dim * H != D:
        f.refuse("head_dim", head_dim, "OLMoE's QK-norm spans hidden_size, so heads must tile it")
    bias = {"mixtral": "none", "qwen2_moe": "qkv" if f["qkv_bias"] else "none",
            "glm4_moe": "qkv" if f["attention_bias"] else "none"}.get(  # GLM's output projection has none
        f.family, "all" if f["attention_bias"] else "none")
    qk = {"qwen3_moe": "head", "olmoe": "full", "dots1": "head",
          "glm4_moe": "head" if f["use_qk_norm"] else "none"}.get(f.family, "none")
    return {"n_heads": H, "n_kv_heads": f["num_key_value_heads"] or H,
            "head_dim": head_dim if head_dim * H != D else None, "attn_bias": bias, "qk_norm": qk}


def moelab_config(raw: dict[str, Any]) -> tuple[str, ModelConfig]:
    """(family, ModelConfig) of a transformers config.json dict."""
    try:
        return _moelab_config(raw)
    except ConfigError as e:
        raise MoelabError(f"{raw.get('model_type')} config does not make a valid moelab model: {e}") from None
    except (TypeError, ValueError, AttributeError, KeyError) as e:  # a value of the wrong JSON type
        raise MoelabError(f"config.json holds a value of the wrong type ({type(e).__name__}: {e})") from None


def _moelab_config(raw: dict[str, Any]) -> tuple[str, ModelConfig]:
    family = family_of(raw)
    f = HFFields(raw, family)
    check_common(f)
    experts = f.num_experts
    if not experts or experts < 1:
        f.refuse("num_experts", experts, "moelab converts MoE models")
    if family == "qwen2_moe" and f["shared_expert_intermediate_size"] < 0:
        f.refuse("shared_expert_intermediate_size", f["shared_expert_intermediate_size"], "must be >= 0")
    cfg = ModelConfig(
        vocab_size=f["vocab_size"], d_model=f["hidden_size"], n_layers=f["num_hidden_layers"],
        ffn_hidden=f["intermediate_size"], ffn_kind="swiglu", max_seq_len=f["max_position_embeddings"],
        rope_base=rope_base(f), norm_eps=float(f["rms_norm_eps"]),
        tie_embeddings=bool(f["tie_word_embeddings"]), init_std=float(f["initializer_range"]),
        moe=_moe_config(f), **_attention(f))
    return family, cfg
