"""Between sharded training state and the single-file checkpoint format every other verb reads.

`full_state` gathers weights and optimizer state into exactly what one process training the same model
would hold (expert shards all-gathered over the ep group, FSDP2 DTensors made full); rank 0 writes it
with `moelab.train.checkpoint.save_checkpoint`. `shard_optimizer_state` goes the other way, so a run
resumes from that single file at any world size: the model is loaded whole before `parallelize` slices
it, and the optimizer state is sliced the same way here.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.tensor import DTensor, distribute_tensor

from moelab.distributed.mesh import Parallel, collective
from moelab.distributed.parallelize import is_expert_shard


def _optim_params(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Parameters in the order `Optimizer.state_dict` numbers them."""
    return [p for g in opt.param_groups for p in g["params"]]


def _full(t: torch.Tensor, like: torch.Tensor, par: Parallel) -> torch.Tensor:
    """The whole tensor behind this rank's piece of it. `like` is the parameter it belongs to."""
    if isinstance(t, DTensor):
        return t.full_tensor()
    if par.ep > 1 and is_expert_shard(like) and t.dim() > 0:
        parts = [torch.empty_like(t) for _ in range(par.ep)]
        dist.all_gather(parts, t.contiguous(), group=par.group("ep"))
        return torch.cat(parts)
    return t


def _piece(full: torch.Tensor, like: torch.Tensor, par: Parallel) -> torch.Tensor:
    """This rank's piece of a whole tensor, shaped as parameter `like` is sharded."""
    if isinstance(like, DTensor) and full.dim() > 0:
        # Every rank holds the same full tensor, so each takes its slice without communication.
        return distribute_tensor(full.to(like.device), like.device_mesh, like.placements, src_data_rank=None)
    if par.ep > 1 and is_expert_shard(like) and full.dim() > 0:
        L = full.shape[0] // par.ep
        return full[par.ep_rank * L:(par.ep_rank + 1) * L].clone()
    return full


@torch.no_grad()
def full_state(model: nn.Module, opt: torch.optim.Optimizer, par: Parallel) -> tuple[dict, dict]:
    """(weights, optimizer state dict) as one process would have them; every rank must call this."""
    with collective("checkpoint gather"):
        weights = {k: _full(v, v, par).detach().cpu() for k, v in model.state_dict(keep_vars=True).items()}
        osd = opt.state_dict()
        params = _optim_params(opt)
        state = {i: {k: _full(v, params[i], par).cpu() if torch.is_tensor(v) else v for k, v in s.items()}
                 for i, s in osd["state"].items()}
    return weights, {"state": state, "param_groups": copy.deepcopy(osd["param_groups"])}


def shard_optimizer_state(full_osd: dict, opt: torch.optim.Optimizer, par: Parallel) -> None:
    """Load a single-process optimizer state dict into the optimizer of a parallelized model."""
    params = _optim_params(opt)
    state = {i: {k: _piece(v, params[i], par) if torch.is_tensor(v) and k != "step" else v
                 for k, v in s.items()} for i, s in full_osd["state"].items()}
    opt.load_state_dict({"state": state, "param_groups": full_osd["param_groups"]})
