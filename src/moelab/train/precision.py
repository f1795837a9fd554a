"""bf16 parameters with fp32 master weights (train.param_dtype=bf16).

Under autocast with fp32 parameters every matmul re-casts its fp32 weight to bf16 on every step (on an
H200 the `aten::copy_` of those casts was 24% of the step's CUDA time, issue 20). Here the model holds bf16
copies, so autocast finds them already in bf16; the optimizer keeps updating the original fp32 Parameter
objects (the masters), which is why an optimizer built or resumed before the switch needs no change.
Checkpoints are written with the masters swapped back in, so they stay fp32.

The routing's parameters (every router, and RMoE's shared recurrent core) stay fp32 and are their own
masters: routers score in fp32 (model/routers.py), and bf16-rounded router weights would flip choices on
near ties, as bf16 scores did (issue 20, item 4). They are a few E x D matrices a layer, so keeping them
costs nothing, and the routing is the fp32 masters' routing of the same input.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn


class MasterWeights:
    """Swaps each floating parameter of `model` for a `dtype` copy and keeps the original as its master."""

    def __init__(self, model: nn.Module, dtype: torch.dtype = torch.bfloat16):
        from moelab.model.routers import routing_parameters

        self.pairs: list[tuple[nn.Parameter, nn.Parameter]] = []  # (low-precision param, fp32 master)
        self.slots: list[tuple[nn.Module, str, int]] = []  # every place a parameter sits (ties too)
        self.kept = [p for p in routing_parameters(model) if p.is_floating_point()]  # fp32 in the model, no copy
        kept = {id(p) for p in self.kept}
        index: dict[int, int] = {}
        for module in model.modules():
            for name, p in list(module._parameters.items()):
                if p is None or not p.is_floating_point() or id(p) in kept:
                    continue
                if id(p) not in index:
                    index[id(p)] = len(self.pairs)
                    self.pairs.append((nn.Parameter(p.detach().to(dtype), requires_grad=p.requires_grad), p))
                self.slots.append((module, name, index[id(p)]))
                setattr(module, name, self.pairs[index[id(p)]][0])

    def grads_to_master(self) -> None:
        """fp32 master grads from the low-precision grads (then freed); a frozen parameter's stays None."""
        for low, master in self.pairs:
            master.grad = None if low.grad is None else low.grad.float()
            low.grad = None
            master.requires_grad_(low.requires_grad)

    def clip(self, max_norm: float) -> float:
        """Clip the masters' fp32 grads (the kept routing parameters' too); the global norm before clipping, as
        `clip_grad_norm_` returns."""
        grads = [m for _, m in self.pairs if m.grad is not None] + [p for p in self.kept if p.grad is not None]
        if not grads:
            return 0.0
        return float(torch.nn.utils.clip_grad_norm_(grads, max_norm))

    @torch.no_grad()
    def master_to_model(self) -> None:
        """The optimizer's fp32 update, rounded into the parameters the forward uses."""
        for low, master in self.pairs:
            low.copy_(master)

    @contextlib.contextmanager
    def fp32_in_model(self):
        """The masters in the model's slots while saving, so a checkpoint holds fp32 weights."""
        for module, name, i in self.slots:
            setattr(module, name, self.pairs[i][1])
        try:
            yield
        finally:
            for module, name, i in self.slots:
                setattr(module, name, self.pairs[i][0])


def maybe_master_weights(model: nn.Module, param_dtype: str, autocast_on: bool) -> MasterWeights | None:
    if param_dtype == "fp32":
        return None
    from moelab.config import MoelabError

    if not autocast_on:
        raise MoelabError("train.param_dtype=bf16 needs bf16 autocast (train.dtype=bf16, or auto on a GPU with "
                          "bf16): without it the whole model, norms and softmaxes included, would run in bf16")
    return MasterWeights(model, torch.bfloat16)
