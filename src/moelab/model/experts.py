"""Gated FFNs: the dense FFN, and the routed experts as one module of stacked weights.

Legend: T tokens, D model dim, F expert hidden dim, E experts, K experts per token, N kept choices,
X = P * F, the fused input projection (P = 2 for SwiGLU/GeGLU, 3 for OpenMoE's released unit).

The fast path sorts the kept (token, expert) choices by expert and runs two grouped matrix multiplies
(`torch._grouped_mm` where this torch and device support it, a loop over contiguous per-expert slices
otherwise). `naive_experts_forward` is the per-expert masked loop kept as the oracle for tests.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn as nn
import torch.nn.functional as F

from moelab.model.config import FFN_IN_PROJECTIONS


def gated_activation(h_NX: torch.Tensor, kind: str) -> torch.Tensor:
    """Fused input projections -> hidden units. Neuron i reads column i of each F-wide slice."""
    if kind == "swiglu":
        gate, up = h_NX.chunk(2, dim=-1)
        return F.silu(gate) * up
    if kind == "geglu":
        gate, up = h_NX.chunk(2, dim=-1)
        return F.gelu(gate, approximate="tanh") * up
    # OpenMoE's released unit: wi_0 split in halves (a, b), times a third projection x W1.
    a, b, up = h_NX.chunk(3, dim=-1)
    return a * F.silu(b) * up


class GatedFFN(nn.Module):
    """A dense gated FFN: y = act(x W_in) W_out. Also the shared expert."""

    def __init__(self, d_model: int, hidden: int, kind: str, init_std: float, out_std: float):
        super().__init__()
        self.kind = kind
        P = FFN_IN_PROJECTIONS[kind]
        self.w_in_DX = nn.Parameter(torch.randn(d_model, P * hidden) * init_std)
        self.w_out_FD = nn.Parameter(torch.randn(hidden, d_model) * out_std)

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        return gated_activation(x_TD @ self.w_in_DX, self.kind) @ self.w_out_FD


@lru_cache(maxsize=None)
def _grouped_mm_works(device_type: str, dtype: torch.dtype) -> bool:
    """Probe once per (device, dtype): CUDA's kernel wants bf16 on recent GPUs, CPU's loops in any dtype."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    try:
        x = torch.zeros(8, 16, device=device_type, dtype=dtype)
        w = torch.zeros(2, 16, 16, device=device_type, dtype=dtype)
        torch._grouped_mm(x, w, offs=torch.tensor([4, 8], device=device_type, dtype=torch.int32))
        return True
    except (RuntimeError, NotImplementedError):
        return False


def _contiguous_grad(g: torch.Tensor) -> torch.Tensor:
    return g.contiguous()


def grouped_mm(x_NA: torch.Tensor, w_EAB: torch.Tensor, counts_E: torch.Tensor,
               counts_list: list[int] | None = None) -> torch.Tensor:
    """Rows of x sorted by expert times their expert's matrix: out[n] = x[n] @ w[expert(n)]."""
    align = 16 // x_NA.element_size()  # the kernel wants 16-byte aligned strides
    if (_grouped_mm_works(x_NA.device.type, x_NA.dtype) and x_NA.dtype == w_EAB.dtype
            and x_NA.shape[1] % align == 0 and w_EAB.shape[2] % align == 0):
        offs = torch.cumsum(counts_E, 0, dtype=torch.int32)
        out = torch._grouped_mm(x_NA, w_EAB, offs=offs)
        if out.requires_grad:
            out.register_hook(_contiguous_grad)  # its backward rejects expanded gradients
        return out
    counts_list = counts_list if counts_list is not None else counts_E.tolist()
    pieces = [xs @ w_EAB[e] for e, xs in enumerate(x_NA.split(counts_list)) if xs.shape[0]]
    if not pieces:
        return x_NA.new_zeros(0, w_EAB.shape[2])
    return torch.cat(pieces)


class GroupedExperts(nn.Module):
    """E gated FFNs with stacked weights: w_in [E, D, P*F] and w_out [E, F, D]."""

    def __init__(self, num_experts: int, d_model: int, hidden: int, kind: str, init_std: float,
                 out_std: float):
        super().__init__()
        self.num_experts, self.hidden, self.kind = num_experts, hidden, kind
        P = FFN_IN_PROJECTIONS[kind]
        self.w_in_EDX = nn.Parameter(torch.randn(num_experts, d_model, P * hidden) * init_std)
        self.w_out_EFD = nn.Parameter(torch.randn(num_experts, hidden, d_model) * out_std)

    def forward(self, x_TD: torch.Tensor, expert_ids_TK: torch.Tensor, weights_TK: torch.Tensor,
                keep_TK: torch.Tensor | None = None) -> torch.Tensor:
        """Sum over kept choices of weight * expert(x). Dropped choices contribute nothing."""
        T, K = expert_ids_TK.shape
        ids_N = expert_ids_TK.reshape(-1)
        tok_N = torch.arange(T, device=x_TD.device).repeat_interleave(K)
        w_N = weights_TK.reshape(-1)
        if keep_TK is not None:
            kept = keep_TK.reshape(-1).nonzero().squeeze(1)
            ids_N, tok_N, w_N = ids_N[kept], tok_N[kept], w_N[kept]
        order = torch.argsort(ids_N, stable=True)
        tok_N, w_N = tok_N[order], w_N[order]
        counts_E = torch.bincount(ids_N, minlength=self.num_experts)
        counts_list = None if x_TD.device.type == "cpu" else counts_E.tolist()
        h_NX = grouped_mm(x_TD[tok_N], self.w_in_EDX, counts_E, counts_list)
        y_ND = grouped_mm(gated_activation(h_NX, self.kind), self.w_out_EFD, counts_E, counts_list)
        y_ND = y_ND * w_N.unsqueeze(1).to(y_ND.dtype)
        return x_TD.new_zeros(T, x_TD.shape[1]).index_add(0, tok_N, y_ND.to(x_TD.dtype))

    def expert_output(self, x_TD: torch.Tensor, e: int) -> torch.Tensor:
        """Expert e's unweighted output on every token (A Closer Look's all-experts pass)."""
        return gated_activation(x_TD @ self.w_in_EDX[e], self.kind) @ self.w_out_EFD[e]

    def matrices(self) -> dict[str, torch.Tensor]:
        """Per-expert W_gate, W_up [E, F, D] and W_down [E, D, F] (neuron i = row i / column i)."""
        P = FFN_IN_PROJECTIONS[self.kind]
        slices = self.w_in_EDX.detach().split(self.hidden, dim=2)
        out = {"w_gate_EFD": slices[P - 2].transpose(1, 2), "w_up_EFD": slices[P - 1].transpose(1, 2),
               "w_down_EDF": self.w_out_EFD.detach().transpose(1, 2)}
        if P == 3:
            out["w_gate2_EFD"] = slices[0].transpose(1, 2)
        return out


def naive_experts_forward(experts: GroupedExperts, x_TD, expert_ids_TK, weights_TK, keep_TK=None):
    """The oracle: for each expert, a masked pass over the tokens that chose it."""
    out = torch.zeros_like(x_TD)
    keep_TK = torch.ones_like(expert_ids_TK, dtype=torch.bool) if keep_TK is None else keep_TK
    for e in range(experts.num_experts):
        for k in range(expert_ids_TK.shape[1]):
            mask_T = (expert_ids_TK[:, k] == e) & keep_TK[:, k]
            if mask_T.any():
                y = experts.expert_output(x_TD[mask_T], e)
                out = out.index_add(0, mask_T.nonzero().squeeze(1), y * weights_TK[mask_T, k, None])
    return out


def output_std(init_std: float, n_layers: int) -> float:
    """Residual-branch outputs start smaller so the stream's variance does not grow with depth."""
    return init_std / math.sqrt(2 * n_layers)
