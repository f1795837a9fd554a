"""A model's expert and router weights as numpy arrays, in the layout `analysis.weights.weight_analysis` reads.

Legend: E experts, F expert hidden dim, D model dim.

One dict per MoE layer: `w_up_EFD`, `w_gate_EFD`, `w_down_EDF` (neuron i = row i of up and gate, column i
of down), `w_router_ED` only when the router scores with one D-dimensional row per expert (the linear and
frozen random routers), `w_gate2_EFD` for OpenMoE's three-projection unit, plus `block` (its transformer
block), `router_kind` and, when the router has no such rows, `router_note` saying why the router-vs-expert
regression is left out.

Where the model has a dense FFN of the experts' width F, it comes along as the reference that A Closer
Look compares experts with (`ref_w_up_FD`, `ref_w_gate_FD`, `ref_w_down_DF`, and `ref_name` saying which):
the layer's own shared expert when it is one FFN of width F (same block, same input), else the FFN of the
nearest dense block of width F (the earlier one on a tie). None of the same width: no reference.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from moelab.config import MoelabError

ROW_ROUTERS = ("linear", "random")  # routers whose logits are x W_r with W_r: E x D


class WeightLayers(Sequence):
    """The MoE layers' weight dicts, each read when asked for and not kept: a 7B model's experts in fp32
    are 24 GiB, one OLMoE layer's 1.5 GiB, and the analyses need one layer at a time. `shapes[i]` says
    what a check needs without reading a weight: `block`, `experts`, `hidden` and any `router_note`."""

    def __init__(self, shapes: list[dict[str, Any]], load: Callable[[int], dict[str, Any]]):
        self.shapes, self._load = shapes, load

    def __len__(self) -> int:
        return len(self.shapes)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(len(self))[i]]
        if not -len(self) <= i < len(self):
            raise IndexError(f"MoE layer {i} of {len(self)}")
        return self._load(i % len(self))


def layer_shapes(layers: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """WeightLayers.shapes, or the same read off a list of loaded layers."""
    if isinstance(layers, WeightLayers):
        return layers.shapes
    return [{"block": lay.get("block"), "experts": int(lay["w_up_EFD"].shape[0]),
             "hidden": int(lay["w_up_EFD"].shape[1]), **({"router_note": lay["router_note"]}
                                                          if "router_note" in lay else {})} for lay in layers]


def _numpy(t: Any) -> np.ndarray:
    return t.detach().float().cpu().numpy()


def _router_kind(model: Any) -> str:
    cfg = getattr(model, "config", None)
    return cfg.moe.router.kind if cfg is not None else "unknown"


def model_weight_layers(model: Any) -> WeightLayers:
    """Per MoE layer of a built moelab model: expert matrices (and router rows where they exist) as float32,
    copied out of the model one layer at a time as asked for (WeightLayers)."""
    from moelab.model.moe import MoELayer

    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    if not layers:
        raise MoelabError("the model is dense: it has no MoE layers whose weights could be analysed")
    kind = _router_kind(model)
    shapes = []
    for layer in layers:
        if layer.experts is None:
            raise MoelabError(f"MoE layer in block {layer.layer} has no stacked expert weights to analyse")
        shape = {"block": int(layer.layer), "experts": int(layer.experts.num_experts),
                 "hidden": int(layer.experts.hidden)}
        if kind not in ROW_ROUTERS or getattr(layer.router, "weight_ED", None) is None:
            shape["router_note"] = (f"the {kind} router has no D-dimensional row per expert, so its rows "
                                    "cannot be compared with the experts' weights")
        shapes.append(shape)

    def load(i: int) -> dict[str, Any]:
        layer, shape = layers[i], shapes[i]
        # w_gate2_EFD: the third projection of OpenMoE's released unit (a * silu(gate) * up); the
        # analyses read up / gate / down only, but the neuron is not complete without it.
        entry: dict[str, Any] = {name: _numpy(m) for name, m in layer.experts.matrices().items()}
        entry.update(block=shape["block"], router_kind=kind)
        if "router_note" in shape:
            entry["router_note"] = shape["router_note"]
        else:
            entry["w_router_ED"] = _numpy(layer.router.weight_ED)
        entry.update(dense_reference(model, shape["block"], shape["hidden"]))
        return entry

    return WeightLayers(shapes, load)


def _ffn_parts(ffn: Any) -> dict[str, np.ndarray]:
    """A GatedFFN's W_up, W_gate as F x D and W_down as D x F (the experts' slicing of the fused input)."""
    from moelab.model.config import FFN_IN_PROJECTIONS

    P, F = FFN_IN_PROJECTIONS[ffn.kind], ffn.w_out_FD.shape[0]
    slices = ffn.w_in_DX.detach().split(F, dim=1)
    out = {"ref_w_gate_FD": _numpy(slices[P - 2].T), "ref_w_up_FD": _numpy(slices[P - 1].T),
           "ref_w_down_DF": _numpy(ffn.w_out_FD.detach().T)}
    if P == 3:
        out["ref_w_gate2_FD"] = _numpy(slices[0].T)  # as for the experts: kept so the neuron is complete
    return out


def reference_ffn(model: Any, block: int, F: int) -> tuple[Any, str] | None:
    """(module, name) of the reference FFN of width F for the MoE layer in `block` (see the module docstring),
    or None; chosen from shapes alone, so it works on a model built on the meta device."""
    blocks = list(getattr(model, "blocks", []))
    if not 0 <= block < len(blocks):
        return None
    shared = getattr(blocks[block], "shared", None)
    if shared is not None and shared.w_out_FD.shape[0] == F:
        return shared, f"shared expert of block {block}"
    dense = [i for i, b in enumerate(blocks) if getattr(b, "ffn", None) is not None and b.ffn.w_out_FD.shape[0] == F]
    if not dense:
        return None
    i = min(dense, key=lambda j: (abs(j - block), j))
    return blocks[i].ffn, f"dense FFN of block {i}"


def dense_reference(model: Any, block: int, F: int) -> dict[str, Any]:
    """The reference FFN's matrices for the MoE layer in `block`, or {}."""
    ref = reference_ffn(model, block, F)
    return {} if ref is None else {**_ffn_parts(ref[0]), "ref_name": ref[1]}


def is_transformers_folder(path: Path) -> bool:
    import json

    cfg = path / "config.json"
    try:
        return cfg.is_file() and "model_type" in json.loads(cfg.read_text()) and not (path / "state.json").exists()
    except (json.JSONDecodeError, OSError):
        return False


def checkpoint_weight_layers(path: str | Path) -> Sequence[dict[str, Any]]:
    """`model_weight_layers` of a moelab checkpoint folder (or a run folder: its last checkpoint); a
    transformers checkpoint folder is read tensor by tensor instead (`moelab.hf.weights`)."""
    from moelab.train.commands import resolve_checkpoint

    if is_transformers_folder(Path(path)):
        from moelab.hf.weights import hf_weight_layers

        return hf_weight_layers(path)

    return _lazy_checkpoint_layers(resolve_checkpoint(path))


def _lazy_checkpoint_layers(ckpt: Path) -> WeightLayers:
    """The model is built on the meta device; asking for layer i reads from the file only the tensors of its
    MoE layer and of its reference FFN, and puts them back on the meta device once copied out, so a 7B
    checkpoint costs one layer's experts at a time (not the whole model, twice, with a random init)."""
    from moelab.hf.io import TensorReader
    from moelab.model.moe import MoELayer
    from moelab.train.checkpoint import check_finite, check_shapes_fit, meta_model

    model = meta_model(ckpt)
    reader = TensorReader(ckpt / "model.safetensors")
    own = model.state_dict()
    check_shapes_fit(own, {name: reader.shape(name) for name in reader.keys()}, ckpt)
    try:
        layers = model_weight_layers(model)
    except MoelabError as e:
        raise MoelabError(f"checkpoint {ckpt}: {e}") from None
    prefix = {m: name for name, m in model.named_modules()}
    moe = [m for m in model.modules() if isinstance(m, MoELayer)]  # model_weight_layers' order

    def names(i: int) -> list[str]:
        parts = [moe[i]]
        ref = reference_ffn(model, layers.shapes[i]["block"], layers.shapes[i]["hidden"])
        parts += [ref[0]] if ref is not None else []
        return [f"{prefix[m]}.{n}" for m in parts for n in m.state_dict()]

    def load(i: int) -> dict[str, Any]:
        wanted = names(i)
        values = {}
        for name in wanted:
            t = reader.get(name)
            check_finite(name, t, ckpt)
            values[name] = t.to(own[name].dtype)
        model.load_state_dict(values, strict=False, assign=True)
        try:
            return layers[i]  # arrays copied (or viewed) out of the tensors just assigned
        finally:
            model.load_state_dict({n: own[n] for n in wanted}, strict=False, assign=True)  # back to meta

    return WeightLayers(layers.shapes, load)
