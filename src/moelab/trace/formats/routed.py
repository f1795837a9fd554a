"""Other tools' routing records -> a moelab trace: the part every importer shares.

An importer yields `Routed` sequences: logical expert ids (T, L, K) with -1 for "none", and the token ids
when its format carries them. This module turns them into trace rows in (seq, pos, layer, rank) order and
writes them with TraceWriter. Nothing is guessed: a format without probabilities or combine weights gets
null `prob` / `weight` columns (TraceMeta.null_columns says why), and token ids come from the file, from a
moelab corpus given alongside, or are null.

Legend: T tokens of a sequence, L layers of the source array, K experts per token, E experts.
-1 conventions: a token whose every slot is -1 was not routed (padding, a prefix-cache hit) and gets no
rows; a layer whose every slot is -1 in the whole file is not an MoE layer (a dense layer of a replay
array that spans all layers) and is left out, its index kept in `block`; anything else with -1 in part of
a token's slots is refused, since a trace holds exactly K distinct experts per (token, layer).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from moelab.config import MoelabError
from moelab.trace.formats.values import MAX_EXPERTS, MAX_LAYER, MAX_TOKEN, MAX_TOP_K, check_count
from moelab.trace.io import TraceWriter
from moelab.trace.schema import TraceMeta


@dataclasses.dataclass
class Routed:
    ids_TLK: np.ndarray           # int, -1 = none
    tokens_T: np.ndarray | None   # token ids of the routed positions, or None
    where: str                    # "file.jsonl line 3", for messages
    blocks_L: np.ndarray | None = None  # transformer block of each source layer, when the format says


@dataclasses.dataclass
class Scan:
    """What a first pass over the source found: K, the source layers that route, the largest ids."""

    top_k: int = 0
    num_layers: int = 0
    routed_layers: np.ndarray | None = None  # bool (L,)
    max_expert_L: np.ndarray | None = None   # int (L,)
    has_tokens: bool = True
    sequences: int = 0
    blocks_L: np.ndarray | None = None


def scan(source: Callable[[], Iterator[Routed]]) -> Scan:
    s = Scan()
    for r in source():
        T, L, K = r.ids_TLK.shape
        if not 1 <= K <= MAX_TOP_K or not L:
            raise MoelabError(f"{r.where}: routing of shape (tokens, {L}, {K}): a trace needs at least one layer "
                              f"and top_k in 1..{MAX_TOP_K}")
        if s.sequences and (L, K) != (s.num_layers, s.top_k):
            raise MoelabError(f"{r.where}: routing of shape (tokens, {L}, {K}) after (tokens, {s.num_layers}, "
                              f"{s.top_k}): layers and top_k must not change within a file")
        if not s.sequences:
            s.num_layers, s.top_k, s.blocks_L = L, K, r.blocks_L
            s.routed_layers, s.max_expert_L = np.zeros(L, bool), np.full(L, -1, np.int64)
        s.sequences += 1
        s.has_tokens &= r.tokens_T is not None
        if T and r.ids_TLK.min() < -1:
            raise MoelabError(f"{r.where}: expert id {int(r.ids_TLK.min())}; ids are >= 0, or -1 for none")
        if T and r.ids_TLK.max() >= MAX_EXPERTS:
            raise MoelabError(f"{r.where}: expert id {int(r.ids_TLK.max())}; a trace holds ids up to {MAX_EXPERTS - 1}")
        _check_ints(r.tokens_T, f"{r.where}: token id", 0, MAX_TOKEN)
        _check_ints(r.blocks_L, f"{r.where}: layer block", 0, MAX_LAYER)
        if T:
            s.routed_layers |= (r.ids_TLK >= 0).any(axis=(0, 2))
            s.max_expert_L = np.maximum(s.max_expert_L, r.ids_TLK.max(axis=(0, 2)))
    if not s.sequences or s.routed_layers is None or not s.routed_layers.any():
        raise MoelabError("the source holds no routed tokens")
    return s


def _check_ints(values: np.ndarray | None, what: str, lo: int, hi: int) -> None:
    if values is None or not np.size(values):
        return
    values = np.asarray(values)
    if values.dtype.kind not in "iu":
        raise MoelabError(f"{what}s have dtype {values.dtype}, expected integers")
    if values.min() < lo or values.max() > hi:
        raise MoelabError(f"{what} {int(values.min() if values.min() < lo else values.max())} is outside {lo}..{hi}")


def resolve_experts(s: Scan, num_experts: int | None) -> tuple[list[int], list[str]]:
    """E per kept layer: given (checked against the ids), or inferred as the largest id + 1, with a note."""
    kept = s.max_expert_L[s.routed_layers]
    check_count(num_experts, "--num-experts", 1, MAX_EXPERTS)
    if num_experts is not None:
        if num_experts < s.top_k or kept.max() >= num_experts:
            raise MoelabError(f"--num-experts {num_experts} does not hold the source's expert {int(kept.max())} "
                              f"with top_k={s.top_k}")
        return [num_experts] * len(kept), []
    E = [int(e) + 1 for e in kept]
    if min(E) < s.top_k:
        raise MoelabError(f"the source's largest expert id {min(E) - 1} is below top_k={s.top_k}: give --num-experts")
    return E, [f"num_experts={E} inferred from the data (largest expert id + 1 per layer; an expert no token "
               f"chose is missed): give --num-experts to be exact"]


def rows_for(r: Routed, seq: int, layers: np.ndarray, token_T: np.ndarray | None,
             blocks: np.ndarray | None = None) -> dict | None:
    """One sequence -> trace columns for its routed tokens (None when it has none)."""
    ids_TLK = r.ids_TLK[:, layers, :]
    T, L, K = ids_TLK.shape
    valid_TL = ids_TLK >= 0
    tok_valid_T = valid_TL.any(axis=(1, 2))
    partial = tok_valid_T & ~valid_TL.all(axis=(1, 2))
    if partial.any():
        t = int(np.argmax(partial))
        raise MoelabError(f"{r.where}: token {t} has -1 in some of its expert slots: a trace holds exactly "
                          f"top_k={K} experts per (token, layer)")
    sorted_TLK = np.sort(ids_TLK, axis=2)
    dup_T = (sorted_TLK[:, :, 1:] == sorted_TLK[:, :, :-1]).any(axis=(1, 2)) & tok_valid_T
    if dup_T.any():
        raise MoelabError(f"{r.where}: token {int(np.argmax(dup_T))} has the same expert twice in one layer")
    pos_T = np.flatnonzero(tok_valid_T)
    if not len(pos_T):
        return None
    n = len(pos_T)
    rep = L * K
    cols = {
        "seq": np.full(n * rep, seq, np.int64),
        "pos": np.repeat(pos_T, rep).astype(np.int32),
        "layer": np.tile(np.repeat(np.arange(L), K), n).astype(np.int16),
        "block": np.tile(np.repeat(layers if blocks is None else blocks[layers], K), n).astype(np.int16),
        "rank": np.tile(np.arange(K), n * L).astype(np.int8),
        "expert": ids_TLK[pos_T].reshape(-1),
        "weight": None, "prob": None,
        "token": None if token_T is None else np.repeat(np.asarray(token_T)[pos_T], rep),
    }
    return cols


class CorpusTokens:
    """Token ids (and their document labels) taken in order from a moelab corpus split: the stream
    `moelab trace` reads, every document followed by its EOS, one sequence after another."""

    def __init__(self, path: str | Path, split: str):
        from moelab.data.shards import load_corpus

        self.corpus = load_corpus(path)
        docs = self.corpus.doc_ids(split)
        if not len(docs):
            raise MoelabError(f"corpus {path} has no documents in split {split!r}")
        self.starts = self.corpus.doc_start[docs]
        spans = self.corpus.doc_length[docs] + 1
        self.offsets = np.cumsum(spans) - spans
        self.total = int(spans.sum())
        self.next = 0

    def take(self, n: int) -> dict[str, np.ndarray]:
        if self.next + n > self.total:
            raise MoelabError(f"corpus {self.corpus.path} has {self.total:,} tokens in the split, fewer than "
                              f"the source routed ({self.next + n:,} so far)")
        virtual = np.arange(self.next, self.next + n)
        self.next += n
        k = np.searchsorted(self.offsets, virtual, side="right") - 1
        return self.corpus.gather(self.starts[k] + (virtual - self.offsets[k]))


def write_routed(out: str | Path, source: Callable[[], Iterator[Routed]], *, fmt: str, name: str, what_lacks: str,
                 num_experts: int | None = None, corpus: str | Path | None = None,
                 split: str = "heldout", notes: Callable[[], list[str]] | None = None,
                 rank_order: str = "logits") -> dict:
    """Two passes over `source`: the first sizes the trace (layers, K, E), the second writes the rows.

    `notes` is called after the first pass, so a reader can report what it skipped. `rank_order` goes to
    the metadata's extra: "logits" (rank r is the router's r-th highest score) or "unknown" (the source
    lists a token's experts in another order, so rank 0 is not the top-1 choice)."""
    s = scan(source)
    layers = np.flatnonzero(s.routed_layers)
    E, inferred = resolve_experts(s, num_experts)
    notes = (notes() if notes else []) + inferred
    if len(layers) < s.num_layers:
        notes.append(f"source layers {np.flatnonzero(~s.routed_layers).tolist()} route no token (all -1) and "
                     f"are left out; `block` keeps each MoE layer's source index")
    null = {"prob": f"{name} records no router probabilities", "weight": f"{name} records no combine weights"}
    if not s.has_tokens and corpus is None:
        null["token"] = f"{name} {what_lacks}and no --corpus was given"
    tokens = CorpusTokens(corpus, split) if corpus is not None and not s.has_tokens else None
    if corpus is not None and s.has_tokens:
        notes.append(f"token ids come from the file; --corpus {corpus} was not used")
    labels = {"domain": tokens.corpus.domains, "lang": tokens.corpus.langs} if tokens else {}
    meta = TraceMeta(num_experts=E, top_k=s.top_k, source=f"import:{fmt}", null_columns=null, notes=notes,
                     labels=labels, tokenizer=str(Path(corpus) / "tokenizer.json") if tokens else None,
                     extra={"rank_order": rank_order})
    if rank_order == "unknown":
        notes.append(f"{name} does not keep the router's ranking (rank 0 is not the top-1 choice): rank-dependent "
                     f"analyses (top-1 agreement, top-1 transitions, top-1 label MI, queue order) refuse this trace")
    n_tokens = 0
    with TraceWriter(out, meta) as w:
        for seq, r in enumerate(source()):
            extra = tokens.take(len(r.ids_TLK)) if tokens is not None else None
            token_T = extra["input_ids"] if extra else (r.tokens_T if s.has_tokens else None)
            cols = rows_for(r, seq, layers, token_T, s.blocks_L)
            if cols is None:
                continue
            if extra is not None:
                _add_labels(cols, extra, tokens, len(layers) * s.top_k)
            n_tokens += len(cols["seq"]) // (len(layers) * s.top_k)
            w.write(cols)
    return {"tokens": n_tokens, "rows": w.num_rows, "sequences": s.sequences, "notes": notes, "meta": meta}


def _add_labels(cols: dict, extra: dict, tokens: CorpusTokens, rep: int) -> None:
    """A corpus also knows each token's document, position in it, domain and language."""
    at_T = cols["pos"][::rep]  # each routed token's position, once
    cols["doc"] = np.repeat(extra["doc"][at_T], rep)
    cols["doc_pos"] = np.repeat(extra["pos"][at_T], rep)
    cols["turn"] = np.repeat(extra["turn"][at_T], rep)
    cols["domain"], cols["domain.names"] = np.repeat(extra["domain_id"][at_T], rep), tokens.corpus.domains
    cols["lang"], cols["lang.names"] = np.repeat(extra["lang_id"][at_T], rep), tokens.corpus.langs


def _json_kind(value) -> str:
    return {list: "array", str: "string", bool: "boolean", type(None): "null"}.get(type(value), "number")


def jsonl_records(path: Path, required: Sequence[str], what: str) -> Iterator[tuple[str, dict]]:
    """(where, record) for each non-blank line of a JSONL file: one line naming the file and line when a
    line is not JSON or not an object holding every `required` key (`what` says what such a record is)."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path} line {n}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise MoelabError(f"{where} is not valid JSON: {e.msg}") from None
            except RecursionError:
                raise MoelabError(f"{where} nests arrays or objects too deeply to be {what}") from None
            if not isinstance(rec, dict):
                raise MoelabError(f"{where} is not {what}: it holds a JSON {_json_kind(rec)}, not an object "
                                  f"with the key(s) {', '.join(required)}")
            missing = [k for k in required if k not in rec]
            if missing:
                raise MoelabError(f"{where} is not {what}: it lacks the key(s) {', '.join(missing)} (it has: "
                                  f"{', '.join(map(str, list(rec)[:8])) or 'no keys'})")
            yield where, rec
