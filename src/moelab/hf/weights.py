"""A Closer Look's weight analyses straight on a transformers checkpoint: router and expert tensors only.

Legend: E experts, F expert hidden dim, D model dim.

One dict per MoE layer in the layout `moelab.analysis.weights.weight_analysis` reads (the same keys as
`moelab.trace.weights.model_weight_layers`): `w_up_EFD`, `w_gate_EFD`, `w_down_EDF` (neuron i = row i of
up and gate, column i of down), `w_router_ED`, `block` and `router_kind`. Attention, embeddings and dense
FFNs are never read, and only the chosen layers are loaded, so a large checkpoint costs one layer's
experts at a time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from moelab.config import MoelabError
from moelab.hf.families import moelab_config, read_hf_config
from moelab.hf.hub import resolve_hf
from moelab.hf.io import TensorReader
from moelab.hf.links import Link, moe_prefix, expert_links


def _expert(reader: TensorReader, w_in: Link, w_out: Link, e: int) -> tuple[torch.Tensor, ...]:
    """(gate [F, D], up [F, D], down [D, F]) of expert e, from either expert layout."""
    if w_in.kind == "fused_in":
        gate_up = reader.row(w_in.hf[0], e)
        F = gate_up.shape[0] // 2
        return gate_up[:F], gate_up[F:], reader.row(w_out.hf[0], e)
    E = w_in.shape[0]
    return reader.get(w_in.hf[e]), reader.get(w_in.hf[E + e]), reader.get(w_out.hf[e])


def _numpy(mats: list[torch.Tensor]) -> np.ndarray:
    return torch.stack(mats).float().numpy()


def _check_present(reader: TensorReader, links: list[Link], router: str, folder: Path) -> None:
    names = [n for link in links for n in link.hf] + [router]
    missing = [n for n in names if n not in reader]
    if missing:
        raise MoelabError(f"transformers checkpoint {folder} lacks {missing[0]}")
    for link in links:
        for name, shape in link.hf_shapes().items():
            if reader.shape(name) != shape:
                raise MoelabError(f"transformers checkpoint {folder}: tensor {name} has shape "
                                  f"{list(reader.shape(name))}, the config expects {list(shape)}")


def hf_weight_layers(name_or_path: str | Path, *, layers: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """Expert and router weights of each MoE layer (or of the MoE layers numbered in `layers`, 0-based
    among MoE layers) of a Mixtral / Qwen2-MoE / Qwen3-MoE / OLMoE checkpoint, as float32 numpy arrays."""
    folder = resolve_hf(name_or_path)
    family, cfg = moelab_config(read_hf_config(folder))
    reader = TensorReader(folder)
    keys = set(reader.keys())
    blocks = cfg.moe_layer_ids()
    chosen = list(range(len(blocks))) if layers is None else list(layers)
    bad = [i for i in chosen if not 0 <= i < len(blocks)]
    if bad:
        raise MoelabError(f"MoE layer {bad[0]} does not exist: the model has {len(blocks)} (0..{len(blocks) - 1})")
    out = []
    for i in chosen:
        block = blocks[i]
        prefix = moe_prefix(family, block, keys)
        w_in, w_out = expert_links(cfg, family, block, prefix, keys)
        _check_present(reader, [w_in, w_out], prefix + "gate.weight", folder)
        gate, up, down = zip(*(_expert(reader, w_in, w_out, e) for e in range(cfg.moe.num_experts)))
        out.append({"w_up_EFD": _numpy(up), "w_gate_EFD": _numpy(gate), "w_down_EDF": _numpy(down),
                    "w_router_ED": reader.get(prefix + "gate.weight").float().numpy(),
                    "block": block, "router_kind": "linear"})
    return out
