"""Observational expert scores beside causal ones, and pruning curves.

Legend: S sequences, E experts, N predicted tokens, T tokens of a batch, D model dim.

Scores per expert, summed per sequence so that a bootstrap can redraw sequences (routed = chosen and
not dropped by capacity): frequency (routed tokens), gate-weighted frequency (sum of combine weights),
activation norm (mean ||E_e(x)|| over routed tokens) and REAP-style saliency (mean of gate weight x
||E_e(x)|| over routed tokens). The causal score is the mean loss change from ablating the expert.
Data runs over the same tokens as the ablation (every token in the batch, including padding rows'
positions, counts for routing statistics except padding).
"""

from __future__ import annotations

import numpy as np
import torch

from moelab.intervene.edit import removal
from moelab.intervene.stats import seq_totals, spearman

SCORES = ("frequency", "gate_weighted", "activation_norm", "reap")


def _layer_sums(call, seq_T, valid_T, S: int) -> np.ndarray:
    """[4, S, E] per-sequence sums: routed count, weight sum, output-norm sum, weight x norm sum."""
    E, x_TD, ids_TK, weights_TK, dropped_TK, expert_output = call
    out = np.zeros((4, S, E))
    routed_TK = (~dropped_TK) & valid_T[:, None]
    for e in range(E):
        t_R, k_R = ((ids_TK == e) & routed_TK).nonzero(as_tuple=True)
        if not len(t_R):
            continue
        norm_R = expert_output(x_TD[t_R], e).float().norm(dim=-1)
        w_R = weights_TK[t_R, k_R].float()
        seq_R = seq_T[t_R.cpu()].numpy()
        for i, v in enumerate((torch.ones_like(w_R), w_R, norm_R, w_R * norm_R)):
            out[i, :, e] += np.bincount(seq_R, weights=v.cpu().double().numpy(), minlength=S)
    return out


@torch.no_grad()
def observe(model, batches, cf, ops=None) -> dict[int, np.ndarray]:
    """Per MoE block: [4, S, E] per-sequence sums behind the four observational scores. `ops`: the
    runner module of the model's kind (runner.py for moelab, hf_runner.py for transformers)."""
    from moelab.intervene import runner

    ops = ops or runner
    S = sum(b["input_ids"].shape[0] for b in batches)
    sums = {b: np.zeros((4, S, E)) for b, (E, _) in ops.layout(model).items()}
    device = next(model.parameters()).device
    offset = 0
    for batch in batches:
        B, L = batch["input_ids"].shape
        seq_T = torch.arange(offset, offset + B).repeat_interleave(L)
        valid_T = (batch["labels"] != -100).reshape(-1).to(device)
        for b, call in ops.expert_calls(model, batch["input_ids"].to(device), cf).items():
            sums[b] += _layer_sums(call, seq_T, valid_T, S)
        offset += B
    return sums


def scores_from(sums_4SE: np.ndarray) -> dict[str, np.ndarray]:
    count_E, weight_E, norm_E, sal_E = sums_4SE.sum(1)
    safe_E = np.maximum(count_E, 1)
    return {"frequency": count_E, "gate_weighted": weight_E, "activation_norm": norm_E / safe_E,
            "reap": sal_E / safe_E}


def obs_vs_causal(sums_4SE, seq_N, deltas_EN, n_boot=1000, seed=0) -> dict:
    """Spearman of each observational score with the causal effect over a layer's experts, with a 95%
    percentile interval from redrawing sequences (both sides recomputed on each draw)."""
    S = sums_4SE.shape[1]
    tot = [seq_totals(seq_N, d, S) for d in deltas_EN]
    dsum_ES, dcnt_ES = np.stack([t[0] for t in tot]), np.stack([t[1] for t in tot])
    causal = lambda idx: dsum_ES[:, idx].sum(1) / np.maximum(dcnt_ES[:, idx].sum(1), 1)  # noqa: E731
    point = {name: spearman(v, causal(np.arange(S))) for name, v in scores_from(sums_4SE).items()}
    rng = np.random.default_rng(seed)
    boots = {name: [] for name in SCORES}
    for _ in range(n_boot):
        idx = rng.integers(0, S, S)
        c = causal(idx)
        for name, v in scores_from(sums_4SE[:, idx]).items():
            boots[name].append(spearman(v, c))
    out = {}
    for name in SCORES:
        b = np.array(boots[name])
        b = b[np.isfinite(b)]
        lo, hi = (np.percentile(b, [2.5, 97.5]) if len(b) else (np.nan, np.nan))
        out[name] = {"rho": point[name], "lo": float(lo), "hi": float(hi)}
    out["causal_effect"] = causal(np.arange(S)).tolist()
    out["scores"] = {k: v.tolist() for k, v in scores_from(sums_4SE).items()}
    return out


@torch.no_grad()
def pruning_curve(model, batches, order: dict[int, list[int]], cf, ops=None,
                  ablate_capacity: str = "recompute") -> list[dict]:
    """Loss when the m first experts of each block's `order` (least important first) are removed from
    every listed block at once, for m = 0 .. E - top_k."""
    from moelab.intervene import runner

    ops = ops or runner
    device = next(model.parameters()).device
    shape = ops.layout(model)
    m_max = min(shape[b][0] - shape[b][1] for b in order)
    out = []
    for m in range(m_max + 1):
        edits = {b: removal(shape[b][0], order[b][:m], ablate_capacity) for b in order}
        total = count = 0.0
        for batch in batches:
            loss, _ = ops.edited_loss(model, batch["input_ids"].to(device), batch["labels"], edits, cf)
            total += float(torch.nansum(loss))
            count += int((~torch.isnan(loss)).sum())
        out.append({"removed_per_layer": m, "loss": total / count})
    return out
