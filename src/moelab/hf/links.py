"""Which transformers tensors make each moelab tensor, and how: one `Link` per moelab tensor.

Legend: D model dim, F (expert) hidden dim, E experts, X = 2F (gate then up, SwiGLU).

transformers stores a Linear as [out, in]; moelab's attention Linears match, its FFNs store x @ W:
  copy         moelab = hf                                         (norms, embeddings, attention, router)
  ffn_in       w_in_DX [D, 2F] = [gate.T | up.T]                   (dense FFN, shared expert)
  ffn_out      w_out_FD [F, D] = down.T
  experts_in   w_in_EDX [E, D, 2F], expert e = [gate_e.T | up_e.T]
  experts_out  w_out_EFD [E, F, D], expert e = down_e.T
Hub checkpoints (and transformers' save_pretrained) keep one tensor per expert (Mixtral: w1 gate, w3 up,
w2 down under `block_sparse_moe`; the others: gate_proj, up_proj, down_proj under `mlp`). transformers 5
fuses them in memory as `mlp.experts.gate_up_proj` [E, 2F, D] and `down_proj` [E, D, F]; a checkpoint
holding that layout is read too (`fused_in`, `fused_out`), and exports always write the hub layout.
"""

from __future__ import annotations

import dataclasses

from moelab.model.config import ModelConfig

# Tensors a checkpoint may carry that no module reads (old checkpoints saved rotary caches).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
DSV3_STYLE = ("dots1", "glm4_moe")


@dataclasses.dataclass(frozen=True)
class Link:
    name: str  # moelab tensor
    kind: str  # copy | ffn_in | ffn_out | experts_in | experts_out | fused_in | fused_out
    hf: tuple[str, ...]  # copy/ffn_out/fused_*: (name,); ffn_in: (gate, up); experts_*: see expert_links
    shape: tuple[int, ...]  # the moelab tensor's shape

    def hf_shapes(self) -> dict[str, tuple[int, ...]]:
        """The shape each transformers tensor must have for this moelab shape."""
        s = self.shape
        if self.kind == "copy":
            return {self.hf[0]: s}
        if self.kind == "ffn_in":
            return {n: (s[1] // 2, s[0]) for n in self.hf}
        if self.kind == "ffn_out":
            return {self.hf[0]: (s[1], s[0])}
        if self.kind == "experts_in":
            return {n: (s[2] // 2, s[1]) for n in self.hf}
        if self.kind == "experts_out":
            return {n: (s[2], s[1]) for n in self.hf}
        if self.kind == "fused_in":
            return {self.hf[0]: (s[0], s[2], s[1])}
        return {self.hf[0]: (s[0], s[2], s[1])}  # fused_out: [E, D, F]


def moe_prefix(family: str, i: int, keys: set[str]) -> str:
    """Where block i's MoE lives: Mixtral hub checkpoints say block_sparse_moe, transformers 5 says mlp."""
    p = f"model.layers.{i}."
    if family == "mixtral" and f"{p}mlp.gate.weight" not in keys:
        return p + "block_sparse_moe."
    return p + "mlp."


def expert_links(cfg: ModelConfig, family: str, i: int, prefix: str, keys: set[str]) -> list[Link]:
    E, D, F = cfg.moe.num_experts, cfg.d_model, cfg.expert_hidden
    mine = f"blocks.{i}.moe.experts."
    in_shape, out_shape = (E, D, 2 * F), (E, F, D)
    if f"{prefix}experts.gate_up_proj" in keys:  # transformers 5's fused layout
        return [Link(mine + "w_in_EDX", "fused_in", (f"{prefix}experts.gate_up_proj",), in_shape),
                Link(mine + "w_out_EFD", "fused_out", (f"{prefix}experts.down_proj",), out_shape)]
    gate, up, down = ("w1", "w3", "w2") if family == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    ex = [f"{prefix}experts.{e}." for e in range(E)]
    # experts_in holds every expert's gate and then every expert's up: (gate_0..gate_E-1, up_0..up_E-1)
    return [Link(mine + "w_in_EDX", "experts_in",
                 tuple(f"{p}{gate}.weight" for p in ex) + tuple(f"{p}{up}.weight" for p in ex), in_shape),
            Link(mine + "w_out_EFD", "experts_out", tuple(f"{p}{down}.weight" for p in ex), out_shape)]


def _ffn(mine: str, hf: str, D: int, F: int) -> list[Link]:
    return [Link(mine + "w_in_DX", "ffn_in", (hf + "gate_proj.weight", hf + "up_proj.weight"), (D, 2 * F)),
            Link(mine + "w_out_FD", "ffn_out", (hf + "down_proj.weight",), (F, D))]


def attention_links(cfg: ModelConfig, i: int) -> list[Link]:
    D, H, G, Hd = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.head_size
    mine, hf = f"blocks.{i}.attn.", f"model.layers.{i}.self_attn."
    out = []
    for m, h, rows in (("wq", "q_proj", H * Hd), ("wk", "k_proj", G * Hd), ("wv", "v_proj", G * Hd)):
        out.append(Link(f"{mine}{m}.weight", "copy", (f"{hf}{h}.weight",), (rows, D)))
        if cfg.attn_bias_kind != "none":
            out.append(Link(f"{mine}{m}.bias", "copy", (f"{hf}{h}.bias",), (rows,)))
    out.append(Link(f"{mine}wo.weight", "copy", (f"{hf}o_proj.weight",), (D, H * Hd)))
    if cfg.attn_bias_kind == "all":
        out.append(Link(f"{mine}wo.bias", "copy", (f"{hf}o_proj.bias",), (D,)))
    qk = cfg.qk_norm_kind
    if qk != "none":
        q, k = (H * Hd, G * Hd) if qk == "full" else (Hd, Hd)
        out += [Link(f"{mine}q_norm.weight", "copy", (f"{hf}q_norm.weight",), (q,)),
                Link(f"{mine}k_norm.weight", "copy", (f"{hf}k_norm.weight",), (k,))]
    return out


def block_links(cfg: ModelConfig, family: str, i: int, keys: set[str]) -> list[Link]:
    D = cfg.d_model
    hf = f"model.layers.{i}."
    out = [Link(f"blocks.{i}.norm1.weight", "copy", (hf + "input_layernorm.weight",), (D,)),
           *attention_links(cfg, i),
           Link(f"blocks.{i}.norm2.weight", "copy", (hf + "post_attention_layernorm.weight",), (D,))]
    if i not in cfg.moe_layer_ids():
        return out + _ffn(f"blocks.{i}.ffn.", hf + "mlp.", D, cfg.ffn_hidden)
    prefix = moe_prefix(family, i, keys)
    out.append(Link(f"blocks.{i}.moe.router.weight_ED", "copy", (prefix + "gate.weight",),
                    (cfg.moe.num_experts, D)))
    if family in DSV3_STYLE:  # DeepSeek-V3's correction bias is moelab's selection bias
        out.append(Link(f"blocks.{i}.moe.router.selection_bias_E", "copy",
                        (prefix + "gate.e_score_correction_bias",), (cfg.moe.num_experts,)))
    out += expert_links(cfg, family, i, prefix, keys)
    if cfg.num_shared and family in DSV3_STYLE:  # ungated: shared_experts, one MLP of n_shared widths
        out += _ffn(f"blocks.{i}.shared.", prefix + "shared_experts.", D, cfg.num_shared * cfg.shared_hidden)
    elif cfg.num_shared:
        out += _ffn(f"blocks.{i}.shared.", prefix + "shared_expert.", D, cfg.num_shared * cfg.shared_hidden)
        out.append(Link(f"blocks.{i}.shared_gate.weight", "copy", (prefix + "shared_expert_gate.weight",), (1, D)))
    return out


def model_links(cfg: ModelConfig, family: str, keys: set[str] | None = None) -> list[Link]:
    """Every moelab tensor of cfg, in state_dict order, with its transformers sources.

    `keys` (the checkpoint's tensor names) picks between the hub and the fused expert layouts; None
    gives the hub layout, which is what exports write."""
    keys = keys or set()
    V, D = cfg.vocab_size, cfg.d_model
    out = [Link("embed.weight", "copy", ("model.embed_tokens.weight",), (V, D))]
    for i in range(cfg.n_layers):
        out += block_links(cfg, family, i, keys)
    out.append(Link("norm.weight", "copy", ("model.norm.weight",), (D,)))
    if not cfg.tie_embeddings:
        out.append(Link("head.weight", "copy", ("lm_head.weight",), (V, D)))
    return out


def inert_tensors(cfg: ModelConfig, family: str) -> dict[str, tuple[int, ...]]:
    """Tensors transformers builds that compute nothing moelab has: Qwen2-MoE without a shared expert
    keeps a zero-width one (its sigmoid gate multiplies zeros). name -> shape."""
    if family != "qwen2_moe" or cfg.num_shared:
        return {}
    D, out = cfg.d_model, {}
    for i in cfg.moe_layer_ids():
        p = f"model.layers.{i}.mlp.shared_expert"
        out.update({f"{p}.gate_proj.weight": (0, D), f"{p}.up_proj.weight": (0, D),
                    f"{p}.down_proj.weight": (D, 0), f"{p}_gate.weight": (1, D)})
    return out
