"""A Closer Look's weight analyses straight on a transformers checkpoint: router and expert tensors only.

Legend: E experts, F expert hidden dim, D model dim.

One dict per MoE layer in the layout `moelab.analysis.weights.weight_analysis` reads (the same keys as
`moelab.trace.weights.model_weight_layers`): `w_up_EFD`, `w_gate_EFD`, `w_down_EDF` (neuron i = row i of
up and gate, column i of down), `w_router_ED` (or `router_note` when no [E, D] router matrix is found),
`block` and `router_kind`. The MoE layers are found from the checkpoint's tensor names alone, for any
family whose experts are stored as matrices: stacked (`experts.gate_up_proj` [E, 2F, D] and
`experts.down_proj` [E, D, F], transformers 5) or one tensor per expert (`experts.{e}.gate_proj/up_proj/
down_proj`, or Mixtral's w1/w3/w2). Attention, embeddings and dense FFNs are never read, and tensors are
read one expert at a time, so a large checkpoint costs one layer's experts at a time.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from moelab.config import MoelabError
from moelab.hf.hub import resolve_hf
from moelab.hf.io import TensorReader
from moelab.trace.weights import WeightLayers

_LAYER = r"^(?P<p>(?:.*\.)?(?:layers|blocks|h)\.(?P<b>\d+)\.(?:.*\.)?)experts\."
STACKED = re.compile(_LAYER + r"gate_up_proj$")
PER_EXPERT = re.compile(_LAYER + r"(?P<e>\d+)\.(?P<w>gate_proj|up_proj|down_proj|w1|w3|w2)\.weight$")
_NOT_TEXT = re.compile(r"(^|\.)(visual|vision\w*|audio\w*|talker|mtp|\w*encoder)(\.|$)")
ROUTER_NAMES = ("gate.weight", "router.weight", "router.layer.weight", "gate.wg.weight")
_ROLE = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


def moe_layers_of(keys: Sequence[str]) -> list[tuple[int, str, str]]:
    """(block, prefix, layout) of every text MoE layer, in block order; layout is stacked or per_expert."""
    found: dict[str, tuple[int, str]] = {}
    for name in keys:
        if _NOT_TEXT.search(name):
            continue
        m = STACKED.match(name)
        layout = "stacked"
        if m is None:
            m, layout = PER_EXPERT.match(name), "per_expert"
        if m is not None:
            found.setdefault(m["p"], (int(m["b"]), layout))
    return sorted(((b, p, lay) for p, (b, lay) in found.items()), key=lambda t: t[0])


def _float(reader: TensorReader, name: str) -> torch.Tensor:
    t = reader.get(name)
    if not t.is_floating_point():
        raise MoelabError(f"{reader.path}: {name} is stored as {t.dtype} (quantised?): "
                          "the weight analyses need unquantised float tensors")
    return t.float()


def _stacked(reader: TensorReader, prefix: str) -> tuple[np.ndarray, ...]:
    gu, down = prefix + "experts.gate_up_proj", prefix + "experts.down_proj"
    (E, X, D), shape = reader.shape(gu), reader.shape(down) if down in reader else None
    if shape != (E, D, X // 2):
        raise MoelabError(f"{reader.path}: {gu} {[E, X, D]} with {down} {list(shape or [])} is not the "
                          "[E, 2F, D] / [E, D, F] layout (gate then up) the weight analyses read")
    gates, ups, downs = [], [], []
    for e in range(E):
        g_u = reader.row(gu, e).float()
        gates.append(g_u[: X // 2])
        ups.append(g_u[X // 2:])
        downs.append(reader.row(down, e).float())
    return tuple(torch.stack(m).numpy() for m in (gates, ups, downs))


def _per_expert(reader: TensorReader, prefix: str, keys: set[str]) -> tuple[np.ndarray, ...]:
    names = {}
    for k in keys:
        m = PER_EXPERT.match(k)
        if m is not None and m["p"] == prefix:
            names[(int(m["e"]), _ROLE.get(m["w"], m["w"]))] = k
    E = 1 + max(e for e, _ in names)
    missing = [(e, r) for e in range(E) for r in ("gate_proj", "up_proj", "down_proj") if (e, r) not in names]
    if missing:
        raise MoelabError(f"{reader.path}: expert {missing[0][0]} of {prefix} has no {missing[0][1]} weight")
    return tuple(np.stack([_float(reader, names[(e, r)]).numpy() for e in range(E)])
                 for r in ("gate_proj", "up_proj", "down_proj"))


def _shape(reader: TensorReader, block: int, prefix: str, layout: str, keys: set[str]) -> dict[str, Any]:
    """The layer's block, expert count, hidden width and router, from tensor names and shapes only."""
    if layout == "stacked":
        E, X, D = reader.shape(prefix + "experts.gate_up_proj")
        F = X // 2
    else:
        ups = [k for k in keys if (m := PER_EXPERT.match(k)) is not None and m["p"] == prefix
               and _ROLE.get(m["w"], m["w"]) == "up_proj"]
        E = 1 + max(int(PER_EXPERT.match(k)["e"]) for k in ups) if ups else 0
        F, D = reader.shape(ups[0]) if ups else (0, 0)
    shape: dict[str, Any] = {"block": block, "experts": int(E), "hidden": int(F)}
    router = next((prefix + r for r in ROUTER_NAMES if prefix + r in keys), None)
    if router is not None and reader.shape(router) == (E, D):
        shape["router"] = router
    else:
        shape["router_note"] = (f"no [E, D] router matrix next to {prefix}experts, so router rows cannot be "
                                "compared with the experts' weights")
    return shape


def _layer(reader: TensorReader, shape: dict[str, Any], prefix: str, layout: str, keys: set[str]) -> dict[str, Any]:
    gate, up, down = _stacked(reader, prefix) if layout == "stacked" else _per_expert(reader, prefix, keys)
    out: dict[str, Any] = {"w_up_EFD": up, "w_gate_EFD": gate, "w_down_EDF": down, "block": shape["block"],
                           "router_kind": "linear"}
    if "router" in shape:
        out["w_router_ED"] = _float(reader, shape["router"]).numpy()
    else:
        out["router_kind"] = "unknown"
        out["router_note"] = shape["router_note"]
    return out


def hf_weight_layers(name_or_path: str | Path, *, layers: Sequence[int] | None = None) -> WeightLayers:
    """Expert and router weights of each MoE layer (or of the MoE layers numbered in `layers`, 0-based
    among MoE layers) of a transformers checkpoint of any family with matrix experts, as float32 arrays,
    each layer read from the files when asked for (WeightLayers: OLMoE-1B-7B's experts are 24 GiB in fp32)."""
    folder = resolve_hf(name_or_path)
    reader = TensorReader(folder)
    keys = set(reader.keys())
    found = moe_layers_of(sorted(keys))
    if not found:
        raise MoelabError(f"{folder} has no MoE expert matrices (experts.gate_up_proj or experts.N.*_proj): "
                          "nothing for the weight analyses to read")
    chosen = list(range(len(found))) if layers is None else list(layers)
    bad = [i for i in chosen if not 0 <= i < len(found)]
    if bad:
        raise MoelabError(f"MoE layer {bad[0]} does not exist: the model has {len(found)} (0..{len(found) - 1})")
    shapes = [_shape(reader, *found[i], keys) for i in chosen]
    return WeightLayers([{k: v for k, v in sh.items() if k != "router"} for sh in shapes],
                        lambda j: _layer(reader, shapes[j], *found[chosen[j]][1:], keys))
