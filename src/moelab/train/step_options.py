"""The training step's speed options: fused AdamW, compiled blocks, activation checkpointing per block.

Each keeps the model's parameters and state-dict keys as they are (blocks are patched in place, never
wrapped), so checkpoints written with an option on load with it off and the other way round.
"""

from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import checkpoint

from moelab.config import MoelabError
from moelab.model.compiling import compile_supported, compiled


def fused_adamw_ok(params) -> bool:
    """Fused AdamW (one kernel for all parameters) only where every parameter is on CUDA; elsewhere
    torch's default (foreach) implementation, which is what the fused one is checked against."""
    params = list(params)
    return bool(params) and all(p.device.type == "cuda" for p in params)


def _compiled(forward, backend: str):
    return compiled(forward, backend, "train.compile", "true", "false")


def _checkpointed(forward):
    @functools.wraps(forward)
    def run(*args, **kwargs):
        # Only a training forward saves activations; decoding (a KV cache) and no_grad pass through.
        if not torch.is_grad_enabled() or kwargs.get("cache", args[2] if len(args) > 2 else None) is not None:
            return forward(*args, **kwargs)
        # Non-reentrant: keeps the RNG state (random/jitter routers recompute the same routes) and
        # returns the block's routing record as it is.
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return run


def apply_step_options(model, compile_blocks: bool, activation_checkpointing: bool,
                       backend: str = "inductor") -> None:
    """Patch each transformer block's forward: compiled, then checkpointed (recompute runs compiled).
    `backend`: torch.compile's (benchmarks use aot_eager on a CPU, which needs no C++ toolchain)."""
    if compile_blocks:
        why = compile_supported()
        if why:
            raise MoelabError(f"train.compile=true: {why}; set train.compile=false")
    for block in model.blocks:
        forward = block.forward
        if compile_blocks:
            forward = _compiled(forward, backend)
        if activation_checkpointing:
            forward = _checkpointed(forward)
        if forward is not block.forward:
            block.forward = forward
