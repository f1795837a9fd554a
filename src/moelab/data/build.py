"""build_corpus: sources -> (trained) tokenizer -> token array, document index and summary.

The build happens in a hidden sibling folder that is renamed to `out_dir` only when complete, so an
interrupted build never leaves a folder that looks like a corpus. Documents are first staged to a
JSON-lines file, so sources that are slow to read (man pages) are read once although the text is
used twice (tokenizer training, then tokenization).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

import moelab
from moelab.config import MoelabError
from moelab.data import shards
from moelab.data.sources import capped, open_source
from moelab.data.tokenizer import Tokenizer, load_tokenizer, train_tokenizer

Progress = Callable[[str, int, int], None]  # (stage, documents so far, bytes so far)
ENCODE_BATCH = 256


def build_corpus(out_dir: str | Path, source_specs: list[str], tokenizer: Tokenizer | str | Path | None = None,
                 *, vocab_size: int = 4096, tokenizer_kind: str = "bpe", seed: int = 0,
                 heldout_fraction: float = 0.05, max_bytes_per_source: int | None = None,
                 max_docs_per_source: int | None = None, progress: Progress | None = None) -> shards.Corpus:
    """Read `source_specs`, tokenize (training a `vocab_size` tokenizer when none is given), write."""
    out = Path(out_dir).expanduser()
    _check_arguments(out, source_specs, heldout_fraction, max_bytes_per_source, max_docs_per_source)
    if isinstance(tokenizer, (str, Path)):
        tokenizer = load_tokenizer(tokenizer)
    sources = [(spec, open_source(spec, seed=seed)) for spec in source_specs]  # fails fast on bad specs
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        stats, has_turns = _stage(sources, tmp / "staging.jsonl", max_bytes_per_source,
                                  max_docs_per_source, progress)
        if tokenizer is None:
            tokenizer = train_tokenizer(_staged_texts(tmp / "staging.jsonl"), vocab_size, tokenizer_kind,
                                        out_path=tmp / "tokenizer.json")
            tokenizer.source = f"trained by build_corpus ({tokenizer_kind}, vocab_size={vocab_size})"
            tok_file = "tokenizer.json"
        else:
            tok_file = "tokenizer" if tokenizer.is_hf else "tokenizer.json"
            tokenizer.save(tmp / tok_file)
        columns = _write_arrays(tmp, tokenizer, has_turns, heldout_fraction, seed, progress)
        info = _summary(columns, has_turns, stats, str(shards.token_dtype(tokenizer.vocab_size)))
        info["tokenizer"] = _tokenizer_info(tokenizer, tok_file)
        info["build"] = {"seed": seed, "heldout_fraction": heldout_fraction, "vocab_size": vocab_size,
                         "max_bytes_per_source": max_bytes_per_source, "max_docs_per_source": max_docs_per_source,
                         "moelab_version": moelab.__version__}
        (tmp / "staging.jsonl").unlink()
        shards.write_summary(tmp, info)
        if out.exists():  # an empty folder, checked above
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return shards.load_corpus(out)


def _check_arguments(out: Path, specs, heldout_fraction, max_bytes, max_docs) -> None:
    if isinstance(specs, str) or not specs:
        raise MoelabError("build_corpus needs a list of at least one source spec")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MoelabError(f"output folder {out} already exists and is not empty; remove it or choose another")
    if not 0.0 <= heldout_fraction < 1.0:
        raise MoelabError(f"heldout_fraction={heldout_fraction} must be in [0, 1)")
    for name, cap in (("max_bytes_per_source", max_bytes), ("max_docs_per_source", max_docs)):
        if cap is not None and cap <= 0:
            raise MoelabError(f"{name}={cap} must be positive")


# ---- pass 1: read the sources into a staging file --------------------------------------------
def _stage(sources, path: Path, max_bytes, max_docs, progress) -> tuple[list[dict], bool]:
    """Write every document to `path`; returns per-source counts and whether any has turns."""
    stats = []
    total_docs = total_bytes = 0
    has_turns = False
    with open(path, "w", encoding="utf-8") as f:
        for spec, docs in sources:
            n = nbytes = 0
            for doc in capped(docs, max_bytes=max_bytes, max_docs=max_docs):
                if not doc.text.strip():
                    continue
                record = {"text": doc.text, "domain": doc.domain, "lang": doc.lang, "turns": doc.turns,
                          "name": doc.name, "source": spec, "group": doc.group}
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
                n, nbytes = n + 1, nbytes + doc.num_bytes
                has_turns = has_turns or doc.turns is not None
                if progress:
                    progress("read", total_docs + n, total_bytes + nbytes)
            stats.append({"spec": spec, "documents": n, "bytes": nbytes})
            total_docs, total_bytes = total_docs + n, total_bytes + nbytes
    if total_docs == 0:
        raise MoelabError(f"the sources yielded no documents: {', '.join(s for s, _ in sources)}")
    return stats, has_turns


def _staged_records(path: Path) -> Iterator[dict]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)


def _staged_texts(path: Path) -> Iterator[str]:
    return (rec["text"] for rec in _staged_records(path))


# ---- pass 2: tokenize, split, lay out ---------------------------------------------------------
def _write_arrays(folder: Path, tok: Tokenizer, has_turns: bool, heldout_fraction: float, seed: int,
                  progress) -> dict[str, list | np.ndarray]:
    """Write tokens.npy, turns.npy and docs.parquet; returns the document index's columns."""
    dtype = shards.token_dtype(tok.vocab_size)
    writer = shards.StagingWriter(folder, dtype, has_turns)
    kept = []  # per document, without its text: only the index columns stay in memory
    for rec, ids, turns in _tokenized(folder / "staging.jsonl", tok, progress):
        if len(ids):  # a document whose text encodes to nothing has no place in the array
            writer.add(ids, turns)
            kept.append({"domain": rec["domain"], "lang": rec["lang"], "name": rec["name"],
                         "source": rec["source"], "num_bytes": len(rec["text"].encode("utf-8")),
                         "u": _unit_hash(rec.get("group") or rec["text"], seed), "group": rec.get("group") or ""})
    domains = sorted({r["domain"] for r in kept})
    domain_ids = np.array([domains.index(r["domain"]) for r in kept])
    held = assign_heldout(np.array([r["u"] for r in kept]), domain_ids, heldout_fraction)
    held = _whole_groups(held, [r["group"] for r in kept])
    order = np.concatenate([np.flatnonzero(~held), np.flatnonzero(held)])
    starts = writer.write_tokens(order, tok.eos_id)
    rows = [kept[i] for i in order]
    columns = {
        "doc": np.arange(len(order), dtype=np.int64), "start": starts,
        "length": np.asarray(writer.lengths, np.int64)[order],
        "num_bytes": np.array([r["num_bytes"] for r in rows], np.int64),
        "domain": [r["domain"] for r in rows], "lang": [r["lang"] for r in rows],
        "split": ["heldout" if held[i] else "train" for i in order],
        "source": [r["source"] for r in rows], "name": [r["name"] for r in rows],
    }
    shards.write_docs_index(folder, columns)
    return columns


def _tokenized(path: Path, tok: Tokenizer, progress) -> Iterator[tuple[dict, np.ndarray, np.ndarray | None]]:
    """(record, token ids, turn index per token or None), in staging order."""
    batch: list[dict] = []
    done = nbytes = 0
    for rec in _staged_records(path):
        batch.append(rec)
        if len(batch) == ENCODE_BATCH:
            yield from _encode(batch, tok)
            done += len(batch)
            nbytes += sum(len(r["text"].encode("utf-8")) for r in batch)
            if progress:
                progress("tokenize", done, nbytes)
            batch = []
    yield from _encode(batch, tok)


def _encode(batch: list[dict], tok: Tokenizer):
    plain = [r for r in batch if not r["turns"]]
    encoded = iter(tok.encode_batch([r["text"] for r in plain]))
    for rec in batch:
        if not rec["turns"]:
            yield rec, np.asarray(next(encoded), np.int64), None
            continue
        # Each turn is encoded on its own so every token belongs to exactly one turn; the newline
        # that joins turns in `text` goes with the earlier turn, so the ids decode back to `text`.
        turns = rec["turns"]
        pieces = tok.encode_batch([t + "\n" for t in turns[:-1]] + [turns[-1]])
        ids = np.concatenate([np.asarray(p, np.int64) for p in pieces])
        turn_ids = np.concatenate([np.full(len(p), i, np.int16) for i, p in enumerate(pieces)])
        yield rec, ids, turn_ids


def _unit_hash(text: str, seed: int) -> float:
    """A number in [0, 1) fixed by (text, seed): equal texts always land in the same split (and the
    documents of one group, hashed by their group's name, land together)."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8, key=str(seed).encode()).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def assign_heldout(u: np.ndarray, domain_ids: np.ndarray, fraction: float) -> np.ndarray:
    """Hold out documents with u < fraction; a domain of >= 2 documents keeps at least one document
    in each split (its lowest-u document held out, its highest-u one kept for training), and a
    domain of one document trains on it (a domain never seen in training cannot be evaluated)."""
    held = u < fraction
    if fraction <= 0:
        return held
    for d in np.unique(domain_ids):
        idx = np.flatnonzero(domain_ids == d)
        if len(idx) < 2:
            held[idx] = False
            continue
        if not held[idx].any():
            held[idx[np.argmin(u[idx])]] = True
        if held[idx].all():
            held[idx[np.argmax(u[idx])]] = False
    return held


def _whole_groups(held: np.ndarray, groups: list[str]) -> np.ndarray:
    """A group is held out when any of its documents is: members share their hash, so they differ only
    where assign_heldout moved one document to give a domain a held-out document."""
    named = {g for g, h in zip(groups, held) if g and h}
    return held | np.array([g in named for g in groups], dtype=bool)


# ---- summary ---------------------------------------------------------------------------------
def _summary(columns: dict, has_turns: bool, stats, dtype: str) -> dict:
    """Counts per domain, language and split. A document's tokens include its EOS, so the per-split
    token counts equal the lengths of the split ranges and every grouping sums to num_tokens."""
    tokens = columns["length"] + 1
    domains, langs = sorted(set(columns["domain"])), sorted(set(columns["lang"]))

    def group(key: str, names) -> dict:
        values = np.array(columns[key])
        return {n: {"documents": int((values == n).sum()), "bytes": int(columns["num_bytes"][values == n].sum()),
                    "tokens": int(tokens[values == n].sum())} for n in names}
    splits = group("split", shards.SPLITS)
    n_train = splits["train"]["tokens"]
    splits["train"].update(start=0, end=n_train)
    splits["heldout"].update(start=n_train, end=int(tokens.sum()))
    return {
        "format": shards.FORMAT, "version": shards.VERSION, "dtype": dtype,
        "num_documents": len(tokens), "num_bytes": int(columns["num_bytes"].sum()),
        "num_tokens": int(tokens.sum()), "has_turns": has_turns, "domains": domains, "langs": langs,
        "splits": splits, "per_domain": group("domain", domains), "per_lang": group("lang", langs),
        "sources": stats,
    }


def _tokenizer_info(tok: Tokenizer, file: str) -> dict:
    return {"kind": tok.kind, "file": file, "source": tok.source, "vocab_size": tok.vocab_size,
            "fingerprint": tok.fingerprint(), "pad_id": tok.pad_id, "eos_id": tok.eos_id, "bos_id": tok.bos_id,
            "sentinel_ids": list(tok.sentinel_ids), "mode_ids": tok.mode_ids}
