"""Training and evaluation batches from a corpus: causal LM windows, a sequential pass, a two-corpus mix.

A batch is a dict of torch tensors, B rows of S tokens:
  input_ids  (B,S) int64  token ids; pad_id where a row has no more tokens
  labels     (B,S) int64  Hugging Face convention: aligned with input_ids, the model shifts them
                          itself; -100 = no loss (padding, and for UL2 the mode token and inputs)
  doc        (B,S) int64  document id (row of docs.parquet)                         -1 on padding
  pos        (B,S) int64  position inside the document (a document's EOS: its length)
                          -1 on padding and on tokens not from the text (UL2 mode tokens, sentinels)
  domain_id  (B,S) int16  index into `sampler.domains`                              -1 on padding
  lang_id    (B,S) int16  index into `sampler.langs`                                -1 on padding
  turn       (B,S) int16  turn of a conversation                 -1 outside conversations, padding
UL2 batches add
  denoiser   (B,S) int16  index into ul2.UL2_MIXTURE of the example the token belongs to; -1 on padding

Random batches are a pure function of (seed, step): `sampler.batch(step)`, so a resumed run gets the
batches it would have got without saving any sampler state.
"""

from __future__ import annotations

import itertools
from typing import Iterator

import numpy as np
import torch

from moelab.config import ConfigError, MoelabError
from moelab.data.batch import (BATCH_KEYS, IGNORE_INDEX, META_KEYS, check_shape,  # noqa: F401  (re-exported)
                               empty_batch, to_torch)
from moelab.data.shards import Corpus, load_corpus
from moelab.data.ul2 import UL2Sampler
from moelab.data.windows import DomainWindows

class CorpusSampler:
    """Causal LM: each row is a window of seq_len consecutive tokens at a uniformly random start.

    Windows run across document boundaries (documents are separated by EOS), so no token is padding
    unless the whole split is shorter than seq_len.
    """

    def __init__(self, corpus: Corpus, *, seq_len: int, batch_size: int, seed: int = 0, split: str = "train",
                 weights: dict[str, float] | None = None):
        check_shape(seq_len, batch_size)
        self.corpus, self.seq_len, self.batch_size = corpus, seq_len, batch_size
        self.seed, self.split = seed, split
        self.lo, self.hi = corpus.split_range(split)
        if self.hi <= self.lo:
            raise MoelabError(f"split {split!r} of corpus {corpus.path} has no tokens")
        self.domains, self.langs = corpus.domains, corpus.langs
        self.windows = DomainWindows(corpus, split, weights) if weights else None  # None: the corpus's own mix

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, step])
        if self.windows is not None:
            n = min(self.seq_len, self.windows.max_len)
            found = self.corpus.gather(np.stack([self.windows.draw(rng, n) for _ in range(self.batch_size)]))
        else:
            n = min(self.seq_len, self.hi - self.lo)
            starts = self.lo + rng.integers(0, self.hi - self.lo - n + 1, size=self.batch_size)
            found = self.corpus.gather(starts[:, None] + np.arange(n))
        out = empty_batch(self.batch_size, self.seq_len, self.corpus.pad_id)
        for key, value in found.items():
            out[key][:, :n] = value
        out["labels"][:, :n] = found["input_ids"]
        return to_torch(out)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return (self.batch(step) for step in itertools.count())


def iter_sequential(corpus: Corpus, *, seq_len: int, batch_size: int, split: str | None = "heldout",
                    domain: str | None = None, balanced_tokens: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """Every token of the split (None: of the whole corpus), or of its documents of one domain,
    exactly once, in document order.

    The selected documents (each with its EOS) are concatenated and cut into rows of seq_len; the last
    row is padded and the last batch may have fewer rows. With `balanced_tokens` smaller than the
    selection, only that many tokens, shared among the domains (`balanced_spans`): a prefix of a split in
    corpus order can hold one domain alone (one long module of the standard library).
    """
    check_shape(seq_len, batch_size)
    docs = corpus.doc_ids(split, domain)
    if not len(docs):
        what = f"split {split!r}" + (f", domain {domain!r}" if domain else "")
        raise MoelabError(f"corpus {corpus.path} has no documents in {what}")
    spans = corpus.doc_length[docs] + 1
    if balanced_tokens is not None and balanced_tokens < int(spans.sum()):
        spans = balanced_spans(corpus.doc_domain[docs], spans, balanced_tokens)
        docs, spans = docs[spans > 0], spans[spans > 0]
    return _sequential_batches(corpus, docs, spans, seq_len, batch_size)  # checked now, produced lazily


def balanced_spans(domain_D: np.ndarray, spans_D: np.ndarray, tokens: int) -> np.ndarray:
    """How many leading tokens of each document (in order) a budget of `tokens` takes, shared among the
    domains: each domain's quota is an equal share of what is left, capped at what it has (the smallest
    domains first, so what they cannot use goes to the others); within a domain its documents in order,
    the last one cut where the quota ends. The quotas sum to min(tokens, total)."""
    take_D = np.zeros_like(spans_D)
    _, group_D = np.unique(domain_D, return_inverse=True)
    totals = np.bincount(group_D, weights=spans_D).astype(np.int64)
    left = min(int(tokens), int(totals.sum()))
    for i, d in enumerate(np.argsort(totals, kind="stable")):
        quota = min(int(totals[d]), left // (len(totals) - i))
        left -= quota
        idx = np.flatnonzero(group_D == d)
        before = np.cumsum(spans_D[idx]) - spans_D[idx]  # tokens of the domain ahead of each document
        take_D[idx] = np.clip(quota - before, 0, spans_D[idx])
    return take_D


def _sequential_batches(corpus: Corpus, docs: np.ndarray, spans: np.ndarray, seq_len: int, batch_size: int):
    starts = corpus.doc_start[docs]
    offsets = np.cumsum(spans) - spans  # where each document begins in the concatenation
    total = int(spans.sum())
    per_batch = seq_len * batch_size
    for begin in range(0, total, per_batch):
        virtual = np.arange(begin, min(begin + per_batch, total))
        k = np.searchsorted(offsets, virtual, side="right") - 1
        found = corpus.gather(starts[k] + (virtual - offsets[k]))
        rows = -(-len(virtual) // seq_len)
        out = empty_batch(rows, seq_len, corpus.pad_id)
        for key, value in found.items():
            out[key].reshape(-1)[: len(virtual)] = value
        out["labels"].reshape(-1)[: len(virtual)] = found["input_ids"]
        yield to_torch(out)


class MixedSampler:
    """For the first `steps` steps, each row comes from `secondary` with probability `fraction`.

    Both corpora must share a tokenizer. Domain and language ids are re-indexed into the union of both
    corpora's names (primary's first); document ids of the secondary corpus are offset by the primary's
    document count so they stay distinct.
    """

    def __init__(self, primary, secondary, *, fraction: float, steps: int, seed: int = 0):
        if primary.corpus.info["tokenizer"]["fingerprint"] != secondary.corpus.info["tokenizer"]["fingerprint"]:
            raise MoelabError(f"corpora {primary.corpus.path} and {secondary.corpus.path} "
                              "use different tokenizers")
        if (primary.seq_len, primary.batch_size) != (secondary.seq_len, secondary.batch_size):
            raise MoelabError("mixed samplers need the same seq_len and batch_size")
        self.primary, self.secondary = primary, secondary
        self.fraction, self.steps, self.seed = fraction, steps, seed
        self.corpus, self.seq_len, self.batch_size = primary.corpus, primary.seq_len, primary.batch_size
        self.domains = _union(primary.domains, secondary.domains)
        self.langs = _union(primary.langs, secondary.langs)
        self._domain_map = torch.tensor([self.domains.index(d) for d in secondary.domains], dtype=torch.int16)
        self._lang_map = torch.tensor([self.langs.index(x) for x in secondary.langs], dtype=torch.int16)

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        out = self.primary.batch(step)
        if step >= self.steps:
            return out
        draws = np.random.default_rng([self.seed, step, 1]).random(self.batch_size)
        rows = torch.from_numpy(draws < self.fraction)
        if not rows.any():
            return out
        other = self.secondary.batch(step)
        other["domain_id"] = _remap(other["domain_id"], self._domain_map)
        other["lang_id"] = _remap(other["lang_id"], self._lang_map)
        other["doc"] = torch.where(other["doc"] >= 0, other["doc"] + self.primary.corpus.num_docs, other["doc"])
        for key in out:
            out[key][rows] = other[key][rows]
        return out

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return (self.batch(step) for step in itertools.count())


def _union(first: list[str], second: list[str]) -> list[str]:
    return list(first) + [name for name in second if name not in first]


def _remap(ids: torch.Tensor, mapping: torch.Tensor) -> torch.Tensor:
    return torch.where(ids >= 0, mapping[ids.clamp(min=0).long()], ids)


def build_sampler(cfg, *, split: str = "train", objective: str | None = None,
                  weights: dict[str, float] | None = None):
    """The sampler a run's DataConfig asks for: causal or UL2 (`objective` overrides the config's, as a
    training phase does), rows drawn by domain `weights` when given, mixed with `mix_path` when set."""
    if not cfg.path:
        raise ConfigError("data.path is not set: point it at a corpus built by `moelab data build`")
    make = UL2Sampler if (objective or cfg.objective) == "ul2" else CorpusSampler
    sampler = make(load_corpus(cfg.path), seq_len=cfg.seq_len, batch_size=cfg.batch_size, seed=cfg.seed,
                   split=split, weights=weights)
    if cfg.mix_path and cfg.mix_steps > 0 and split == "train":
        # A different seed, so both corpora do not draw the same window offsets.
        second = make(load_corpus(cfg.mix_path), seq_len=cfg.seq_len, batch_size=cfg.batch_size,
                      seed=cfg.seed + 1, split=split)
        sampler = MixedSampler(sampler, second, fraction=cfg.mix_fraction, steps=cfg.mix_steps, seed=cfg.seed)
    return sampler
