"""UL2, OpenMoE's pre-training mixture, for a decoder-only model with a fully causal mask.

Each example is `[mode] + inputs + targets` in one sequence; the loss falls on the targets only.
  PrefixLM ([S2S], 50%): inputs = a random prefix of the segment, targets = the rest.
  Span corruption (T5): noise spans of the segment are replaced in the inputs by sentinels
    <extra_id_0>, <extra_id_1>, ...; targets = each sentinel followed by the span it replaced.
    (mean span length, corruption rate) = (3, .15), (8, .15) with [NLU]; (3, .5), (8, .5), (64, .5)
    with [NLG]; 10% each.
The noise mask follows T5's `random_spans_noise_mask`: round(rate * n) noise tokens in
round(noise / mean) spans, noise and non-noise lengths each a random segmentation, interleaved
starting with non-noise (so the last token is always noise). Python's round halves to even, as tf.round.

One deviation: a segment never has more spans than the tokenizer has sentinels (100), where T5 would
run into ordinary vocabulary ids; a long sequence is instead filled with several examples.
"""

from __future__ import annotations

import itertools
from typing import Iterator, NamedTuple

import numpy as np
import torch

from moelab.config import MoelabError
from moelab.data.batch import BATCH_KEYS, IGNORE_INDEX, META_KEYS, check_shape, empty_batch, to_torch
from moelab.data.shards import Corpus
from moelab.data.windows import DomainWindows

MIN_EXAMPLE_TOKENS = 16  # room left in a row below which the row is padded rather than filled


class Denoiser(NamedTuple):
    name: str
    mode: str  # the mode token that tells the model which task it is doing
    mean_span: float  # 0 for PrefixLM
    rate: float  # share of the segment that is noise; 0 for PrefixLM
    weight: float


UL2_MIXTURE = (
    Denoiser("prefix_lm", "[S2S]", 0, 0.0, 0.5),
    Denoiser("span_3_0.15", "[NLU]", 3, 0.15, 0.1),
    Denoiser("span_8_0.15", "[NLU]", 8, 0.15, 0.1),
    Denoiser("span_3_0.5", "[NLG]", 3, 0.5, 0.1),
    Denoiser("span_8_0.5", "[NLG]", 8, 0.5, 0.1),
    Denoiser("span_64_0.5", "[NLG]", 64, 0.5, 0.1),
)


class Example(NamedTuple):
    ids: np.ndarray  # (L,) the packed example
    labels: np.ndarray  # (L,) IGNORE_INDEX except on the targets
    src: np.ndarray  # (L,) index into the segment of the text token each position shows or stands for
    is_text: np.ndarray  # (L,) False on the mode token and sentinels


# ---- the noise mask (T5) ---------------------------------------------------------------------
def noise_span_counts(length: int, rate: float, mean_span: float) -> tuple[int, int]:
    """(noise tokens, noise spans) for a segment of `length` tokens (length >= 2)."""
    num_noise = min(max(round(rate * length), 1), length - 1)
    num_spans = max(round(num_noise / mean_span), 1)
    # Each span needs a noise token and a non-noise token before it.
    return num_noise, min(num_spans, num_noise, length - num_noise)


def random_segmentation(num_items: int, num_segments: int, rng) -> np.ndarray:
    """Split num_items into num_segments positive lengths, uniformly over all such splits: choose
    which num_segments - 1 of the num_items - 1 gaps between items start a new segment."""
    starts = np.zeros(num_items - 1, bool)
    starts[: num_segments - 1] = True
    rng.shuffle(starts)
    segment_id = np.cumsum(np.concatenate([[0], starts]))
    return np.bincount(segment_id, minlength=num_segments)


def random_spans_noise_mask(length: int, rate: float, mean_span: float, rng) -> np.ndarray:
    """(length,) bool, True on noise: spans interleaved non-noise, noise, non-noise, ..., noise."""
    num_noise, num_spans = noise_span_counts(length, rate, mean_span)
    noise_lengths = random_segmentation(num_noise, num_spans, rng)
    nonnoise_lengths = random_segmentation(length - num_noise, num_spans, rng)
    interleaved = np.stack([nonnoise_lengths, noise_lengths], axis=1).reshape(-1)
    return np.repeat(np.tile([False, True], num_spans), interleaved)


# ---- building examples -------------------------------------------------------------------------
def span_corruption_example(tokens: np.ndarray, mask: np.ndarray, mode_id: int, sentinel_ids) -> Example:
    """`[mode] + inputs + targets`: inputs = tokens with each noise span replaced by its sentinel,
    targets = each sentinel followed by its span."""
    n = len(tokens)
    first = mask & ~np.concatenate([[False], mask[:-1]])  # the first token of each noise span
    span = np.cumsum(first) - 1
    if span[-1] >= len(sentinel_ids):
        raise MoelabError(f"{span[-1] + 1} noise spans but the tokenizer has {len(sentinel_ids)} sentinels")
    sentinel = np.asarray(sentinel_ids, np.int64)[np.maximum(span, 0)]
    keep = ~mask | first
    in_src = np.flatnonzero(keep)
    in_ids = np.where(first, sentinel, tokens)[keep]
    # Targets: every noise token, with a copy of its span's sentinel inserted before each first token.
    noise = np.flatnonzero(mask)
    copies = 1 + first[noise]
    tgt_src = np.repeat(noise, copies)
    group_start = np.cumsum(copies) - copies  # where each noise token's copies begin in the targets
    is_sentinel = np.zeros(len(tgt_src), bool)
    is_sentinel[group_start[first[noise]]] = True
    tgt_ids = np.where(is_sentinel, sentinel[tgt_src], tokens[tgt_src])
    ids = np.concatenate([[mode_id], in_ids, tgt_ids]).astype(np.int64)
    labels = np.concatenate([np.full(1 + len(in_ids), IGNORE_INDEX), tgt_ids]).astype(np.int64)
    src = np.concatenate([[0], in_src, tgt_src])
    is_text = np.concatenate([[False], ~first[in_src], ~is_sentinel])
    assert len(ids) == 1 + n + 2 * (span[-1] + 1)
    return Example(ids, labels, src, is_text)


def prefix_lm_example(tokens: np.ndarray, split: int, mode_id: int) -> Example:
    """`[mode] + tokens`, with the loss on tokens[split:]."""
    n = len(tokens)
    ids = np.concatenate([[mode_id], tokens]).astype(np.int64)
    labels = np.concatenate([np.full(1 + split, IGNORE_INDEX), tokens[split:]]).astype(np.int64)
    src = np.concatenate([[0], np.arange(n)])
    return Example(ids, labels, src, np.concatenate([[False], np.ones(n, bool)]))


def packed_length(n: int, denoiser: Denoiser) -> int:
    if denoiser.rate == 0:
        return 1 + n
    return 1 + n + 2 * noise_span_counts(n, denoiser.rate, denoiser.mean_span)[1]


def max_segment_length(room: int, denoiser: Denoiser, num_sentinels: int) -> int:
    """The longest segment (>= 2 tokens) whose example fits in `room` tokens; 0 if none does.
    Binary search: the packed length and the span count both grow with the segment length."""
    def fits(n: int) -> bool:
        spans = 0 if denoiser.rate == 0 else noise_span_counts(n, denoiser.rate, denoiser.mean_span)[1]
        return packed_length(n, denoiser) <= room and spans <= num_sentinels
    lo, hi = 1, room  # fits(lo) is treated as true, fits(hi) is false
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo if lo >= 2 else 0


def make_example(tokens: np.ndarray, denoiser: Denoiser, rng, mode_id: int, sentinel_ids) -> Example:
    if denoiser.rate == 0:
        return prefix_lm_example(tokens, int(rng.integers(1, len(tokens))), mode_id)
    mask = random_spans_noise_mask(len(tokens), denoiser.rate, denoiser.mean_span, rng)
    return span_corruption_example(tokens, mask, mode_id, sentinel_ids)


# ---- the sampler ---------------------------------------------------------------------------------
class UL2Sampler:
    """Rows packed with UL2 examples of random segments of the split (denoiser drawn per example)."""

    def __init__(self, corpus: Corpus, *, seq_len: int, batch_size: int, seed: int = 0, split: str = "train",
                 mixture: tuple[Denoiser, ...] = UL2_MIXTURE, weights: dict[str, float] | None = None):
        check_shape(seq_len, batch_size)
        missing = [d.mode for d in mixture if d.mode not in corpus.mode_ids]
        if missing or not corpus.sentinel_ids:
            modes = ", ".join(sorted({d.mode for d in mixture}))
            raise MoelabError(f"UL2 needs mode tokens {modes} and sentinels <extra_id_N> in the tokenizer; "
                              "this corpus's tokenizer lacks them (train a moelab one)")
        self.corpus, self.seq_len, self.batch_size = corpus, seq_len, batch_size
        self.seed, self.split = seed, split
        self.mixture = mixture
        self.weights = np.array([d.weight for d in mixture]) / sum(d.weight for d in mixture)
        self.lo, self.hi = corpus.split_range(split)
        if self.hi - self.lo < 2:
            raise MoelabError(f"split {split!r} of corpus {corpus.path} has fewer than 2 tokens")
        self.domains, self.langs = corpus.domains, corpus.langs
        self.windows = DomainWindows(corpus, split, weights) if weights else None  # None: the corpus's own mix

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, step])
        out = empty_batch(self.batch_size, self.seq_len, self.corpus.pad_id, keys=(*BATCH_KEYS, "denoiser"))
        for row in range(self.batch_size):
            self._fill_row(out, row, rng)
        return to_torch(out)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return (self.batch(step) for step in itertools.count())

    def _window(self, rng, n: int) -> np.ndarray:
        if self.windows is not None:
            return self.windows.draw(rng, n)
        start = self.lo + int(rng.integers(0, self.hi - self.lo - n + 1))
        return np.arange(start, start + n)

    def _fill_row(self, out: dict[str, np.ndarray], row: int, rng) -> None:
        at = 0
        while at == 0 or self.seq_len - at >= MIN_EXAMPLE_TOKENS:
            which = int(rng.choice(len(self.mixture), p=self.weights))
            denoiser = self.mixture[which]
            n = max_segment_length(self.seq_len - at, denoiser, len(self.corpus.sentinel_ids))
            n = min(n, self.hi - self.lo if self.windows is None else self.windows.max_len)
            if n < 2:
                return
            found = self.corpus.gather(self._window(rng, n))
            ex = make_example(found["input_ids"], denoiser, rng, self.corpus.mode_ids[denoiser.mode],
                              self.corpus.sentinel_ids)
            end = at + len(ex.ids)
            out["input_ids"][row, at:end] = ex.ids
            out["labels"][row, at:end] = ex.labels
            for key in META_KEYS:
                out[key][row, at:end] = found[key][ex.src]
            out["pos"][row, at:end] = np.where(ex.is_text, found["pos"][ex.src], -1)
            out["denoiser"][row, at:end] = which
            at = end
