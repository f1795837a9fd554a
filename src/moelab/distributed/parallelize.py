"""Every parallel wrapper, applied to a built single-device model from the outside.

Legend: T tokens, D model dim, E experts (global), L = E / ep local experts, K experts per token,
N kept choices sent by this rank, M choices received from the ep group, X = P * F fused input width.

Expert parallelism: the ep ranks of a group each hold L consecutive experts (a slice of the stacked
weights). Routing and capacity run on each rank's own tokens, unchanged, inside `MoELayer.forward`;
`ExpertParallel` replaces `layer.experts` and only moves the kept choices to their experts' ranks and
back with autograd-aware all-to-alls, so a rank computes what one process would on those tokens.

Gradient scaling (`sync_gradients`). Every rank takes its own slice of the global batch and computes
the mean loss L_r over it; the objective is the mean over all W = dp * ep ranks, L = (1/W) sum_r L_r.
 * A replicated (non-expert) parameter gets dL_r/dθ on rank r, so the all-reduce mean over the world
   gives dL/dθ.
 * An expert shard's backward already sums, through the all-to-all, the gradients of every token its ep
   group sent to it: sum over r in the ep group of dL_r/dw. Summing that over the dp group (the ranks
   holding the same shard) covers all W ranks, and dividing by W gives dL/dw.
So both equal the single-process gradient of the mean loss over the global batch (equal shard sizes).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed._functional_collectives import all_to_all_single_autograd

from moelab.distributed.mesh import Parallel, collective
from moelab.model.experts import GroupedExperts, gated_activation, grouped_mm, sort_choices

EXPERT_MARK = "_moelab_expert_shard"  # set on parameters that hold only this rank's experts


class ExpertParallel(nn.Module):
    """This rank's L experts of a GroupedExperts, serving the choices of its whole ep group."""

    def __init__(self, experts: GroupedExperts, ep_rank: int, ep: int, group):
        super().__init__()
        E = experts.num_experts
        if E % ep:
            raise ValueError(f"parallel.ep={ep} must divide the {E} experts of every MoE layer")
        L = E // ep
        self.num_experts, self.local, self.ep, self.group = E, L, ep, group
        self.hidden, self.kind = experts.hidden, experts.kind
        lo = ep_rank * L
        # Parameter names match GroupedExperts so state dicts line up with the single-file format.
        self.w_in_EDX = nn.Parameter(experts.w_in_EDX.detach()[lo:lo + L].clone())
        self.w_out_EFD = nn.Parameter(experts.w_out_EFD.detach()[lo:lo + L].clone())
        for p in (self.w_in_EDX, self.w_out_EFD):
            setattr(p, EXPERT_MARK, True)

    def forward(self, x_TD: torch.Tensor, expert_ids_TK: torch.Tensor, weights_TK: torch.Tensor,
                keep_TK: torch.Tensor | None = None) -> torch.Tensor:
        T, D = x_TD.shape
        tok_N, w_N, offs_E = sort_choices(expert_ids_TK, weights_TK, keep_TK, self.num_experts)
        # Sorted by global expert, so each destination rank's rows are one contiguous run.
        counts_E = torch.diff(offs_E.long(), prepend=offs_E.new_zeros(1).long())
        send_counts = counts_E.view(self.ep, self.local)
        recv_counts = torch.empty_like(send_counts)  # [source rank, local expert]
        with collective("expert-parallel count exchange"):
            dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        send_split = send_counts.sum(1).tolist()
        recv_split = recv_counts.sum(1).tolist()
        x_MD = self._exchange(x_TD.index_select(0, tok_N), recv_split, send_split)
        y_MD = self._local_experts(x_MD, recv_counts)
        y_ND = self._exchange(y_MD, send_split, recv_split)
        y_ND = y_ND * w_N.unsqueeze(1).to(y_ND.dtype)
        return x_TD.new_zeros(T, D).index_add_(0, tok_N, y_ND.to(x_TD.dtype))

    def _exchange(self, x: torch.Tensor, out_split: list[int], in_split: list[int]) -> torch.Tensor:
        # The autograd variant's backward is the reverse all-to-all (torchtitan uses the same op).
        with collective("expert-parallel all-to-all"):
            return all_to_all_single_autograd(x.contiguous(), out_split, in_split, self.group)

    def _local_experts(self, x_MD: torch.Tensor, recv_counts: torch.Tensor) -> torch.Tensor:
        """Received rows come grouped by source rank; regroup by local expert, run, restore the order."""
        local_ids = torch.arange(self.local, device=x_MD.device).repeat(self.ep)
        ids_M = local_ids.repeat_interleave(recv_counts.reshape(-1))
        order_M = torch.sort(ids_M, stable=True).indices
        counts_L = recv_counts.sum(0)
        counts_list = counts_L.tolist()
        h_MX = grouped_mm(x_MD.index_select(0, order_M), self.w_in_EDX, counts_L, counts_list)
        y_MD = grouped_mm(gated_activation(h_MX, self.kind), self.w_out_EFD, counts_L, counts_list)
        return y_MD.index_select(0, torch.argsort(order_M))


def apply_expert_parallel(model: nn.Module, par: Parallel) -> nn.Module:
    """Replace every MoE layer's experts with this rank's shard (a no-op when ep is 1)."""
    if par.ep == 1:
        return model
    group = par.group("ep")
    for layer in model.moe_layers():
        layer.experts = ExpertParallel(layer.experts, par.ep_rank, par.ep, group)
    return model


def is_expert_shard(p: torch.Tensor) -> bool:
    return getattr(p, EXPERT_MARK, False)


@torch.no_grad()
def broadcast_replicated(model: nn.Module, par: Parallel) -> None:
    """Start every rank from rank 0's replicated weights (expert shards are sliced identically)."""
    if par.world == 1:
        return
    with collective("weight broadcast"):
        for p in model.parameters():
            if not is_expert_shard(p):
                dist.broadcast(p.data, src=0)
        for p in model.parameters():
            if is_expert_shard(p) and par.dp > 1:
                dist.broadcast(p.data, src=dist.get_global_rank(par.group("dp"), 0), group=par.group("dp"))


@torch.no_grad()
def sync_gradients(model: nn.Module, par: Parallel) -> None:
    """Make every gradient the single-process gradient of the global mean loss (module docstring)."""
    if par.world == 1:
        return
    with collective("gradient all-reduce"):
        for p in model.parameters():
            if p.grad is None:
                if not p.requires_grad:
                    continue
                p.grad = torch.zeros_like(p)  # a rank whose tokens skipped this param still joins
            # Expert shards: sum over the ranks holding the same shard; the rest: over the world.
            dist.all_reduce(p.grad, group=par.group("dp") if is_expert_shard(p) else None)
            p.grad.div_(par.world)


def parallelize(model: nn.Module, par: Parallel, dp_mode: str = "ddp") -> tuple[nn.Module, bool]:
    """Wrap a built model for this mesh. Returns (the module to call, whether the caller must run
    `sync_gradients` after backward). With ep > 1 gradients are synced by hand (mixed groups);
    with ep == 1 DDP or FSDP2 averages them over the world inside backward."""
    if par.world == 1:
        return model, False
    if par.ep > 1:
        apply_expert_parallel(model, par)
        broadcast_replicated(model, par)
        return model, True
    if dp_mode == "fsdp":
        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError:  # torch 2.5 has FSDP2 only under its private path (public from 2.6)
            from torch.distributed._composable.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block, mesh=par.mesh["dp"])
        fully_shard(model, mesh=par.mesh["dp"])  # in place: the model keeps its own methods
        return model, False
    from torch.nn.parallel import DistributedDataParallel

    # find_unused_parameters: a router variant or a frozen router may leave parameters out of a step.
    return DistributedDataParallel(model, find_unused_parameters=True), False


def unwrap(model: nn.Module) -> nn.Module:
    """The model under a DDP wrapper (FSDP2 and expert parallelism modify the model in place)."""
    return getattr(model, "module", model)


@torch.no_grad()
def clip_grad_norm(model: nn.Module, par: Parallel, max_norm: float) -> float:
    """The global gradient norm (as one process would compute it), clipped to max_norm like
    `torch.nn.utils.clip_grad_norm_`. Expert shards' squares are summed over the ep group."""
    params = [p for p in model.parameters() if p.grad is not None]
    if par.ep == 1:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    shard_sq = sum((p.grad.float() ** 2).sum() for p in model.parameters()
                   if p.grad is not None and is_expert_shard(p))
    rest_sq = sum((p.grad.float() ** 2).sum() for p in model.parameters()
                  if p.grad is not None and not is_expert_shard(p))
    shard_sq = torch.as_tensor(shard_sq, dtype=torch.float32).clone()
    with collective("gradient norm"):
        dist.all_reduce(shard_sq, group=par.group("ep"))
    norm = (shard_sq + rest_sq).sqrt()
    coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for p in params:
        p.grad.mul_(coef.to(p.grad.dtype))
    return float(norm)


@torch.no_grad()
def update_selection_biases(model: nn.Module, routing, par: Parallel) -> None:
    """Aux-loss-free balancing on the global batch's load, so every rank moves its biases alike."""
    for layer, rec in zip(model.moe_layers(), routing):
        load_E = torch.bincount(rec.expert_ids_TK.reshape(-1), minlength=layer.num_experts)
        if par.world > 1:
            with collective("expert load"):
                dist.all_reduce(load_E)
        layer.router.update_selection_bias(load_E)
