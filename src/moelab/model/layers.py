"""RMSNorm, rotary embeddings, causal attention with an optional KV cache.

Legend: B batch, S sequence (new tokens), M keys in view (cache + new), D model dim, H query heads,
G key/value heads, Hd head dim.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from moelab.model.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 so low-precision activations do not lose the mean square.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(x.dtype)


def rope_tables(head_dim: int, max_len: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [max_len, Hd/2] for rotating pairs (i, i + Hd/2) (the 'rotate half' layout)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x_BHSd: torch.Tensor, cos_Sh: torch.Tensor, sin_Sh: torch.Tensor) -> torch.Tensor:
    x1, x2 = x_BHSd.float().chunk(2, dim=-1)
    out = torch.cat([x1 * cos_Sh - x2 * sin_Sh, x2 * cos_Sh + x1 * sin_Sh], dim=-1)
    return out.to(x_BHSd.dtype)


class KVCache:
    """Keys and values of every attention layer for generation; `length` tokens are filled."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device, dtype):
        shape = (batch, cfg.kv_heads, max_len, cfg.head_size)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.max_len = max_len
        self.length = 0

    def update(self, layer: int, k_BGSd, v_BGSd, start: int):
        end = start + k_BGSd.shape[2]
        self.k[layer][:, :, start:end] = k_BGSd
        self.v[layer][:, :, start:end] = v_BGSd
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, out_std: float):
        super().__init__()
        D, H, G, Hd = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.head_size
        self.layer, self.H, self.G, self.Hd = layer, H, G, Hd
        bias = cfg.attn_bias_kind
        self.wq = nn.Linear(D, H * Hd, bias=bias != "none")
        self.wk = nn.Linear(D, G * Hd, bias=bias != "none")
        self.wv = nn.Linear(D, G * Hd, bias=bias != "none")
        self.wo = nn.Linear(H * Hd, D, bias=bias == "all")
        for lin in (self.wq, self.wk, self.wv, self.wo):
            nn.init.normal_(lin.weight, 0.0, cfg.init_std if lin is not self.wo else out_std)
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)
        # "head" normalises each head's Hd vector (Qwen3); "full" the whole projection (OLMoE).
        self.qk_norm = cfg.qk_norm_kind
        q_dim, k_dim = (H * Hd, G * Hd) if self.qk_norm == "full" else (Hd, Hd)
        self.q_norm = RMSNorm(q_dim, cfg.norm_eps) if self.qk_norm != "none" else None
        self.k_norm = RMSNorm(k_dim, cfg.norm_eps) if self.qk_norm != "none" else None

    def forward(self, x_BSD, cos_Sh, sin_Sh, cache: KVCache | None = None, start: int = 0):
        B, S, _ = x_BSD.shape
        q, k, v = self.wq(x_BSD), self.wk(x_BSD), self.wv(x_BSD)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(B, S, self.H, self.Hd).transpose(1, 2)
        k = k.view(B, S, self.G, self.Hd).transpose(1, 2)
        v = v.view(B, S, self.G, self.Hd).transpose(1, 2)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos_Sh, sin_Sh), apply_rope(k, cos_Sh, sin_Sh)
        if cache is not None:
            k, v = cache.update(self.layer, k, v, start)
        if self.G != self.H:
            k = k.repeat_interleave(self.H // self.G, dim=1)
            v = v.repeat_interleave(self.H // self.G, dim=1)
        M = k.shape[2]
        if start == 0:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=S > 1)
        elif S == 1:
            out = F.scaled_dot_product_attention(q, k, v)  # one new token sees every cached key
        else:
            # New tokens at positions start..start+S-1 see keys up to their own position.
            mask_SM = (torch.arange(M, device=x_BSD.device)[None, :]
                       <= torch.arange(start, start + S, device=x_BSD.device)[:, None])
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_SM)
        return self.wo(out.transpose(1, 2).reshape(B, S, self.H * self.Hd))
