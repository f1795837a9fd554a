"""Megatron-LM's RouterTracer JSONL (megatron/core/transformer/moe/router_trace.py, `--moe-routing-trace-path`).

One file per rank, `router_trace_rank{r}.jsonl`, one record per (step, block, layer) router call:

    {"step": 0, "stage": "pre_dispatch", "block": "decoder", "layer": 3, "rank": 0,
     "num_tokens": 128, "topk": 8, "top_indices": [[12, 45, ...], ...]}

`top_indices` holds num_tokens lists of topk expert ids, in `routing_map.nonzero()` order: ascending expert
id, not the router's ranking. So rank 0 of an import is the lowest chosen id, and the trace's metadata says
`extra["rank_order"] = "unknown"`; rank-dependent analyses refuse or say so. Records of the multi-token
prediction head (`"block": "mtp"`) are left out with a note; the hidden-state and logit sidecar offsets
(`hs_*`, `logit_*`) are ignored. The file has no token ids, probabilities or combine weights.

Token order: Megatron's activations are sequence-first ([s, b, h]), so a router call sees its tokens
flattened position-major: token t is position t // B of micro-batch row t % B, for micro-batch size B
(`micro_batch`, default 1). Each router call group (one forward: every layer once) becomes B sequences;
a layer seen again within a step starts the next forward, as RouterTracer itself splits steps.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

import numpy as np

from moelab.config import MoelabError
from moelab.trace.formats.routed import Routed, jsonl_records
from moelab.trace.formats.values import MAX_COUNT, MAX_EXPERTS, MAX_LAYER, MAX_TOP_K, int_array, int_field, show

WHAT_LACKS = "records no token ids "
KEYS = ("step", "layer", "num_tokens", "top_indices")


def trace_files(path: str | Path) -> list[Path]:
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("router_trace_rank*.jsonl"),
                       key=lambda p: int(re.sub(r"\D", "", p.stem) or 0))
        if not files:
            raise MoelabError(f"folder {path} has no router_trace_rank*.jsonl files")
        return files
    if not path.is_file():
        raise MoelabError(f"Megatron router trace not found: {path}")
    return [path]


def _records(path: Path) -> Iterator[tuple[str, dict]]:
    return jsonl_records(path, KEYS, "a RouterTracer record")


def _indices(where: str, rec: dict) -> np.ndarray:
    T = int_field(rec, "num_tokens", where, 0, MAX_COUNT)
    K = int_field(rec, "topk", where, 1, MAX_TOP_K) if "topk" in rec else None
    ids = int_array(rec["top_indices"], 2, where, "top_indices", 0, MAX_EXPERTS - 1)
    if not T and K:  # an empty call: its lists say nothing of K
        ids = ids.reshape(0, K)
    if len(ids) != T or (K is not None and ids.shape[1] != K) or not ids.shape[1]:
        raise MoelabError(f"{where}: top_indices has shape {ids.shape}, but num_tokens={T} and topk={K}")
    return ids


def _forwards(path: Path, skipped: list[int]) -> Iterator[tuple[str, dict[int, np.ndarray]]]:
    """Decoder records grouped into forwards: a new step, or a layer already seen, starts the next one."""
    group: dict[int, np.ndarray] = {}
    step, first = None, ""
    for where, rec in _records(path):
        block = rec.get("block", "decoder")
        if block not in ("decoder", "mtp"):
            raise MoelabError(f"{where}: block={show(block)} is neither 'decoder' nor 'mtp'")
        if block == "mtp":
            skipped[0] += 1
            continue
        layer = int_field(rec, "layer", where, 0, MAX_LAYER)
        int_field(rec, "step", where, 0, MAX_COUNT)
        if group and (rec["step"] != step or layer in group):
            yield first, group
            group = {}
        if not group:
            step, first = rec["step"], where
        group[layer] = _indices(where, rec)
    if group:
        yield first, group


def read_megatron(path: str | Path, micro_batch: int = 1, skipped: list[int] | None = None) -> Iterator[Routed]:
    if micro_batch < 1:
        raise MoelabError(f"--micro-batch {micro_batch} must be >= 1")
    skipped = skipped if skipped is not None else [0]
    layers: list[int] | None = None
    for file in trace_files(path):
        for where, group in _forwards(file, skipped):
            if layers is None:
                layers = sorted(group)
            if sorted(group) != layers:
                raise MoelabError(f"{where}: a forward over layers {sorted(group)}, others over {layers}: "
                                  f"import the ranks of one pipeline stage together")
            shapes = {group[l].shape for l in layers}
            if len(shapes) > 1:
                raise MoelabError(f"{where}: the layers of one forward route (tokens, top_k) = {sorted(shapes)}: "
                                  f"every layer of a forward must see the same tokens with the same top_k")
            ids_TLK = np.stack([group[l] for l in layers], axis=1)
            T = len(ids_TLK)
            if T % micro_batch:
                raise MoelabError(f"{where}: {T} tokens do not split into micro-batch rows of {micro_batch}")
            by_row = ids_TLK.reshape(T // micro_batch, micro_batch, *ids_TLK.shape[1:])
            for b in range(micro_batch):
                yield Routed(by_row[:, b], None, f"{where} (micro-batch row {b})", np.array(layers))
