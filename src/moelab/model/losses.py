"""Router auxiliary losses (pure functions).

Legend: T tokens, E experts, K experts per token.
"""

from __future__ import annotations

import torch


def load_balance_loss(probs_TE: torch.Tensor, expert_ids_TK: torch.Tensor) -> torch.Tensor:
    """E * sum_e f_e * P_e.

    f_e: share of tokens with e among their top-k choices, before dropping (so sum_e f_e = k);
    P_e: mean router probability of e. Equals transformers' `load_balancing_loss_func` on one layer.
    Uniform routing gives k; its minimum.
    """
    T, E = probs_TE.shape
    if T == 0:
        return probs_TE.sum() * 0.0
    counts_E = torch.zeros(E, device=probs_TE.device, dtype=probs_TE.dtype)
    counts_E.index_add_(0, expert_ids_TK.reshape(-1),
                        torch.ones(expert_ids_TK.numel(), device=probs_TE.device, dtype=probs_TE.dtype))
    f_E = counts_E / T
    P_E = probs_TE.mean(0)
    return E * (f_E * P_E).sum()


def pooled_balance_loss(routing) -> torch.Tensor:
    """`load_balance_loss` over every layer's tokens at once (transformers' `load_balancing_loss_func`):
    f_e and P_e are averaged over (layer, token) pairs, so it is not the mean of the per-layer losses.
    `routing`: records with probs_TE and expert_ids_TK, all layers with the same E."""
    probs_NE = torch.cat([r.probs_TE for r in routing])
    return load_balance_loss(probs_NE, torch.cat([r.expert_ids_TK for r in routing]))


def router_z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """mean over tokens of logsumexp(logits)^2 (ST-MoE): keeps router logits small."""
    if logits_TE.shape[0] == 0:
        return logits_TE.sum() * 0.0
    return torch.logsumexp(logits_TE.float(), dim=-1).square().mean()


# ---- the LM loss in chunks over tokens ------------------------------------------------------------
# Legend here: N tokens, D model width, V vocabulary, C tokens per chunk.

def shifted_labels(labels_BS: torch.Tensor) -> torch.Tensor:
    """labels[t + 1] at position t, -100 at each row's last position: the causal-LM target of every
    position, so the hidden states and logits are never sliced (slicing copies them in the backward)."""
    pad_B1 = labels_BS.new_full((labels_BS.shape[0], 1), -100)
    return torch.cat([labels_BS[:, 1:], pad_B1], dim=1)


class _ChunkedCE(torch.autograd.Function):
    """Sum of cross-entropy(h_ND @ W_VD^T, y_N) computed C tokens at a time. The backward recomputes each
    chunk's logits instead of saving them, so no (N, V) tensor ever exists; fp32 logits per chunk."""

    @staticmethod
    def forward(ctx, h_ND, w_VD, y_N, chunk):
        total = torch.zeros((), dtype=torch.float32, device=h_ND.device)
        lse_N = torch.empty(h_ND.shape[0], dtype=torch.float32, device=h_ND.device)
        for s in range(0, h_ND.shape[0], chunk):
            logits_CV = (h_ND[s:s + chunk] @ w_VD.t()).float()
            y_C = y_N[s:s + chunk]
            lse_C = torch.logsumexp(logits_CV, dim=-1)
            lse_N[s:s + chunk] = lse_C
            keep_C = y_C != -100
            picked_C = logits_CV.gather(1, y_C.clamp_min(0).unsqueeze(1)).squeeze(1)
            total = total + ((lse_C - picked_C) * keep_C).sum()
        ctx.save_for_backward(h_ND, w_VD, y_N, lse_N)
        ctx.chunk = chunk
        return total

    @staticmethod
    def backward(ctx, g):
        h_ND, w_VD, y_N, lse_N = ctx.saved_tensors
        chunk = ctx.chunk
        gh_ND = torch.empty_like(h_ND) if ctx.needs_input_grad[0] else None
        gw_VD = torch.zeros(w_VD.shape, dtype=torch.float32, device=w_VD.device) if ctx.needs_input_grad[1] else None
        for s in range(0, h_ND.shape[0], chunk):
            h_CD = h_ND[s:s + chunk]
            y_C = y_N[s:s + chunk]
            keep_C = (y_C != -100).float()
            # d(lse - logit_y)/d logits = softmax - onehot(y), zero on ignored tokens.
            d_CV = torch.exp((h_CD @ w_VD.t()).float() - lse_N[s:s + chunk, None])
            d_CV.scatter_add_(1, y_C.clamp_min(0).unsqueeze(1), -torch.ones_like(keep_C).unsqueeze(1))
            d_CV = d_CV * (keep_C * g).unsqueeze(1)
            if gh_ND is not None:
                gh_ND[s:s + chunk] = (d_CV.to(w_VD.dtype) @ w_VD).to(h_ND.dtype)
            if gw_VD is not None:
                gw_VD += d_CV.t() @ h_CD.float()
        return gh_ND, None if gw_VD is None else gw_VD.to(w_VD.dtype), None, None


def chunked_lm_loss(h_BSD: torch.Tensor, w_VD: torch.Tensor, labels_BS: torch.Tensor,
                    chunk_tokens: int | None = None) -> torch.Tensor:
    """Mean causal-LM cross-entropy of logits = h @ W^T against labels shifted by one (-100 ignored),
    equal to `cross_entropy(logits[:, :-1], labels[:, 1:])` without materialising the (B*S, V) logits:
    chunks of `chunk_tokens` in the forward, recomputed in the backward (default: as many tokens as keep a
    chunk's fp32 logits near 1 GiB, 1024 for a 256k vocabulary). Under autocast the matmuls run in
    the autocast dtype (as the model's own head would) and the softmax in fp32."""
    if torch.is_autocast_enabled(h_BSD.device.type):
        dt = torch.get_autocast_dtype(h_BSD.device.type)
        h_BSD, w_VD = h_BSD.to(dt), w_VD.to(dt)
    elif h_BSD.dtype != w_VD.dtype:
        h_BSD = h_BSD.to(w_VD.dtype)
    y_N = shifted_labels(labels_BS.to(h_BSD.device)).reshape(-1)
    if chunk_tokens is None:
        chunk_tokens = max(64, (1 << 28) // w_VD.shape[0])
    with torch.autocast(h_BSD.device.type, enabled=False):
        total = _ChunkedCE.apply(h_BSD.reshape(-1, h_BSD.shape[-1]), w_VD, y_N, max(1, int(chunk_tokens)))
    # 0 / 0 = nan when every label is ignored, as F.cross_entropy gives.
    return total / (y_N != -100).sum()
