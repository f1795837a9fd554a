"""Router replay from a file: a moelab trace (.parquet) or a replay array (.npy / .safetensors, the int32
(tokens, moe_layers, top_k) contract RL stacks exchange) -> forced ids for `edit_routing`.

Legend: B batch rows, S sequence, T = B*S tokens, L MoE layers, K experts per token.
An engine's array may stop one token short of its sequence (it never runs the token it sampled last):
both forms are accepted, and a position without ids (-1) routes normally.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from moelab.config import MoelabError
from moelab.intervene.edit import RoutingEdit, moe_blocks


def read_replay_ids(path: str | Path) -> tuple[list[np.ndarray], np.ndarray | None]:
    """Per sequence ids (T, L, K) with -1 = none, and the block of each layer when the file says."""
    seqs, blocks, _ = read_replay_file(path)
    return seqs, blocks


def read_replay_file(path: str | Path):
    """(ids per sequence, blocks or None, token ids per sequence or None)."""
    path = Path(path)
    if path.suffix == ".parquet":
        from moelab.trace.formats.replay import trace_to_replay

        out = trace_to_replay(path)
        return out["ids"], out["blocks"][0], out["tokens"] or None
    from moelab.trace.formats.replay import read_replay

    seqs = list(read_replay(path))
    blocks = None if not seqs or seqs[0].blocks_L is None else np.asarray(seqs[0].blocks_L)
    tokens = [s.tokens_T for s in seqs] if seqs and all(s.tokens_T is not None for s in seqs) else None
    return [s.ids_TLK for s in seqs], blocks, tokens


def check_trace_model(path: str | Path, model) -> None:
    """A trace records the model it came from: another transformers family (same shape or not), or other
    expert counts per layer, is another model's routing. Checkpoints of one architecture may replay each
    other's routing (the point of replay), so weights are not compared."""
    if Path(path).suffix != ".parquet":
        return
    from moelab.trace.io import open_trace

    meta = open_trace(path).meta
    theirs = (meta.model_config or {}).get("model_type")
    ours = getattr(getattr(model, "config", None), "model_type", None)
    if theirs and ours and theirs != ours:
        raise MoelabError(f"{path} is a trace of a {theirs!r} model, this model is {ours!r}: "
                          f"it comes from another model")
    experts = [E for _, (E, _) in sorted(model_layout(model)[0].items())]
    if len(meta.num_experts) == len(experts) and list(meta.num_experts) != experts:
        raise MoelabError(f"{path} records {list(meta.num_experts)} experts per MoE layer, this model has "
                          f"{experts}: it comes from another model")


def check_tokens(tokens: list[np.ndarray] | None, first: int, input_ids_BS: torch.Tensor, where: str) -> None:
    """A replay of other tokens than the batch would force routes onto the wrong tokens: refuse it."""
    if tokens is None:
        return
    for r, row in enumerate(input_ids_BS.cpu().numpy()):
        if first + r < len(tokens):
            t = np.asarray(tokens[first + r])
            t = t[t >= 0][: len(row)]
            if not np.array_equal(t, row[: len(t)]):
                raise MoelabError(f"{where} sequence {first + r} holds other tokens than the corpus row it "
                                  f"replays (same --seq-len, --split and corpus as the trace?)")


def model_layout(model) -> tuple[dict[int, tuple[int, int]], int]:
    """({MoE block: (experts, top_k)}, number of blocks) of a moelab decoder or a transformers MoE model."""
    layers = moe_blocks(model)
    if layers:
        return {b: (m.num_experts, m.router.top_k) for b, m in layers.items()}, len(model.blocks)
    from moelab.intervene.hf_edit import hf_moe

    moe = hf_moe(model)
    return moe.layout(), moe.num_layers


def fit_to_model(seqs: list[np.ndarray], blocks_L, model, where: str) -> tuple[list[np.ndarray], list[int]]:
    """Check the replay came from this model's shape; keep its MoE layers. One line naming what differs."""
    layout, n_blocks = model_layout(model)
    moe = sorted(layout)
    if not seqs:
        raise MoelabError(f"{where} holds no sequences")
    L, K = seqs[0].shape[1:]
    if L == n_blocks and L != len(moe):  # an array over every layer: dense layers must be all -1
        dense = [b for b in range(L) if b not in layout]
        if any((s[:, dense] >= 0).any() for s in seqs):
            raise MoelabError(f"{where} routes tokens in dense blocks {dense}: it comes from another model")
        seqs, L = [s[:, moe] for s in seqs], len(moe)
        blocks_L = None
    K_model = layout[moe[0]][1]
    if L != len(moe) or K != K_model:
        raise MoelabError(f"{where} has {L} layers x top-{K}, this model has {len(moe)} MoE layers x top-{K_model}: "
                          f"it comes from another model")
    if blocks_L is not None and list(map(int, blocks_L)) != moe:
        raise MoelabError(f"{where} records MoE blocks {list(map(int, blocks_L))}, this model's are {moe}: "
                          f"it comes from another model")
    for i, b in enumerate(moe):
        top = max(int(s[:, i].max(initial=-1)) for s in seqs)
        if top >= layout[b][0]:
            raise MoelabError(f"{where} uses expert {top} in block {b}, which has {layout[b][0]}: "
                              f"it comes from another model")
    return seqs, moe


def batch_edits(seqs: list[np.ndarray], first: int, B: int, S: int, blocks: list[int]) -> dict[int, RoutingEdit]:
    """Forced ids for rows `first`..`first+B-1` of a batch of B x S tokens; missing positions route normally."""
    L, K = seqs[0].shape[1:]
    ids_BSLK = np.full((B, S, L, K), -1, np.int64)
    for r in range(B):
        if first + r < len(seqs):
            s = seqs[first + r][:S]
            ids_BSLK[r, : len(s)] = s
    ids_TLK = torch.from_numpy(ids_BSLK.reshape(B * S, L, K))
    return {b: RoutingEdit(force_ids_TK=ids_TLK[:, i]) for i, b in enumerate(blocks)}


def covered_routes(edit, keep_T: torch.Tensor) -> torch.Tensor:
    """Positions whose route a replay sets (no -1 in the row) among `keep_T`: the only routes a
    'routes changed' share may count (a position the trace lacks routes normally and says nothing)."""
    if edit is None or edit.force_ids_TK is None:
        return torch.zeros_like(keep_T)
    return keep_T & (edit.force_ids_TK.to(keep_T.device) >= 0).all(-1)
