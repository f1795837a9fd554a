"""The routing path as one function: scoring and selection, capacity drops, the sort by expert and the
router losses; `torch.compile` traces it whole (no graph break), for fewer kernels where that pays.

Legend: T tokens, D model dim, E experts, K experts per token, M = T * K choices.

`plan_routing` runs the router's `decide` (scoring in fp32 with autocast off, top-k, weights), then
`plan_from`: nothing in either branches on data or reads a value back to the host, so the compiled and
eager paths run the same operators in the same order. The one host sync the path needs (the kept count,
which sizes the experts' tensors) happens after it, in `dispatch.trimmed`.

`model.compile_routing` chooses: `off` eager, `on` compiled, `auto` compiled only where a measurement
recorded in `routing_compile.json` (written by `benchmarks/gpu_check.py --record`) found it faster on
this device with this torch. Not a timed trial at start-up: that would compile in every process (tens of
seconds on a CPU, for a `moelab trace` of a few batches too), and a compiled softmax may round differently
from eager in the last bit, so a run's routing would hang on a timing race. Recorded, the choice is the
same in every run on the same device.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import torch

from moelab.config import MoelabError
from moelab.model.capacity import DropRule, drop_mask_at
from moelab.model.compiling import compile_supported, compiled
from moelab.model.dispatch import full_permutation
from moelab.model.losses import load_balance_loss, router_z_loss
from moelab.model.routers import Router, Routing

MODES = ("auto", "on", "off")
RECORD = Path(__file__).with_name("routing_compile.json")


class RoutePlan(NamedTuple):
    routing: Routing  # the router's value: ids, weights before dropping, logits, probs, state
    dropped_TK: torch.Tensor  # True where the choice lost its place to capacity
    weights_TK: torch.Tensor  # combine weights applied (0 where dropped)
    order_M: torch.Tensor  # dispatch.full_permutation: all M choices sorted by expert, dropped last
    inv_TK: torch.Tensor
    offs_E: torch.Tensor
    balance_loss: torch.Tensor
    z_loss: torch.Tensor


def plan_routing(router: Router, x_TD: torch.Tensor, state, token_ids_T, rule: DropRule | None,
                 num_experts: int) -> RoutePlan:
    """The whole routing path for already-jittered inputs (the jitter's random draw stays eager: a
    compiled RNG draws other numbers than eager's)."""
    return plan_from(router.decide(x_TD, state, token_ids_T), rule, num_experts)


def plan_from(r: Routing, rule: DropRule | None, num_experts: int) -> RoutePlan:
    """Everything after the router's decision: drops, applied weights, permutation, losses."""
    if rule is None:
        dropped_TK, keep_TK = torch.zeros_like(r.expert_ids_TK, dtype=torch.bool), None
    else:
        dropped_TK = drop_mask_at(r.expert_ids_TK, r.probs_TE.gather(-1, r.expert_ids_TK), num_experts, rule)
        keep_TK = ~dropped_TK
    weights_TK = r.weights_TK.masked_fill(dropped_TK, 0.0)
    order_M, inv_TK, offs_E = full_permutation(r.expert_ids_TK, keep_TK, num_experts)
    return RoutePlan(r, dropped_TK, weights_TK, order_M, inv_TK, offs_E,
                     load_balance_loss(r.probs_TE, r.expert_ids_TK), router_z_loss(r.logits_TE))


_COMPILED: dict[str, object] = {}


def compiled_plan(backend: str):
    """`plan_routing` compiled with `backend`, one per process and backend: every layer shares its graph
    (parameters are graph inputs), and a new token count recompiles (shapes are static: the capacity is
    a plain int of the count)."""
    if backend not in _COMPILED:
        why = compile_supported()
        if why:
            raise MoelabError(f"model.compile_routing=on: {why}; set model.compile_routing=off")
        _COMPILED[backend] = compiled(plan_routing, backend, "model.compile_routing", "on", "off",
                                      dynamic=False)
    return _COMPILED[backend]


def has_hooks(module: torch.nn.Module) -> bool:
    """Hooks on the router or inside it (an intervention, a probe) run only through eager module calls:
    such a call stays eager, outside the compiled function, whose graph was traced without them. Inside
    includes RMoE's shared recurrent core, which a router holds outside its children (`core`)."""
    m = torch.nn.modules.module
    local = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    glob = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
            "_global_backward_pre_hooks")
    core = getattr(module, "core", None)
    parts = [*module.modules(), *(core.modules() if isinstance(core, torch.nn.Module) else ())]
    return any(getattr(p, a, None) for p in parts for a in local) or any(getattr(m, a, None) for a in glob)


def device_key(device: torch.device) -> str:
    """What a recorded measurement is filed under: the card's name on CUDA, the device type elsewhere."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def torch_minor() -> str:
    return ".".join(torch.__version__.split("+")[0].split(".")[:2])


@lru_cache(maxsize=None)
def recorded_choice(device_type: str, index: int | None) -> bool:
    """`auto`: compile only where gpu_check recorded it faster for this device and torch minor version
    (read once per device and process)."""
    try:
        entry = json.loads(RECORD.read_text()).get("devices", {}).get(device_key(torch.device(device_type, index)))
    except (OSError, ValueError, AttributeError):
        return False
    return bool(isinstance(entry, dict) and entry.get("torch") == torch_minor() and entry.get("compile") is True)


def use_compiled(mode: str, x_TD: torch.Tensor) -> bool:
    """Whether this call routes through the compiled function (never inside another compiled region,
    which traces the eager code itself, nor for an empty batch)."""
    if mode == "off" or x_TD.shape[0] == 0 or torch.compiler.is_compiling():
        return False
    return mode == "on" or recorded_choice(x_TD.device.type, x_TD.device.index)
