"""What the training loop asks of the process mesh, in one object; on a single process every method
does exactly what the loop did before distribution existed (so single-process runs stay bit for bit).

Data: the global batch of step s is `sampler.batch(s)` on every rank; rank r keeps rows r::world, so
each row is trained on by exactly one rank and none is skipped (data.batch_size must divide evenly).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from moelab.distributed.balance import world_balance_loss
from moelab.distributed.dcp import DCP_DIR, save_dcp
from moelab.distributed.mesh import Parallel, barrier, collective, init_parallel
from moelab.distributed.metrics import reduce_metrics
from moelab.distributed.parallelize import (clip_grad_norm, parallelize, sync_gradients, unwrap,
                                            update_selection_biases)
from moelab.distributed.state import full_state, shard_optimizer_state
from moelab.train.checkpoint import save_checkpoint


class _Frozen:
    """Hands already-gathered state dicts to `save_checkpoint`, which asks for `.state_dict()`."""

    def __init__(self, sd: dict):
        self._sd = sd

    def state_dict(self) -> dict:
        return self._sd


class ParallelRun:
    def __init__(self, par: Parallel, model: nn.Module, manual_sync: bool, balance_reduce: str = "world"):
        self.par, self.model, self.manual_sync = par, model, manual_sync
        self.balance_reduce = balance_reduce
        self.core = unwrap(model)  # the MoETransformer itself (its methods, its parameter names)
        self.main = par.rank == 0

    @classmethod
    def start(cls, parallel_cfg, model: nn.Module, opt: torch.optim.Optimizer, build_optimizer,
              device: torch.device) -> tuple["ParallelRun", torch.optim.Optimizer]:
        """Join the mesh and wrap the (already resumed) model; the optimizer is rebuilt over the
        wrapped parameters and given the same state, sliced to this rank."""
        par = init_parallel(parallel_cfg.dp, parallel_cfg.ep, parallel_cfg.timeout_s, device)
        if par.world == 1:
            return cls(par, model, False), opt
        full_osd = opt.state_dict()
        wrapped, manual = parallelize(model, par, parallel_cfg.dp_mode)
        run = cls(par, wrapped, manual, parallel_cfg.balance_reduce)
        new_opt = build_optimizer(run.core)
        if full_osd["state"]:
            shard_optimizer_state(full_osd, new_opt, par)
        return run, new_opt

    def shard(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.par.world == 1 else x[self.par.rank::self.par.world]

    def with_balance(self, out, moe_cfg):
        """The forward's output with its balance and aux losses over the world's tokens where
        `parallel.balance_reduce` is "world" (`balance.py`); as the model computed them otherwise."""
        if self.par.world == 1 or self.balance_reduce == "rank" or not out.routing:
            return out
        balance = world_balance_loss(out.routing, moe_cfg.balance_loss_scope)
        aux = moe_cfg.balance_coef * balance + moe_cfg.z_coef * out.z_loss
        return dataclasses.replace(out, balance_loss=balance, aux_loss=aux)

    def after_backward(self) -> None:
        if self.manual_sync:
            sync_gradients(self.core, self.par)

    def clip(self, max_norm: float) -> float:
        if self.par.world == 1:
            params = [p for p in self.model.parameters() if p.grad is not None]
            return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        return clip_grad_norm(self.core, self.par, max_norm)

    def update_biases(self, routing) -> None:
        if self.par.world == 1:
            self.core.update_selection_biases(routing)
        else:
            update_selection_biases(self.core, routing, self.par)

    def mean(self, x: float) -> float:
        """The mean over ranks of a per-rank mean (equal shards): the global batch's mean."""
        if self.par.world == 1:
            return x
        # On the mesh's device: NCCL, the group on GPUs, has no backend for a CPU tensor.
        t = torch.tensor(x, dtype=torch.float64, device=self.par.mesh.device_type)
        with collective("loss mean"):
            dist.all_reduce(t)
        return float(t) / self.par.world

    def reduce(self, metrics: dict[str, float]) -> dict[str, float]:
        return reduce_metrics(metrics, self.par)

    @property
    def eval_model(self) -> nn.Module:
        """The model under DDP's wrapper (which would broadcast buffers on each forward). Expert- and
        FSDP-parallel models need every rank in each forward, so every rank evaluates the same data."""
        return self.core

    def save(self, path: Path, run_config: dict[str, Any], step: int, opt: torch.optim.Optimizer) -> Path:
        """The single-file checkpoint of the whole model (every rank gathers; rank 0 writes), which every
        verb reads and `--resume` takes at any world size; under a mesh also the sharded DCP copy in
        `dcp/`, written by all ranks in parallel (see `distributed/dcp.py`)."""
        if self.par.world == 1:
            return save_checkpoint(path, self.model, run_config, step, opt)
        weights, osd = full_state(self.core, opt, self.par)
        if self.main:
            save_checkpoint(path, _Frozen(weights), run_config, step, _Frozen(osd))
        barrier()  # the directory is committed before the ranks write into it
        save_dcp(Path(path) / DCP_DIR, self.core, opt, self.par)
        return Path(path)
