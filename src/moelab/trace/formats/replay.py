"""Router-replay arrays in and out: int32 (tokens, layers, top_k) logical expert ids, -1 = none.

This is the form RL stacks exchange to replay an inference engine's routing in training (vLLM's
`routed_experts`, Megatron's RouterReplay `[num_tokens, num_layers, topk]`, verl). Files, never pickled:

- `.npy` (read with allow_pickle=False): (T, L, K) one sequence, or (B, T, L, K) a batch padded with -1;
- `.safetensors`: `routed_experts` (N, L, K), or (B, T, L, K) padded with `input_ids` (B, T or T + 1);
  optional `input_ids` (token ids); when N packs several
  sequences, `routed_lens` (S,) and, with token ids, `token_lens` (S,); optional `layer_blocks` (L,), the
  transformer block of each layer (moelab writes it; without it a layer's block is its index).

A sequence has as many token ids as routed rows, or one more: an engine never runs the token it sampled
last, so its array stops one short ("without the last token"); that token then gets no rows.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import numpy as np

from moelab.config import MoelabError
from moelab.outpath import check_out_file
from moelab.trace.formats.routed import Routed
from moelab.trace.io import open_trace

WHAT_LACKS = "arrays without input_ids carry no token ids "


def _load(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise MoelabError(f"replay file not found: {path}")
    if path.suffix == ".npy":
        try:
            return {"routed_experts": np.load(path, allow_pickle=False)}
        except (ValueError, OSError, EOFError) as e:
            raise MoelabError(f"{path} is not a readable .npy array without pickled objects: {e}") from None
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise MoelabError(f"{path} is not a readable safetensors file: {e}") from None
    raise MoelabError(f"replay file {path} must end in .npy or .safetensors")


def _lens(arrays: dict[str, np.ndarray], key: str, total: int, path: Path) -> np.ndarray:
    lens = arrays.get(key)
    if lens is None:
        return np.array([total])
    lens = np.asarray(lens).reshape(-1).astype(np.int64)
    if lens.min(initial=0) < 0 or lens.sum() != total:
        raise MoelabError(f"{path}: {key} sums to {int(lens.sum())}, not the {total} rows it splits")
    return lens


def read_replay(path: str | Path) -> Iterator[Routed]:
    path = Path(path)
    arrays = _load(path)
    if "routed_experts" not in arrays:
        raise MoelabError(f"{path} has no 'routed_experts' tensor (it has: {', '.join(sorted(arrays))})")
    ids = arrays["routed_experts"]
    if ids.dtype.kind not in "iu":
        raise MoelabError(f"{path}: routed_experts has dtype {ids.dtype}, expected integer expert ids")
    if ids.size and ids.min() < -1:
        raise MoelabError(f"{path}: routed_experts holds {int(ids.min())}; ids are >= 0, or -1 for none")
    if ids.ndim == 4:  # a padded batch: each row is a sequence (padding is -1 and gets no rows)
        tokens = arrays.get("input_ids")
        if tokens is not None and (np.ndim(tokens) != 2 or len(tokens) != len(ids)
                                   or np.shape(tokens)[1] not in (ids.shape[1], ids.shape[1] + 1)):
            raise MoelabError(f"{path}: input_ids of shape {np.shape(tokens)} do not match routed_experts "
                              f"{ids.shape} (batch, tokens[+1], ...)")
        for b in range(ids.shape[0]):
            tok = None if tokens is None else np.asarray(tokens[b][: ids.shape[1]])
            yield Routed(ids[b].astype(np.int64), tok, f"{path} sequence {b}")
        return
    if ids.ndim != 3:
        raise MoelabError(f"{path}: routed_experts has shape {ids.shape}, expected (tokens, layers, top_k) "
                          f"or (batch, tokens, layers, top_k)")
    routed = _lens(arrays, "routed_lens", len(ids), path)
    blocks = arrays.get("layer_blocks")
    if blocks is not None and np.asarray(blocks).shape != (ids.shape[1],):
        raise MoelabError(f"{path}: layer_blocks has shape {np.asarray(blocks).shape}, expected ({ids.shape[1]},)")
    tokens = arrays.get("input_ids")
    token_lens = None
    if tokens is not None:
        tokens = np.asarray(tokens).reshape(-1)
        if len(routed) > 1 and "token_lens" not in arrays:
            raise MoelabError(f"{path}: input_ids of several sequences need token_lens")
        token_lens = _lens(arrays, "token_lens", len(tokens), path)
    r0 = t0 = 0
    for s, n in enumerate(routed):
        tok = None
        if tokens is not None:
            m = int(token_lens[s]) if s < len(token_lens) else -1
            if m not in (n, n + 1):
                raise MoelabError(f"{path} sequence {s}: {n} routed rows and {m} token ids; expected {n} "
                                  f"(every token) or {n + 1} (without the last token)")
            tok, t0 = tokens[t0: t0 + n], t0 + m
        yield Routed(ids[r0: r0 + n].astype(np.int64), tok, f"{path} sequence {s}", blocks)
        r0 += n


def trace_to_replay(trace_path: str | Path, *, drop_last: bool = False) -> dict[str, list[np.ndarray]]:
    """Per sequence: ids (T, L, K) int32 with -1 where the trace has no row, and token ids when it has them.
    Streamed a sequence at a time (the last sequence of a batch waits for the next batch), so the trace's
    row columns are never held whole (10 GiB for a 1M-token trace of OLMoE's shape)."""
    trace = open_trace(trace_path)
    L, K = trace.meta.num_layers, trace.meta.top_k
    cols = ["seq", "pos", "layer", "block", "rank", "expert"] + (["token"] if "token" in trace.columns else [])
    blocks = np.zeros(L, np.int64)
    out: dict[str, list[np.ndarray]] = {"ids": [], "tokens": [], "blocks": [blocks]}
    carry: dict[str, np.ndarray] | None = None
    for batch in trace.iter_batches(columns=cols):
        rows = {c: batch[c] if carry is None else np.concatenate([carry[c], batch[c]]) for c in cols}
        if not np.all(np.diff(rows["seq"]) >= 0):
            raise MoelabError(f"trace {trace.path} is not in seq order: rows must come in (seq, pos, layer, rank) order")
        blocks[rows["layer"]] = rows["block"]
        last = int(np.searchsorted(rows["seq"], rows["seq"][-1])) if len(rows["seq"]) else 0
        _sequences({c: v[:last] for c, v in rows.items()}, L, K, drop_last, out)
        carry = {c: v[last:] for c, v in rows.items()}
    if carry is not None:
        _sequences(carry, L, K, drop_last, out)
    return out


def _sequences(rows: dict[str, np.ndarray], L: int, K: int, drop_last: bool, out: dict) -> None:
    """The whole sequences in `rows` (in seq order) appended to `out` as trace_to_replay returns them."""
    if not len(rows["seq"]):
        return
    _, starts = np.unique(rows["seq"], return_index=True)
    for a, b in zip(starts, list(starts[1:]) + [len(rows["seq"])]):
        pos = rows["pos"][a:b].astype(np.int64)
        T = int(pos.max()) + 1
        ids = np.full((T, L, K), -1, np.int32)
        ids[pos, rows["layer"][a:b], rows["rank"][a:b]] = rows["expert"][a:b]
        out["ids"].append(ids[: T - 1] if drop_last else ids)
        if "token" in rows:
            tok = np.full(T, -1, np.int32)
            tok[pos] = rows["token"][a:b]
            out["tokens"].append(tok)


def export_replay(trace_path: str | Path, out: str | Path, *, drop_last: bool = False) -> dict:
    """Write a trace's routing as a replay file (.npy or .safetensors); published only when complete."""
    out = Path(out)
    if out.suffix not in (".npy", ".safetensors"):
        raise MoelabError(f"--out {out} must end in .npy or .safetensors")
    check_out_file(out)
    rep = trace_to_replay(trace_path, drop_last=drop_last)
    tmp = out.with_name(out.name + ".tmp")
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        if out.suffix == ".npy":
            _save_npy(tmp, rep["ids"])
        else:
            _save_safetensors(tmp, rep)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return {"sequences": len(rep["ids"]), "tokens": int(sum(len(x) for x in rep["ids"])),
            "with_tokens": bool(rep["tokens"]) and out.suffix == ".safetensors"}


def _save_npy(tmp: Path, ids: list[np.ndarray]) -> None:
    if len(ids) == 1:
        arr = ids[0]
    else:  # several sequences: a batch padded with -1 (no token ids in .npy)
        T = max(len(x) for x in ids)
        arr = np.full((len(ids), T) + ids[0].shape[1:], -1, np.int32)
        for b, x in enumerate(ids):
            arr[b, : len(x)] = x
    with open(tmp, "wb") as f:
        np.save(f, arr, allow_pickle=False)


def _save_safetensors(tmp: Path, rep: dict[str, list[np.ndarray]]) -> None:
    from safetensors.numpy import save_file

    tensors = {"routed_experts": np.ascontiguousarray(np.concatenate(rep["ids"])),
               "routed_lens": np.array([len(x) for x in rep["ids"]], np.int64), "layer_blocks": rep["blocks"][0]}
    if rep["tokens"]:
        tensors["input_ids"] = np.concatenate(rep["tokens"])
        tensors["token_lens"] = np.array([len(x) for x in rep["tokens"]], np.int64)
    save_file(tensors, str(tmp), metadata={"format": "moelab router replay: int32 (tokens, layers, top_k), -1 = none"})
