"""Sharded checkpoints with `torch.distributed.checkpoint` (DCP): every rank writes and reads only its
own pieces, in parallel, and DCP reshards on load when the mesh changed.

DCP identifies a tensor by name and global offset. FSDP2 parameters and their optimizer state are
DTensors already; an expert shard is a plain tensor that would look replicated, so it is presented as a
DTensor sharded on dim 0 over the ep group (ranks of different dp rows hold identical shards, which DCP
writes once). The single-file export (`state.py`) stays the format every other verb reads.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.tensor import DTensor, Shard

from moelab.distributed.mesh import Parallel, collective
from moelab.distributed.parallelize import is_expert_shard

DCP_DIR = "dcp"  # inside a checkpoint directory, next to model.safetensors


def _expert_names(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if is_expert_shard(p)}


def _as_global(sd: dict, names: set[str], par: Parallel) -> dict:
    mesh = par.mesh["ep"]
    return {k: DTensor.from_local(v, mesh, [Shard(0)], run_check=False)
            if k in names and torch.is_tensor(v) and v.dim() > 0 else v for k, v in sd.items()}


def _as_local(sd: dict) -> dict:
    return {k: v.to_local() if isinstance(v, DTensor) and k != "step" else v for k, v in sd.items()}


def _state(model: nn.Module, opt, par: Parallel) -> dict:
    msd, osd = get_model_state_dict(model), get_optimizer_state_dict(model, opt)
    if par.ep > 1:
        names = _expert_names(model)
        msd = _as_global(msd, names, par)
        # Optimizer state is keyed by parameter name; every tensor of an expert's entry is sharded.
        osd["state"] = {k: _as_global(v, set(v), par) if k in names else v for k, v in osd["state"].items()}
    return {"model": msd, "optim": osd}


def save_dcp(path: Path, model: nn.Module, opt, par: Parallel) -> Path:
    with collective("DCP save"):
        dcp.save(_state(model, opt, par), checkpoint_id=str(path))
    return path


def load_dcp(path: Path, model: nn.Module, opt, par: Parallel) -> None:
    """Load a DCP checkpoint into this rank's pieces of an already parallelized model and optimizer.

    DCP's `.metadata` file is a pickle, so this is for folders this user's own runs wrote; no verb calls
    it (`--resume` reads the single-file checkpoint, which holds no pickle)."""
    sd = _state(model, opt, par)
    with collective("DCP load"):
        dcp.load(sd, checkpoint_id=str(path))
    if par.ep > 1:
        names = _expert_names(model)
        sd["model"] = _as_local(sd["model"])
        sd["optim"]["state"] = {k: _as_local(v) if k in names else v for k, v in sd["optim"]["state"].items()}
    set_model_state_dict(model, sd["model"])
    set_optimizer_state_dict(model, opt, sd["optim"])
