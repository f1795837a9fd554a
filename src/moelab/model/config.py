"""Model configs (ModelConfig, MoEConfig, RouterConfig) and analytic parameter counts.

Counts are computed from the config alone, so `moelab params openmoe-34b-32e` answers in milliseconds
without allocating a weight; tests check them against built modules for every small preset.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from moelab.config import Config, ConfigError, check_seed, require

ROUTER_KINDS = ("linear", "rmoe", "mlp", "cosine", "random", "hash")
FFN_KINDS = ("swiglu", "geglu", "openmoe")
# How many D x F matrices feed the hidden units of each FFN kind (plus one F x D output).
FFN_IN_PROJECTIONS = {"swiglu": 2, "geglu": 2, "openmoe": 3}
# The bool spellings of qk_norm and attn_bias predate their modes; both stay valid (false = "none").
QK_NORMS = ("none", "head", "full")  # head: RMSNorm over each head (Qwen3); full: over the projection (OLMoE)
ATTN_BIASES = ("none", "qkv", "all")  # qkv: biases on q, k, v (Qwen2); all: on the output projection too


@dataclasses.dataclass(kw_only=True)
class RouterConfig(Config):
    kind: str = "linear"
    renormalize: bool = False  # False: raw softmax weights (OpenMoE); True: renormalised over the k (Mixtral)
    jitter: float = 0.0  # multiplicative input jitter in training, Switch-style; 0 disables
    # Aux-loss-free balancing (DeepSeek-V3): a per-expert bias that shifts selection only. The same buffer
    # is DeepSeek-V3's e_score_correction_bias; a zero update rate keeps it fixed (an imported model's).
    bias_balance: bool = False
    bias_update_rate: float = 1e-3
    # DeepSeek-V3 routing: sigmoid scores, top-k within the best topk_group of n_group expert groups, and
    # the combine weights (renormalised or not) times routed_scaling_factor.
    score: Literal["softmax", "sigmoid"] = "softmax"
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    # rmoe: GRU over layers; also the projection width of the cosine router and MLP hidden width.
    hidden: int = 128
    cell: Literal["gru", "rnn", "lstm"] = "gru"
    pass_state: bool = True  # False is RMoE's NP ablation
    detach_state: bool = False
    shared_projection: bool = False
    head: Literal["linear", "cosine"] = "linear"  # scoring head on the recurrent state
    cosine_temperature: float = 0.07  # initial temperature of cosine scoring (learned)
    seed: int = 0  # the hash and random routers' fixed tables come from this seed

    def validate(self) -> None:
        require(self.kind in ROUTER_KINDS,
                f"model.moe.router.kind={self.kind!r} is unknown (allowed: {', '.join(ROUTER_KINDS)})")
        require(self.jitter >= 0, f"model.moe.router.jitter={self.jitter} must be >= 0")
        require(self.hidden > 0, f"model.moe.router.hidden={self.hidden} must be > 0")
        require(self.cosine_temperature > 0,
                f"model.moe.router.cosine_temperature={self.cosine_temperature} must be > 0")
        require(self.bias_update_rate >= 0,
                f"model.moe.router.bias_update_rate={self.bias_update_rate} must be >= 0")
        require(self.score in ("softmax", "sigmoid"),
                f"model.moe.router.score={self.score!r} is unknown (allowed: softmax, sigmoid)")
        require(self.n_group >= 1, f"model.moe.router.n_group={self.n_group} must be >= 1")
        require(1 <= self.topk_group <= self.n_group,
                f"model.moe.router.topk_group={self.topk_group} must be in 1..n_group ({self.n_group})")
        require(self.routed_scaling_factor > 0,
                f"model.moe.router.routed_scaling_factor={self.routed_scaling_factor} must be > 0")
        check_seed(self.seed, "model.moe.router.seed")


@dataclasses.dataclass(kw_only=True)
class MoEConfig(Config):
    num_experts: int | list[int] = 0  # 0: a dense model; a list gives each MoE layer its own count
    top_k: int = 2
    moe_every: int = 1  # block i is MoE when (i + 1) % moe_every == 0 ...
    dense_layers: list[int] = dataclasses.field(default_factory=list)  # ... unless listed here
    expert_hidden: int | None = None  # None: the dense ffn_hidden
    num_shared_experts: int = 0
    shared_hidden: int | None = None  # per shared expert; None: expert_hidden
    shared_placement: Literal["parallel", "sequential", "none"] = "parallel"
    shared_gate: bool = False  # Qwen2-MoE: sigmoid(x w) scales the shared expert's output
    capacity_factor_train: float | None = None  # None: dropless
    capacity_factor_eval: float | None = None
    capacity_formula: Literal["group", "topk"] = "topk"
    group_size: int = 4096
    min_capacity: int = 4
    drop_policy: Literal["openmoe", "score"] = "openmoe"
    balance_coef: float = 0.01
    # layer: the mean of per-layer balance losses; global: one loss over all layers' tokens pooled
    # (transformers' load_balancing_loss_func, which concatenates every layer's router logits).
    balance_loss_scope: Literal["layer", "global"] = "layer"
    z_coef: float = 1e-4
    router: RouterConfig = dataclasses.field(default_factory=RouterConfig)

    def validate(self) -> None:
        counts = self.num_experts if isinstance(self.num_experts, list) else [self.num_experts]
        require(all(e >= 0 for e in counts), f"model.moe.num_experts={self.num_experts} must be >= 0")
        if isinstance(self.num_experts, list):
            require(all(e > 0 for e in counts),
                    f"model.moe.num_experts={self.num_experts}: a per-layer list needs counts > 0")
        require(self.moe_every >= 1, f"model.moe.moe_every={self.moe_every} must be >= 1")
        require(self.top_k >= 1, f"model.moe.top_k={self.top_k} must be >= 1")
        if any(e > 0 for e in counts):
            require(self.top_k <= min(counts),
                    f"model.moe.top_k={self.top_k} must be <= model.moe.num_experts ({min(counts)})")
        for name in ("capacity_factor_train", "capacity_factor_eval"):
            cf = getattr(self, name)
            require(cf is None or cf > 0, f"model.moe.{name}={cf} must be > 0 (or none for dropless)")
        require(self.group_size >= 1, f"model.moe.group_size={self.group_size} must be >= 1")
        require(self.min_capacity >= 0, f"model.moe.min_capacity={self.min_capacity} must be >= 0")
        require(self.num_shared_experts >= 0,
                f"model.moe.num_shared_experts={self.num_shared_experts} must be >= 0")
        for name in ("expert_hidden", "shared_hidden"):
            v = getattr(self, name)
            require(v is None or v > 0, f"model.moe.{name}={v} must be > 0")
        require(self.balance_coef >= 0 and self.z_coef >= 0, "model.moe.balance_coef and model.moe.z_coef must be >= 0")
        g = self.router.n_group
        require(g == 1 or all(e % g == 0 for e in counts if e),
                f"model.moe.router.n_group={g} must divide model.moe.num_experts={self.num_experts}")
        require(g == 1 or all(self.top_k <= self.router.topk_group * (e // g) for e in counts if e),
                f"model.moe.top_k={self.top_k} exceeds the experts of topk_group={self.router.topk_group} groups")
        require(self.balance_loss_scope == "layer" or len(set(counts)) == 1,
                f"model.moe.balance_loss_scope='global' pools all layers, so it needs one expert count "
                f"(got num_experts={self.num_experts})")


@dataclasses.dataclass(kw_only=True)
class ModelConfig(Config):
    vocab_size: int = 4096
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None  # None: n_heads (plain multi-head attention)
    head_dim: int | None = None  # None: d_model // n_heads
    ffn_hidden: int = 512
    ffn_kind: str = "swiglu"
    max_seq_len: int = 256
    rope_base: float = 10000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = False
    qk_norm: bool | Literal["none", "head", "full"] = False  # true = "head"
    attn_bias: bool | Literal["none", "qkv", "all"] = False  # true = "qkv"
    init_std: float = 0.02
    # The routing path through torch.compile (model/route_plan.py): auto = where a recorded measurement
    # found it faster on this device (routing_compile.json), on, off.
    compile_routing: Literal["auto", "on", "off"] = "auto"
    moe: MoEConfig = dataclasses.field(default_factory=MoEConfig)

    def validate(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "ffn_hidden", "max_seq_len"):
            require(getattr(self, name) > 0, f"model.{name}={getattr(self, name)} must be > 0")
        require(self.compile_routing in ("auto", "on", "off"),
                f"model.compile_routing={self.compile_routing!r} is unknown (allowed: auto, on, off)")
        require(self.ffn_kind in FFN_KINDS,
                f"model.ffn_kind={self.ffn_kind!r} is unknown (allowed: {', '.join(FFN_KINDS)})")
        if self.head_dim is None:
            require(self.d_model % self.n_heads == 0,
                    f"model.n_heads={self.n_heads} must divide model.d_model={self.d_model} "
                    "(or set model.head_dim)")
        require(self.kv_heads >= 1 and self.n_heads % self.kv_heads == 0,
                f"model.n_kv_heads={self.n_kv_heads} must divide model.n_heads={self.n_heads}")
        require(self.qk_norm_kind in QK_NORMS, f"model.qk_norm={self.qk_norm!r} is not one of {QK_NORMS}")
        require(self.attn_bias_kind in ATTN_BIASES,
                f"model.attn_bias={self.attn_bias!r} is not one of {ATTN_BIASES}")
        require(self.head_size % 2 == 0, f"model.head_dim={self.head_size} (d_model / n_heads) must be even for rotary embeddings")
        for i in self.moe.dense_layers:
            require(0 <= i < self.n_layers,
                    f"model.moe.dense_layers has {i}, outside 0..{self.n_layers - 1}")
        counts = self.moe.num_experts
        if isinstance(counts, list):
            n_moe = len(self.moe_layer_ids(ignore_counts=True))
            require(len(counts) == n_moe,
                    f"model.moe.num_experts lists {len(counts)} counts but the model has {n_moe} MoE layers")

    # ---- derived shapes --------------------------------------------------------------------
    @property
    def head_size(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads

    @property
    def qk_norm_kind(self) -> str:
        """The mode (none, head or full), whichever spelling the config used."""
        q = self.qk_norm
        return ("head" if q else "none") if isinstance(q, bool) else q

    @property
    def attn_bias_kind(self) -> str:
        """The mode (none, qkv or all), whichever spelling the config used."""
        b = self.attn_bias
        return ("qkv" if b else "none") if isinstance(b, bool) else b

    @property
    def is_moe(self) -> bool:
        e = self.moe.num_experts
        return bool(e) if not isinstance(e, list) else True

    def moe_layer_ids(self, *, ignore_counts: bool = False) -> list[int]:
        """Block indices that hold an MoE layer."""
        if not ignore_counts and not self.is_moe:
            return []
        return [i for i in range(self.n_layers)
                if (i + 1) % self.moe.moe_every == 0 and i not in self.moe.dense_layers]

    def experts_per_layer(self) -> list[int]:
        """Routed experts of each MoE layer, in order."""
        ids = self.moe_layer_ids()
        e = self.moe.num_experts
        return list(e) if isinstance(e, list) else [e] * len(ids)

    @property
    def expert_hidden(self) -> int:
        return self.moe.expert_hidden or self.ffn_hidden

    @property
    def shared_hidden(self) -> int:
        return self.moe.shared_hidden or self.expert_hidden

    @property
    def num_shared(self) -> int:
        return 0 if self.moe.shared_placement == "none" else self.moe.num_shared_experts

    # ---- parameter counts ------------------------------------------------------------------
    def ffn_params(self, hidden: int) -> int:
        return (FFN_IN_PROJECTIONS[self.ffn_kind] + 1) * self.d_model * hidden

    def router_params(self, num_experts: int) -> int:
        """Parameters owned by one MoE layer's router (shared recurrent parts counted separately)."""
        r, D, E = self.moe.router, self.d_model, num_experts
        if r.kind in ("linear", "random"):
            return D * E
        if r.kind == "hash":
            return 0
        if r.kind == "mlp":
            return D * r.hidden + r.hidden * E
        if r.kind == "cosine":
            return D * r.hidden + E * r.hidden + 1
        # rmoe: per-layer W1 (unless shared) and scoring head on the state
        proj = 0 if r.shared_projection else r.hidden * D
        head = E * r.hidden + (1 if r.head == "cosine" else 0)
        return proj + head

    def shared_router_params(self) -> int:
        """Recurrent-router parameters shared by all MoE layers (the cell and a shared W1)."""
        r = self.moe.router
        if r.kind != "rmoe" or not self.moe_layer_ids():
            return 0
        p = r.hidden
        gates = {"gru": 3, "rnn": 1, "lstm": 4}[r.cell]
        cell = gates * (2 * p * p + 2 * p)
        return cell + (p * self.d_model if r.shared_projection else 0)

    def attn_extra_params(self) -> int:
        """One attention layer's QK-norm weights and biases."""
        hd, H, KV, D = self.head_size, self.n_heads, self.kv_heads, self.d_model
        norms = {"none": 0, "head": 2 * hd, "full": (H + KV) * hd}[self.qk_norm_kind]
        biases = {"none": 0, "qkv": (H + 2 * KV) * hd, "all": (H + 2 * KV) * hd + D}[self.attn_bias_kind]
        return norms + biases

    def param_counts(self) -> dict[str, dict[str, int]]:
        """Total and active parameters per part: {"part": {"total": n, "active": m}}."""
        D, L, V = self.d_model, self.n_layers, self.vocab_size
        hd, H, KV = self.head_size, self.n_heads, self.kv_heads
        emb = V * D * (1 if self.tie_embeddings else 2)
        attn = L * (D * H * hd + 2 * D * KV * hd + H * hd * D + self.attn_extra_params())
        moe_ids = self.moe_layer_ids()
        n_dense = L - len(moe_ids)
        dense = n_dense * self.ffn_params(self.ffn_hidden)
        per_expert = self.ffn_params(self.expert_hidden)
        counts = self.experts_per_layer()
        routed_total = sum(E * per_expert for E in counts)
        routed_active = sum(min(self.moe.top_k, E) * per_expert for E in counts)
        shared = len(moe_ids) * self.num_shared * self.ffn_params(self.shared_hidden)
        if self.moe.shared_gate and self.num_shared:
            shared += len(moe_ids) * D
        routers = sum(self.router_params(E) for E in counts) + self.shared_router_params()
        # one norm before attention and one before the FFN per block, a third for sequential shared
        n_norms = 2 * L + 1 + (len(moe_ids) if self.num_shared and self.moe.shared_placement == "sequential" else 0)
        norms = n_norms * D
        parts = {
            "embeddings": (emb, emb), "attention": (attn, attn), "dense_ffn": (dense, dense),
            "routed_experts": (routed_total, routed_active), "shared_experts": (shared, shared),
            "routers": (routers, routers), "norms": (norms, norms),
        }
        out = {k: {"total": t, "active": a} for k, (t, a) in parts.items()}
        out["all"] = {"total": sum(t for t, _ in parts.values()), "active": sum(a for _, a in parts.values())}
        return out

    def num_params(self) -> int:
        return self.param_counts()["all"]["total"]

    def num_active_params(self) -> int:
        return self.param_counts()["all"]["active"]


def check_model_config(d: dict) -> ModelConfig:
    """Build a ModelConfig from a plain dict (e.g. a preset's [model] table)."""
    if not isinstance(d, dict):
        raise ConfigError("model config must be a table")
    return ModelConfig.from_dict(d, path="model")
