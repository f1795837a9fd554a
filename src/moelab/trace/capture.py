"""Capture routing with forward hooks inside a context manager; the model never knows.

Legend: T tokens, D model dim, E experts, K experts per token.

`RoutingRecorder` hooks every MoE layer, keeps the routing record each forward returns and, with
`all_experts=True`, runs every expert on the real hidden state of the normal top-k pass (A Closer Look's
two-stage pass) to record each expert's output norm, the pairwise cosine of expert outputs and the share of
active intermediate units. Hooks are removed on exit, even after an error.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moelab.model.experts import gated_activation
from moelab.model.moe import LayerRouting, MoELayer

ACTIVE_THRESHOLD = 1e-3  # A Closer Look: a unit counts as active when |act(W_gate x)| > 1e-3


@dataclass
class CapturedLayer:
    routing: LayerRouting
    expert_norms_TE: torch.Tensor | None = None
    expert_cos_TP: torch.Tensor | None = None  # P = E(E-1)/2, upper triangle row-major
    expert_density_TE: torch.Tensor | None = None
    # What the trace keeps of the router's scores (trace/build.keep_probs fills these on the capture's device)
    prob_TK: torch.Tensor | None = None        # the chosen experts' probabilities
    topn_ids_TN: torch.Tensor | None = None    # --probs top:N: the N experts of largest probability, descending
    topn_probs_TN: torch.Tensor | None = None  # ... and those probabilities


@torch.no_grad()
def all_experts_pass(layer: MoELayer, x_TD: torch.Tensor, chunk: int = 4096):
    """Every expert's unweighted output on x: norms [T, E], pairwise cosine [T, E(E-1)/2], density [T, E]."""
    ex = layer.experts
    E = ex.num_experts
    iu, ju = torch.triu_indices(E, E, offset=1, device=x_TD.device)
    norms, coss, dens = [], [], []
    for x in x_TD.split(chunk):
        outs = []
        density = []
        for e in range(E):
            h = x @ ex.w_in_EDX[e]
            gate = h.chunk(h.shape[-1] // ex.hidden, dim=-1)[-2]
            act = gated_activation(h, ex.kind)
            outs.append(act @ ex.w_out_EFD[e])
            density.append((_gate_act(gate, ex.kind).abs() > ACTIVE_THRESHOLD).float().mean(-1))
        y_TED = torch.stack(outs, dim=1).float()
        norms.append(y_TED.norm(dim=-1))
        unit = F.normalize(y_TED, dim=-1)
        # Each token's E x E Gram matrix, then its upper triangle: pairing the rows first built three
        # [T, E(E-1)/2, D] tensors (94 GiB a layer for 64 experts at d 2048 and 2048 tokens).
        coss.append(torch.bmm(unit, unit.transpose(1, 2))[:, iu, ju])
        dens.append(torch.stack(density, dim=1))
    return torch.cat(norms), torch.cat(coss), torch.cat(dens)


def _gate_act(gate: torch.Tensor, kind: str) -> torch.Tensor:
    return F.gelu(gate, approximate="tanh") if kind == "geglu" else F.silu(gate)


class RoutingRecorder:
    """`with RoutingRecorder(model) as rec: model(ids)`; then `rec.pop()` gives one CapturedLayer per MoE
    layer for each forward since the last pop."""

    def __init__(self, model: torch.nn.Module, all_experts: bool = False):
        self.layers = [m for m in model.modules() if isinstance(m, MoELayer)]
        if not self.layers:
            from moelab.config import MoelabError

            raise MoelabError("the model has no MoE layers to trace")
        self.all_experts = all_experts
        self._handles = []
        self._captured: list[CapturedLayer] = []

    def _hook(self, module: MoELayer, args, output) -> None:
        rec = output.routing
        detached = LayerRouting(rec.layer, *(t.detach() for t in rec[1:]))
        cap = CapturedLayer(detached)
        if self.all_experts:
            cap.expert_norms_TE, cap.expert_cos_TP, cap.expert_density_TE = all_experts_pass(
                module, args[0].detach())
        self._captured.append(cap)

    def __enter__(self) -> "RoutingRecorder":
        self._handles = [m.register_forward_hook(self._hook) for m in self.layers]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def pop(self) -> list[CapturedLayer]:
        out, self._captured = self._captured, []
        return out
