"""Stream a moelab model's routing over a corpus into a trace file (docs/TRACE.md), in bounded memory.

Legend: B batch rows, S sequence, T = B*S tokens, L MoE layers, K experts per token, E experts,
N probabilities kept per (token, layer) by `--probs top:N`.
Rows go out in (seq, pos, layer, rank) order, one batch at a time; padding positions produce no rows.
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import pyarrow as pa
import torch

from moelab.config import MoelabError
from moelab.model.routers import top_k_stable
from moelab.trace.capture import CapturedLayer, RoutingRecorder
from moelab.trace.io import TraceWriter
from moelab.trace.schema import (
    LABEL_COLUMNS, TraceMeta, check_probs, field_type, numpy_dtype, parse_probs, probs_topn,
)
from moelab.trace.validate import fit_dtype

PROBS_COLUMNS = ("probs", "topn_experts", "topn_probs")
# Row groups encoded at once by a pipelined trace. Each encoder holds one row group (154 MB of Arrow data
# with full probabilities at OLMoE's shape). 2 beat 1 even on 2 cores (1.0-1.6x, median 1.35x in 7 runs).
# One encoder alone runs 28k (full probabilities) to 74k (none) tokens/s at OLMoE's shape on a 2.6 GHz
# core, so 4 of them would outrun a GPU forward of 86k (docs/PERFORMANCE.md, "The host side of tracing").
MIN_ENCODERS, MAX_ENCODERS = 2, 4


def probs_columns(mode: str) -> list[str]:
    """The optional columns a `--probs` mode writes."""
    return {"full": ["probs"], "none": []}.get(mode, ["topn_experts", "topn_probs"])


def keep_probs(captured: list[CapturedLayer], mode: str) -> list[CapturedLayer]:
    """Reduce each layer's scores to what the trace keeps, on the capture's device, so that only that crosses
    to the host: the chosen experts' probabilities always; all E as float16 (full), the N largest with their
    experts (top:N), or nothing more (none). The logits never cross."""
    n = probs_topn(mode)
    out = []
    for c in captured:
        if c.prob_TK is not None:  # reduced already
            out.append(c)
            continue
        r = c.routing
        # Ties go to the lower expert, the router's own rule: torch.topk orders them arbitrarily (a uniform
        # row came out as experts 44, 41, 42, ...), and float16/bf16 probabilities tie often.
        top_TN = top_k_stable(r.probs_TE, n) if n else None
        out.append(dataclasses.replace(
            c, routing=r._replace(probs_TE=r.probs_TE.half() if mode == "full" else None, logits_TE=None),
            prob_TK=r.probs_TE.gather(1, r.expert_ids_TK).float(),
            topn_ids_TN=None if top_TN is None else top_TN.short(),
            topn_probs_TN=None if top_TN is None else r.probs_TE.gather(1, top_TN).float()))
    return out


def _stored_dtype(name: str) -> np.dtype:
    """The numpy dtype a trace column is stored in (a label column: its int32 codes)."""
    return np.dtype(np.int32) if name in LABEL_COLUMNS else numpy_dtype(field_type(name))


def _stored(values: np.ndarray, name: str) -> np.ndarray:
    """Values in their stored dtype; an integer that does not fit is a one-line error, never wrapped."""
    return values.astype(np.int32) if name in LABEL_COLUMNS else fit_dtype(values, name, "trace batch")


def _per_layer_lists(mats: list[np.ndarray], valid_T: np.ndarray, K: int) -> Any:
    """Per-(token, layer) vectors -> the value TraceWriter takes for a list column (rank-0 rows only).

    Equal widths give a (rows, E) matrix; per-layer widths give a ListArray with nulls off rank 0."""
    widths = {m.shape[1] for m in mats}
    if len(widths) == 1:
        return np.stack(mats, axis=1)[valid_T].reshape(-1, mats[0].shape[1])
    L = len(mats)
    n_tok = int(valid_T.sum())
    lengths_TL = np.broadcast_to(np.array([m.shape[1] for m in mats]), (n_tok, L))
    values = np.concatenate([m[valid_T] for m in mats], axis=1)  # (tokens, sum E): layer blocks in order
    lengths_R = np.zeros((n_tok, L, K), np.int32)
    lengths_R[:, :, 0] = lengths_TL
    offsets = np.concatenate([[0], np.cumsum(lengths_R.reshape(-1))]).astype(np.int32)
    mask = np.ones((n_tok, L, K), bool)
    mask[:, :, 0] = False
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(np.ascontiguousarray(values.reshape(-1))),
                                    mask=pa.array(mask.reshape(-1)))


def batch_rows(batch: dict[str, torch.Tensor], captured: list[CapturedLayer], seq_offset: int,
               domains: list[str], langs: list[str], blocks: list[int], full_probs: bool = True, *,
               probs: str | None = None) -> dict[str, Any]:
    """One forward's captured routing -> trace columns (rows in (seq, pos, layer, rank) order).

    `probs` ("full", "none", "top:N"; `full_probs` is the older switch between the first two) applies to
    layers that `keep_probs` has not reduced yet."""
    if captured[0].prob_TK is None:
        captured = keep_probs(captured, probs or ("full" if full_probs else "none"))
    B, S = batch["input_ids"].shape
    L = len(captured)
    K = captured[0].routing.expert_ids_TK.shape[1]
    valid_T = (batch["doc"].reshape(-1) >= 0).numpy()
    every = bool(valid_T.all())  # the usual batch: no padding, so no row is selected out
    n_tok = len(valid_T) if every else int(valid_T.sum())

    # Columns are built in the types the file stores (schema.REQUIRED_FIELDS), so the writer converts
    # nothing: at a 7B model's forward speed the host side of tracing is the bound (docs/PERFORMANCE.md).
    def per_row(a_T, name):  # token-level column -> one value per (token, layer, rank) row
        a_T = np.asarray(a_T)
        return np.repeat(_stored(a_T if every else a_T[valid_T], name), L * K)

    def stack(get, name):  # (T, K) per layer -> rows
        out_TLK = np.empty((n_tok, L, K), _stored_dtype(name))
        for l, c in enumerate(captured):
            v_TK = get(c).cpu().numpy()
            out_TLK[:, l] = _stored(v_TK if every else v_TK[valid_T], name)
        return out_TLK.reshape(-1)

    def pattern(values, name):  # the same L * K values for every token
        return np.tile(_stored(np.asarray(values), name), n_tok)

    cols: dict[str, Any] = {
        "seq": per_row(seq_offset + np.repeat(np.arange(B), S), "seq"),
        "pos": per_row(np.tile(np.arange(S), B), "pos"),
        "doc_pos": per_row(batch["pos"].reshape(-1).numpy(), "doc_pos"),
        "token": per_row(batch["input_ids"].reshape(-1).numpy(), "token"),
        "doc": per_row(batch["doc"].reshape(-1).numpy(), "doc"),
        "domain": per_row(batch["domain_id"].reshape(-1).numpy(), "domain"), "domain.names": domains,
        "lang": per_row(batch["lang_id"].reshape(-1).numpy(), "lang"), "lang.names": langs,
        "turn": per_row(batch["turn"].reshape(-1).numpy(), "turn"),
        "layer": pattern(np.repeat(np.arange(L), K), "layer"),
        "block": pattern(np.repeat(np.array(blocks), K), "block"),
        "rank": pattern(np.tile(np.arange(K), L), "rank"),
        "expert": stack(lambda c: c.routing.expert_ids_TK, "expert"),
        "weight": stack(lambda c: c.routing.weights_TK.float(), "weight"),
        "prob": stack(lambda c: c.prob_TK, "prob"),
        "dropped": stack(lambda c: c.routing.dropped_TK, "dropped"),
    }
    if captured[0].routing.probs_TE is not None:  # float16 already: stored as is (schema.PROBS_TYPE)
        cols["probs"] = _per_layer_lists([c.routing.probs_TE.cpu().numpy() for c in captured], valid_T, K)
    if captured[0].topn_ids_TN is not None:
        cols["topn_experts"] = _per_layer_lists([c.topn_ids_TN.cpu().numpy() for c in captured], valid_T, K)
        cols["topn_probs"] = _per_layer_lists([c.topn_probs_TN.cpu().numpy() for c in captured], valid_T, K)
    if captured[0].expert_norms_TE is not None:
        for name, attr in (("expert_norms", "expert_norms_TE"), ("expert_cos", "expert_cos_TP"),
                           ("expert_density", "expert_density_TE")):
            cols[name] = _per_layer_lists([getattr(c, attr).float().cpu().numpy() for c in captured], valid_T, K)
    return cols


def trace_meta(model, capacity_factor, step, tokenizer: str | None, source: str,
               domains: list[str], langs: list[str]) -> TraceMeta:
    cfg = model.config
    m = cfg.moe
    if tokenizer and Path(tokenizer).exists():  # absolute: a report built from another folder finds it too
        tokenizer = str(Path(tokenizer).resolve())
    return TraceMeta(
        num_experts=cfg.experts_per_layer(), top_k=m.top_k, model_config=cfg.to_dict(),
        capacity_factor=capacity_factor,
        capacity_formula=m.capacity_formula if capacity_factor is not None else None,
        group_size=m.group_size if capacity_factor is not None else None,
        drop_policy=m.drop_policy if capacity_factor is not None else None,
        checkpoint_step=step, tokenizer=tokenizer, source=source,
        labels={"domain": list(domains), "lang": list(langs)},
        extra={"min_capacity": m.min_capacity, "moe_blocks": cfg.moe_layer_ids()})


def _clip_to(batch: dict[str, torch.Tensor], remaining: int) -> dict[str, torch.Tensor]:
    """Mark real tokens past `remaining` as padding so they produce no rows (the forward still sees them,
    so capacity is computed over the same batch as without the cut)."""
    doc = batch["doc"]
    valid = (doc >= 0).reshape(-1)
    if int(valid.sum()) <= remaining:
        return batch
    keep = valid & (torch.cumsum(valid.long(), 0) <= remaining)
    return {**batch, "doc": torch.where(keep.view_as(doc), doc, torch.full_like(doc, -1))}


def _host_copy(captured: list[CapturedLayer]) -> tuple[list[CapturedLayer], list]:
    """Start every captured tensor's copy into pinned host memory without waiting; returns the host copies
    and one CUDA event per source device marking the end of its copies (none off CUDA, where the tensors
    already are on the host or the copy is synchronous). A copy runs on its source device's stream, so an
    event recorded on the current device's alone would not wait for a model on cuda:1 or spread over
    several GPUs (device_map). The forward of the next batch is queued behind the copies, not a sync."""
    streams: dict = {}

    def host(t):
        if not isinstance(t, torch.Tensor) or t.device.type == "cpu":
            return t
        if t.device.type != "cuda":
            return t.cpu()
        buf = _pinned_like(t)
        buf.copy_(t, non_blocking=True)
        streams.setdefault(t.device, torch.cuda.current_stream(t.device))
        return buf

    out = [dataclasses.replace(c, routing=c.routing._replace(**{k: host(v) for k, v in c.routing._asdict().items()}),
                               **{f.name: host(getattr(c, f.name)) for f in dataclasses.fields(c) if f.name != "routing"})
           for c in captured]
    events = []
    for stream in streams.values():  # one sync per device and batch, waited on by the writer thread
        events.append(torch.cuda.Event())
        events[-1].record(stream)
    return out, events


def _pinned_like(t: torch.Tensor) -> torch.Tensor:
    return torch.empty(t.shape, dtype=t.dtype, pin_memory=True)


def write_trace(batches: Iterable[dict[str, torch.Tensor]], out_path: str | Path, meta: TraceMeta,
                capture: Callable[[dict[str, torch.Tensor]], list[CapturedLayer]], *, optional: list[str],
                blocks: list[int], max_tokens: int, full_probs: bool = True, probs: str | None = None,
                progress=None, overlap: bool = True, encoders: int | None = None) -> dict[str, int]:
    """The loop every trace writer shares: clip to `max_tokens`, capture one batch's routing, write its rows.

    `probs`: "full", "none" or "top:N" (`full_probs` is the older switch between the first two); its
    columns join `optional`, and the sidecar records it (TraceMeta.probs_mode).
    `overlap`: a pipeline of three threads: batch n+2 runs forward while the rows of batch n+1 are built
    and those of batch n are encoded into Parquet (`TraceWriter(background=True)`): one batch in the first
    two stages and up to `encoders` row groups in the third, so memory stays bounded. The file is the one
    the synchronous loop writes, byte for byte.
    `encoders`: row groups encoded at once (`TraceWriter(encoders=)`); None takes the cores left beside the
    forward and the rows, from `MIN_ENCODERS` to `MAX_ENCODERS`."""
    mode = check_probs(parse_probs(probs or ("full" if full_probs else "none")), meta.num_experts, meta.top_k)
    meta.probs_mode = mode
    optional = [c for c in optional if c not in PROBS_COLUMNS] + probs_columns(mode)
    domains, langs = meta.labels["domain"], meta.labels["lang"]
    seen = seqs = 0

    def write_one(batch, captured, events, offset):
        for event in events:
            event.synchronize()
        writer.write(batch_rows(batch, captured, offset, domains, langs, blocks, probs=mode))

    if encoders is None:
        encoders = default_encoders() if overlap else 1
    with TraceWriter(out_path, meta, optional=optional, background=overlap, encoders=encoders) as writer, \
            ThreadPoolExecutor(1) as pool:
        pending = None
        for batch in batches:
            batch = _clip_to(batch, max_tokens - seen)
            captured, events = _host_copy(keep_probs(capture(batch), mode))
            if pending is not None:
                pending.result()  # also re-raises the worker's error here
            if overlap:
                pending = pool.submit(write_one, batch, captured, events, seqs)
            else:
                write_one(batch, captured, events, seqs)
            seqs += batch["input_ids"].shape[0]
            seen += int((batch["doc"] >= 0).sum())
            if progress:
                progress.update(min(seen, max_tokens), seen)
            if seen >= max_tokens:
                break
        if pending is not None:
            pending.result()
        if seen == 0:
            raise MoelabError("no tokens to trace: the data gave no batches")
    return {"tokens": seen, "sequences": seqs, "rows": writer.num_rows}


def default_encoders() -> int:
    """Row groups encoded at once when a trace is pipelined: the cores left beside the forward and the rows."""
    from moelab.analysis.parallel import available_cores  # analysis imports trace: not at module level

    return min(MAX_ENCODERS, max(MIN_ENCODERS, available_cores() - 2))


@torch.no_grad()
def trace_batches(model, batches: Iterable[dict[str, torch.Tensor]], out_path: str | Path, meta: TraceMeta,
                  *, max_tokens: int, capacity_factor: float | None, all_experts: bool = False,
                  full_probs: bool = True, probs: str | None = None, progress=None,
                  overlap: bool = True) -> dict[str, int]:
    """Run a moelab model over batches with a RoutingRecorder and write every real token's routing."""
    model.eval()
    device = next(model.parameters()).device
    optional = ["expert_norms", "expert_cos", "expert_density"] if all_experts else []

    with RoutingRecorder(model, all_experts=all_experts) as rec:
        def capture(batch):
            model(batch["input_ids"].to(device), capacity_factor=capacity_factor)
            return rec.pop()

        return write_trace(batches, out_path, meta, capture, optional=optional,
                           blocks=model.config.moe_layer_ids(), max_tokens=max_tokens,
                           full_probs=full_probs, probs=probs, progress=progress, overlap=overlap)
