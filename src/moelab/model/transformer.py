"""The decoder: pre-norm blocks, dense or MoE FFNs, recurrent router state threaded through the layers.

Legend: B batch, S sequence, T = B*S tokens in (sequence, position) order, D model dim, V vocabulary.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from moelab.config import ConfigError
from moelab.model.config import ModelConfig
from moelab.model.experts import GatedFFN, output_std
from moelab.model.layers import Attention, KVCache, RMSNorm, rope_tables
from moelab.model.losses import chunked_lm_loss, pooled_balance_loss
from moelab.model.moe import LayerRouting, MoELayer
from moelab.model.routers import RecurrentCore, build_router

AUTO = "auto"  # capacity_factor sentinel: the config's train or eval factor, by module mode


@dataclasses.dataclass
class ModelOutput:
    logits: torch.Tensor | None  # [B, S, V]; None with return_logits=False (the loss came in chunks)
    loss: torch.Tensor | None = None  # causal-LM cross-entropy (labels shifted inside, -100 ignored)
    aux_loss: torch.Tensor | None = None  # balance_coef * balance_loss + z_coef * z_loss
    balance_loss: torch.Tensor | None = None  # mean over MoE layers, or pooled (balance_loss_scope)
    z_loss: torch.Tensor | None = None  # mean over MoE layers
    routing: list[LayerRouting] | None = None  # one record per MoE layer, with return_routing=True


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, i: int, num_experts: int, core: RecurrentCore | None):
        super().__init__()
        std_out = output_std(cfg.init_std, cfg.n_layers)
        self.norm1 = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg, i, std_out)
        self.norm2 = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.moe = self.ffn = self.shared = self.norm3 = self.shared_gate = None
        self.sequential = cfg.moe.shared_placement == "sequential"
        if num_experts == 0:
            self.ffn = GatedFFN(cfg.d_model, cfg.ffn_hidden, cfg.ffn_kind, cfg.init_std, std_out)
            return
        self.moe = MoELayer(cfg, i, num_experts, build_router(cfg, num_experts, core))
        if cfg.num_shared:
            self.shared = GatedFFN(cfg.d_model, cfg.num_shared * cfg.shared_hidden, cfg.ffn_kind,
                                   cfg.init_std, std_out)
            if cfg.moe.shared_gate:
                self.shared_gate = nn.Linear(cfg.d_model, 1, bias=False)
                nn.init.normal_(self.shared_gate.weight, 0.0, cfg.init_std)
            if self.sequential:
                self.norm3 = RMSNorm(cfg.d_model, cfg.norm_eps)

    def _shared(self, h_TD):
        y = self.shared(h_TD)
        return y if self.shared_gate is None else torch.sigmoid(self.shared_gate(h_TD)) * y

    def forward(self, x_BSD, rope, cache, start, state, token_ids_T, capacity_factor):
        B, S, D = x_BSD.shape
        x_BSD = x_BSD + self.attn(self.norm1(x_BSD), *rope, cache=cache, start=start)
        h_TD = self.norm2(x_BSD).reshape(B * S, D)
        if self.moe is None:
            return x_BSD + self.ffn(h_TD).view(B, S, D), None, state
        out = self.moe(h_TD, state, token_ids_T, capacity_factor)
        y_TD = out.y_TD
        if self.shared is not None and not self.sequential:
            y_TD = y_TD + self._shared(h_TD)  # OpenMoE paper, Eq. 4
        x_BSD = x_BSD + y_TD.view(B, S, D)
        if self.shared is not None and self.sequential:
            x_BSD = x_BSD + self._shared(self.norm3(x_BSD).reshape(B * S, D)).view(B, S, D)
        return x_BSD, out, out.state


class MoETransformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        r = cfg.moe.router
        moe_ids = cfg.moe_layer_ids()
        self.router_core = (RecurrentCore(r, cfg.d_model, cfg.init_std)
                            if r.kind == "rmoe" and moe_ids else None)
        experts = dict(zip(moe_ids, cfg.experts_per_layer()))
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        nn.init.normal_(self.embed.weight, 0.0, cfg.init_std)
        self.blocks = nn.ModuleList(Block(cfg, i, experts.get(i, 0), self.router_core)
                                    for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.head = None
        if not cfg.tie_embeddings:
            self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
            nn.init.normal_(self.head.weight, 0.0, cfg.init_std)
        cos, sin = rope_tables(cfg.head_size, cfg.max_seq_len, cfg.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    # ---- forward --------------------------------------------------------------------------
    def _capacity(self, capacity_factor):
        if capacity_factor != AUTO:
            return capacity_factor
        m = self.config.moe
        return m.capacity_factor_train if self.training else m.capacity_factor_eval

    def _check_ids(self, input_ids: torch.Tensor, start: int) -> None:
        V, S = self.config.vocab_size, input_ids.shape[-1]
        if input_ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise ConfigError(f"input_ids must be integer token ids, got {input_ids.dtype}")
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= V):
            raise ConfigError(f"input_ids hold token ids outside the vocabulary 0..{V - 1} "
                              f"(min {int(input_ids.min())}, max {int(input_ids.max())})")
        if start + S > self.config.max_seq_len:
            raise ConfigError(f"sequence of {start + S} tokens exceeds model.max_seq_len="
                              f"{self.config.max_seq_len}")

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                return_routing: bool = False, capacity_factor: Any = AUTO,
                cache: KVCache | None = None, return_logits: bool = True) -> ModelOutput:
        if input_ids.dim() == 1:
            input_ids = input_ids.unsqueeze(0)
        B, S = input_ids.shape
        start = cache.length if cache is not None else 0
        self._check_ids(input_ids, start)
        cf = self._capacity(capacity_factor)
        input_ids = input_ids.long()
        rope = (self.rope_cos[start:start + S], self.rope_sin[start:start + S])
        x_BSD = self.embed(input_ids)
        token_ids_T = input_ids.reshape(-1)
        state, records, balance, z = None, [], [], []
        for block in self.blocks:
            x_BSD, moe_out, state = block(x_BSD, rope, cache, start, state, token_ids_T, cf)
            if moe_out is not None:
                records.append(moe_out.routing)
                balance.append(moe_out.balance_loss)
                z.append(moe_out.z_loss)
        if cache is not None:
            cache.length = start + S
        h_BSD = self.norm(x_BSD)
        w_VD = self.embed.weight if self.head is None else self.head.weight
        # Training needs only the loss: chunked, so the (B, S, V) logits never exist (losses.py).
        chunked = labels is not None and not return_logits
        logits = None if chunked else h_BSD @ w_VD.t()
        out = ModelOutput(logits=logits)
        m = self.config.moe
        zero = h_BSD.new_zeros((), dtype=torch.float32)
        if balance and m.balance_loss_scope == "global":
            out.balance_loss = pooled_balance_loss(records)
        else:
            out.balance_loss = torch.stack(balance).mean() if balance else zero
        out.z_loss = torch.stack(z).mean() if z else zero
        out.aux_loss = m.balance_coef * out.balance_loss + m.z_coef * out.z_loss
        if labels is not None:
            out.loss = chunked_lm_loss(h_BSD, w_VD, labels) if chunked else causal_lm_loss(logits, labels)
        if return_routing:
            out.routing = records
        return out

    # ---- generation -----------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompt_ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, use_cache: bool = True,
                 generator: torch.Generator | None = None, capacity_factor: Any = AUTO) -> torch.Tensor:
        """Sample continuations; temperature 0 is greedy. Returns prompt + new tokens [B, S + n].

        `capacity_factor` defaults to the config's evaluation factor; with a capacity, cached and
        uncached decoding may differ, since drops depend on how many tokens share a forward pass.
        """
        ids = prompt_ids.unsqueeze(0) if prompt_ids.dim() == 1 else prompt_ids
        total = ids.shape[1] + max_new_tokens
        if total > self.config.max_seq_len:
            raise ConfigError(f"prompt + max_new_tokens = {total} exceeds model.max_seq_len="
                              f"{self.config.max_seq_len}")
        was_training = self.training
        self.eval()
        try:
            cache = (KVCache(self.config, ids.shape[0], total, ids.device, self.embed.weight.dtype)
                     if use_cache else None)
            step_in = ids
            for _ in range(max_new_tokens):
                logits = self(step_in if use_cache else ids, cache=cache,
                              capacity_factor=capacity_factor).logits[:, -1].float()
                nxt = sample_next(logits, temperature, top_k, generator)
                ids = torch.cat([ids, nxt], dim=1)
                step_in = nxt
        finally:
            self.train(was_training)
        return ids if prompt_ids.dim() == 2 else ids[0]

    # ---- bookkeeping ----------------------------------------------------------------------
    def moe_layers(self) -> list[MoELayer]:
        return [b.moe for b in self.blocks if b.moe is not None]

    def update_selection_biases(self, routing: list[LayerRouting]) -> None:
        """Aux-loss-free balancing: after a step, move each router's bias toward even load."""
        for layer, rec in zip(self.moe_layers(), routing):
            load_E = torch.bincount(rec.expert_ids_TK.reshape(-1), minlength=layer.num_experts)
            layer.router.update_selection_bias(load_E)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def causal_lm_loss(logits_BSV: torch.Tensor, labels_BS: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting labels[t + 1] from position t; -100 labels are ignored."""
    shift_logits = logits_BSV[:, :-1].reshape(-1, logits_BSV.shape[-1]).float()
    shift_labels = labels_BS[:, 1:].reshape(-1).to(shift_logits.device)
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=-100)


def sample_next(logits_BV: torch.Tensor, temperature: float, top_k: int | None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    if temperature <= 0:
        return logits_BV.argmax(-1, keepdim=True)
    logits_BV = logits_BV / temperature
    if top_k is not None and top_k < logits_BV.shape[-1]:
        kth = torch.topk(logits_BV, top_k, dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth, float("-inf"))
    probs = torch.softmax(logits_BV, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)


def build_model(cfg: ModelConfig | str, *, device=None, dtype=None, seed: int | None = None
                ) -> MoETransformer:
    """Build a model from a config or a preset name. `seed` makes the initialisation reproducible."""
    if isinstance(cfg, str):
        from moelab.presets import load_preset

        cfg = load_preset(cfg)
    if seed is not None:
        torch.manual_seed(seed)
    model = MoETransformer(cfg)
    if device is not None or dtype is not None:
        model = model.to(device=device, dtype=dtype)
    return model


def restore_transient_buffers(model: MoETransformer) -> None:
    """Recompute the buffers a state dict does not hold (the RoPE tables, a selection bias that is not
    trained) after the model was built on the meta device and its weights assigned from a file."""
    from moelab.model.routers import Router

    cfg = model.config
    model.rope_cos, model.rope_sin = rope_tables(cfg.head_size, cfg.max_seq_len, cfg.rope_base)
    for m in model.modules():
        if isinstance(m, Router) and m.selection_bias_E.is_meta:
            m.selection_bias_E = torch.zeros(m.num_experts)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:  # a new buffer outside the state dict must be recomputed here
        raise RuntimeError(f"restore_transient_buffers: {left[0]} is still on the meta device")
