"""The training step's speed options: fused AdamW, compiled blocks, activation checkpointing per block.

Each keeps the model's parameters and state-dict keys as they are (blocks are patched in place, never
wrapped), so checkpoints written with an option on load with it off and the other way round.
"""

from __future__ import annotations

import functools
import logging

import torch
from torch.utils.checkpoint import checkpoint

from moelab.config import MoelabError


def fused_adamw_ok(params) -> bool:
    """Fused AdamW (one kernel for all parameters) only where every parameter is on CUDA; elsewhere
    torch's default (foreach) implementation, which is what the fused one is checked against."""
    params = list(params)
    return bool(params) and all(p.device.type == "cuda" for p in params)


def compile_supported() -> str | None:
    """None when torch.compile can run here, else why not (one line)."""
    try:
        import torch._dynamo as dynamo
    except Exception as e:  # a torch build without dynamo
        return f"torch.compile is unavailable ({type(e).__name__})"
    if not dynamo.is_dynamo_supported():
        return "torch.compile does not support this Python/torch build"
    return None


def _compiled(forward, backend: str):
    compiled = torch.compile(forward, backend=backend)
    # Dynamo logs a failing fake-tensor call as a traceback before raising; the one line below says it.
    quiet = logging.getLogger("torch._subclasses.fake_tensor")

    @functools.wraps(forward)
    def run(*args, **kwargs):
        level = quiet.level
        quiet.setLevel(logging.CRITICAL)
        try:
            return compiled(*args, **kwargs)
        except torch._dynamo.exc.TorchDynamoException as e:  # BackendCompilerFailed, Unsupported, ...
            raise MoelabError(f"train.compile=true: torch.compile failed on this machine ({_root_cause(e)}); "
                              f"set train.compile=false") from None
        finally:
            quiet.setLevel(level)
    return run


def _root_cause(e: BaseException) -> str:
    """The innermost exception's first line: the reason, not dynamo's wrapper."""
    seen = {id(e)}
    while (nxt := e.__cause__ or e.__context__) is not None and id(nxt) not in seen:
        seen.add(id(nxt))
        e = nxt
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


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
