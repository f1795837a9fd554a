"""The on-disk corpus: one flat memory-mapped token array, a document index and a JSON summary.

A corpus folder holds
  tokens.npy     uint16 (vocab <= 65535) or uint32: every document followed by one EOS; the train
                 documents first, then the held-out ones, so each split is one contiguous range
  turns.npy      int16, the turn index of each token (-1 outside conversations and on EOS); only
                 written when some document is a conversation
  docs.parquet   one row per document in array order: doc, start, length (tokens, without the EOS),
                 num_bytes, domain, lang, split, source, name
  corpus.json    the summary (written last: a folder without it is incomplete)
  tokenizer.json the tokenizer (or a `tokenizer/` folder for a transformers tokenizer)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from moelab.config import MoelabError

FORMAT = "moelab-corpus"
VERSION = 1
SPLITS = ("train", "heldout")
TOKENS, TURNS, DOCS, SUMMARY = "tokens.npy", "turns.npy", "docs.parquet", "corpus.json"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 65535 else np.uint32)


# ---- writing ---------------------------------------------------------------------------------
class StagingWriter:
    """Appends documents' tokens (and turn ids) to raw files in reading order.

    The split of a document is only known once every document of its domain has been seen, so the
    final layout (train first, then held-out) is copied from these files by `write_tokens`.
    """

    def __init__(self, folder: Path, dtype: np.dtype, with_turns: bool):
        self.folder, self.dtype = folder, dtype
        self._tokens = open(folder / "staging.tokens", "wb")
        self._turns = open(folder / "staging.turns", "wb") if with_turns else None
        self.offsets: list[int] = []
        self.lengths: list[int] = []
        self._end = 0

    def add(self, ids: np.ndarray, turns: np.ndarray | None) -> None:
        self._tokens.write(np.asarray(ids, dtype=self.dtype).tobytes())
        if self._turns is not None:
            turns = np.full(len(ids), -1, np.int16) if turns is None else turns
            self._turns.write(np.asarray(turns, dtype=np.int16).tobytes())
        self.offsets.append(self._end)
        self.lengths.append(len(ids))
        self._end += len(ids)

    def close(self) -> None:
        self._tokens.close()
        if self._turns is not None:
            self._turns.close()

    def write_tokens(self, order: np.ndarray, eos_id: int) -> np.ndarray:
        """Write tokens.npy (and turns.npy) with documents in `order`; returns their start offsets."""
        self.close()
        lengths = np.asarray(self.lengths, np.int64)[order]
        starts = np.concatenate([[0], np.cumsum(lengths + 1)[:-1]]).astype(np.int64)
        total = int(lengths.sum()) + len(order)
        _copy_layout(self.folder / "staging.tokens", self.folder / TOKENS, self.dtype, order,
                     self.offsets, starts, lengths, total, fill=eos_id)
        if self._turns is not None:
            _copy_layout(self.folder / "staging.turns", self.folder / TURNS, np.dtype(np.int16), order,
                         self.offsets, starts, lengths, total, fill=-1)
        for name in ("staging.tokens", "staging.turns"):
            (self.folder / name).unlink(missing_ok=True)
        return starts


def _copy_layout(src: Path, dst: Path, dtype, order, offsets, starts, lengths, total, fill) -> None:
    raw = np.memmap(src, dtype=dtype, mode="r") if src.stat().st_size else np.zeros(0, dtype)
    out = np.lib.format.open_memmap(dst, mode="w+", dtype=dtype, shape=(total,))
    out[:] = fill  # the slot after each document stays EOS (tokens) or -1 (turns)
    for i, doc in enumerate(order):
        off, n, start = offsets[doc], lengths[i], starts[i]
        out[start:start + n] = raw[off:off + n]
    out.flush()
    del out


def write_docs_index(folder: Path, columns: dict[str, list | np.ndarray]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), folder / DOCS)


def write_summary(folder: Path, info: dict) -> None:
    (folder / SUMMARY).write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# ---- reading ---------------------------------------------------------------------------------
class Corpus:
    """A built corpus, memory-mapped. Per-document arrays are indexed by doc id (array order)."""

    def __init__(self, path: Path, info: dict, tokens: np.ndarray, turns: np.ndarray | None, docs):
        self.path, self.info, self.tokens, self.turns = path, info, tokens, turns
        self.docs = docs  # the pyarrow Table of docs.parquet, for people and analyses
        self.domains: list[str] = list(info["domains"])
        self.langs: list[str] = list(info["langs"])
        self.doc_start = docs.column("start").to_numpy().astype(np.int64)
        self.doc_length = docs.column("length").to_numpy().astype(np.int64)
        self.doc_domain = _codes(docs.column("domain").to_pylist(), self.domains)
        self.doc_lang = _codes(docs.column("lang").to_pylist(), self.langs)
        self.doc_split = _codes(docs.column("split").to_pylist(), list(SPLITS))
        tok = info["tokenizer"]
        self.vocab_size: int = tok["vocab_size"]
        self.eos_id: int = tok["eos_id"]
        self.pad_id: int = tok["pad_id"]
        self.sentinel_ids: tuple[int, ...] = tuple(tok["sentinel_ids"])
        self.mode_ids: dict[str, int] = dict(tok["mode_ids"])

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    @property
    def num_docs(self) -> int:
        return len(self.doc_start)

    def split_range(self, split: str) -> tuple[int, int]:
        """[start, end) of the split's tokens in `tokens`."""
        if split not in SPLITS:
            raise MoelabError(f"unknown split {split!r} (known: {', '.join(SPLITS)})")
        s = self.info["splits"][split]
        return s["start"], s["end"]

    def doc_ids(self, split: str | None = None, domain: str | None = None) -> np.ndarray:
        keep = np.ones(self.num_docs, bool)
        if split is not None:
            self.split_range(split)  # validates the name
            keep &= self.doc_split == SPLITS.index(split)
        if domain is not None:
            if domain not in self.domains:
                raise MoelabError(f"corpus {self.path} has no domain {domain!r} "
                                  f"(domains: {', '.join(self.domains)})")
            keep &= self.doc_domain == self.domains.index(domain)
        return np.flatnonzero(keep)

    def gather(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        """Tokens and per-token metadata at flat positions `idx` (any shape).

        pos is the position inside the document; a document's EOS has pos == its length.
        """
        idx = np.asarray(idx, np.int64)
        doc = np.searchsorted(self.doc_start, idx, side="right") - 1
        turn = self.turns[idx].astype(np.int16) if self.turns is not None else np.full(idx.shape, -1, np.int16)
        return {
            "input_ids": self.tokens[idx].astype(np.int64),
            "doc": doc,
            "pos": idx - self.doc_start[doc],
            "domain_id": self.doc_domain[doc],
            "lang_id": self.doc_lang[doc],
            "turn": turn,
        }

    def tokenizer(self):
        from moelab.data.tokenizer import load_tokenizer

        return load_tokenizer(self.path / self.info["tokenizer"]["file"])

    def __repr__(self) -> str:
        return (f"Corpus({str(self.path)!r}, docs={self.num_docs}, tokens={self.num_tokens}, "
                f"domains={self.domains}, langs={self.langs})")


def _codes(values: list[str], names: list[str]) -> np.ndarray:
    lookup = {name: i for i, name in enumerate(names)}
    return np.array([lookup[v] for v in values], dtype=np.int16)


def load_corpus(path: str | Path) -> Corpus:
    """Open a corpus folder written by `build_corpus`, memory-mapping its arrays."""
    import pyarrow.parquet as pq

    path = Path(path).expanduser()
    if path.is_file():
        raise MoelabError(f"{path} is a file, not a corpus folder (give the folder `moelab data build` wrote)")
    if not path.is_dir():
        raise MoelabError(f"corpus folder {path} does not exist (build one with `moelab data build`)")
    if not any(path.iterdir()):
        raise MoelabError(f"corpus folder {path} is empty (build one with `moelab data build`)")
    if not (path / SUMMARY).is_file():
        raise MoelabError(f"corpus folder {path} is incomplete or not a moelab corpus: no {SUMMARY}")
    try:
        info = json.loads((path / SUMMARY).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MoelabError(f"{path / SUMMARY} is not valid JSON: {e}") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT or info.get("version") != VERSION:
        raise MoelabError(f"{path / SUMMARY} is not a version-{VERSION} {FORMAT} summary")
    bad = _summary_problem(info)
    if bad:
        raise MoelabError(f"{path / SUMMARY} is corrupt: {bad}")
    needed = [TOKENS, DOCS] + ([TURNS] if info.get("has_turns") else [])
    missing = [name for name in needed if not (path / name).is_file()]
    if missing:
        raise MoelabError(f"corpus folder {path} is incomplete: missing {', '.join(missing)}")
    tokens = _load_array(path / TOKENS, (np.uint16, np.uint32))
    turns = _load_array(path / TURNS, (np.int16,)) if info.get("has_turns") else None
    try:
        docs = pq.read_table(path / DOCS)
    except Exception as e:  # pyarrow raises several types for a truncated or foreign file
        raise MoelabError(f"cannot read {path / DOCS}: {_first_line(e)}") from None
    if len(tokens) != info.get("num_tokens") or docs.num_rows != info.get("num_documents"):
        raise MoelabError(f"corpus folder {path} is incomplete: {TOKENS} or {DOCS} does not match {SUMMARY}")
    if turns is not None and len(turns) != len(tokens):
        raise MoelabError(f"corpus folder {path} is corrupt: {TURNS} and {TOKENS} differ in length")
    try:
        corpus = Corpus(path, info, tokens, turns, docs)
        _check_index(corpus)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise MoelabError(f"corpus folder {path} is corrupt: {SUMMARY} or {DOCS} is malformed "
                          f"({type(e).__name__}: {_first_line(e)})") from None
    return corpus


_COUNTS = {"documents": int, "bytes": int, "tokens": int}
_SUMMARY = {"num_tokens": int, "num_documents": int, "num_bytes": int, "dtype": str, "has_turns": bool,
            "domains": [str], "langs": [str], "splits": {"train": {"start": int, "end": int, **_COUNTS},
                                                         "heldout": {"start": int, "end": int, **_COUNTS}},
            "per_domain": {str: _COUNTS}, "per_lang": {str: _COUNTS},
            "tokenizer": {"kind": str, "file": str, "vocab_size": int, "eos_id": int, "pad_id": int,
                          "sentinel_ids": [int], "mode_ids": {str: int}}}


def _summary_problem(value, schema=_SUMMARY, where: str = "") -> str:
    """"" when `value` has the shape `schema` describes (a type, [type], {key: schema} or {str: schema}),
    else what differs; keys beyond the schema are allowed."""
    if isinstance(schema, type):
        ok = isinstance(value, schema) and (schema is bool or not isinstance(value, bool))
        return "" if ok else f"{where or 'the summary'} should be {schema.__name__}, not {value!r:.40}"
    if isinstance(schema, list):
        if not isinstance(value, list):
            return f"{where} should be a list"
        return next((p for i, v in enumerate(value) if (p := _summary_problem(v, schema[0], f"{where}[{i}]"))), "")
    if not isinstance(value, dict):
        return f"{where or 'the summary'} should be a JSON object"
    if str in schema:
        return next((p for k, v in value.items() if (p := _summary_problem(v, schema[str], f"{where}.{k}"))), "")
    for key, sub in schema.items():
        if key not in value:
            return f"{where}.{key} is missing".lstrip(".")
        problem = _summary_problem(value[key], sub, f"{where}.{key}".lstrip("."))
        if problem:
            return problem
    return ""


def _load_array(file: Path, dtypes: tuple) -> np.ndarray:
    """A memory-mapped 1-D array of one of `dtypes`; never unpickled (np.load's allow_pickle is off)."""
    try:
        arr = np.load(file, mmap_mode="r", allow_pickle=False)
    except Exception as e:  # a truncated header or data, or a pickle: ValueError, OSError, EOFError...
        raise MoelabError(f"cannot read {file}: {_first_line(e)}") from None
    if not isinstance(arr, np.ndarray) or arr.ndim != 1 or arr.dtype not in [np.dtype(d) for d in dtypes]:
        raise MoelabError(f"{file} is not a 1-D array of {' or '.join(np.dtype(d).name for d in dtypes)}")
    return arr


def _check_index(c: Corpus) -> None:
    """The document index must stay inside the token array (a flipped byte could point outside it)."""
    n = c.num_tokens
    if c.num_docs and (c.doc_start.min() < 0 or c.doc_length.min() < 0
                       or int((c.doc_start + c.doc_length).max()) >= n + (n == 0)
                       or np.any(np.diff(c.doc_start) < 0)):
        raise ValueError(f"a document lies outside the {n} tokens of {TOKENS}")
    if not 0 <= c.eos_id < max(c.vocab_size, 1) or c.vocab_size < 1:
        raise ValueError(f"eos_id {c.eos_id} is not inside vocab_size {c.vocab_size}")
    for split in SPLITS:
        start, end = c.split_range(split)
        if not 0 <= start <= end <= n:
            raise ValueError(f"split {split} [{start}, {end}) lies outside the {n} tokens")


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
