"""Dispatch and combine without atomics: one sort, gathers both ways, a fixed-order fp32 sum.

Legend: T tokens, D model dim, K experts per token, N kept choices (sorted by expert).

The scatter-add combine (`index_add_`) and the backward of the dispatch gather (another index_add) are
atomics on a GPU: bf16 accumulation in a run-dependent order, and 34% of an E64 layer's CUDA time in
gpu_check. Here the choices are sorted once; `inv_TK` is the inverse permutation (each token's K sorted
rows, or the zero pad row N where a choice was dropped), so every direction is a gather:
dispatch forward gathers tokens, its backward gathers each token's K rows and sums them; combine forward
gathers the K rows back to (T, K, D), its backward gathers in expert order. A token's K contributions are
summed in rank order in fp32, so the result is bitwise reproducible.
"""

from __future__ import annotations

import torch


def permutation(expert_ids_TK: torch.Tensor, keep_TK: torch.Tensor | None, num_experts: int):
    """(order_N: flat choice t * K + k of each sorted row, inv_TK: sorted row of each choice or N where
    dropped, offs_E: int32 end of each expert's rows). Token order within an expert (stable sort)."""
    return trimmed(*full_permutation(expert_ids_TK, keep_TK, num_experts), dropping=keep_TK is not None)


def full_permutation(expert_ids_TK: torch.Tensor, keep_TK: torch.Tensor | None, num_experts: int):
    """`permutation` before the one host sync: order_M still lists all T * K choices, the dropped ones
    last (M - N of them), and inv_TK already points dropped choices at the pad row N = offs_E[-1]."""
    T, K = expert_ids_TK.shape
    ids_M = expert_ids_TK.reshape(-1)
    if keep_TK is not None:
        ids_M = ids_M.masked_fill(~keep_TK.reshape(-1), num_experts)  # dropped sort to the end
    ids_sorted, order_M = torch.sort(ids_M, stable=True)
    bounds_E = torch.arange(1, num_experts + 1, device=ids_M.device, dtype=ids_M.dtype)
    offs_E = torch.searchsorted(ids_sorted, bounds_E, out_int32=True)
    # A permutation's inverse: collision-free, so this scatter is deterministic (and it is of ints).
    inv_M = torch.empty_like(order_M).scatter_(0, order_M, torch.arange(T * K, device=ids_M.device))
    if keep_TK is not None:
        inv_M = torch.minimum(inv_M, offs_E[-1:].to(inv_M.dtype))
    return order_M, inv_M.view(T, K), offs_E


def trimmed(order_M: torch.Tensor, inv_TK: torch.Tensor, offs_E: torch.Tensor, dropping: bool):
    """A full permutation cut to its N kept rows: the kept count sizes every tensor after this (a host
    sync, the one the routing path needs; none when nothing can drop)."""
    if dropping:
        order_M = order_M[: int(offs_E[-1])]
    return order_M, inv_TK, offs_E


def _pad_row(v_ND: torch.Tensor) -> torch.Tensor:
    return torch.cat([v_ND, v_ND.new_zeros(1, v_ND.shape[1])])


class Dispatch(torch.autograd.Function):
    """x_TD -> x rows in expert order; backward: each token's K rows gathered and summed in fp32."""

    @staticmethod
    def forward(ctx, x_TD, tok_N, inv_TK):
        ctx.save_for_backward(inv_TK)
        return x_TD.index_select(0, tok_N)

    @staticmethod
    def backward(ctx, g_ND):
        (inv_TK,) = ctx.saved_tensors
        T, K = inv_TK.shape
        g_TKD = _pad_row(g_ND).index_select(0, inv_TK.reshape(-1)).view(T, K, -1)
        return g_TKD.float().sum(1).to(g_ND.dtype), None, None


class Unpermute(torch.autograd.Function):
    """Rows in expert order -> (T, K, D), zeros where dropped; backward: the gather in expert order."""

    @staticmethod
    def forward(ctx, y_ND, order_N, inv_TK):
        ctx.save_for_backward(order_N)
        T, K = inv_TK.shape
        return _pad_row(y_ND).index_select(0, inv_TK.reshape(-1)).view(T, K, -1)

    @staticmethod
    def backward(ctx, g_TKD):
        (order_N,) = ctx.saved_tensors
        return g_TKD.reshape(-1, g_TKD.shape[2]).index_select(0, order_N), None, None


def combine(y_ND: torch.Tensor, order_N: torch.Tensor, inv_TK: torch.Tensor,
            weights_TK: torch.Tensor) -> torch.Tensor:
    """sum_k weight[t, k] * y[row of (t, k)] in fp32, ranks in order: fp32 (T, D)."""
    y_TKD = Unpermute.apply(y_ND, order_N, inv_TK)
    return (y_TKD.float() * weights_TK.float().unsqueeze(2)).sum(1)
