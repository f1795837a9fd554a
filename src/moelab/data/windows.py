"""Random token windows drawn by domain weight: the data mix of one training phase.

Each domain's documents of a split (each with its EOS) are concatenated into one virtual stream; a
window first draws its domain by weight, then a uniform start in that domain's stream, so a 52% code
mix means 52% of rows read code whatever the corpus's own proportions are (OpenMoE's 52% -> 15%).
"""

from __future__ import annotations

import numpy as np

from moelab.config import ConfigError, MoelabError


class DomainWindows:
    def __init__(self, corpus, split: str, weights: dict[str, float]):
        unknown = sorted(set(weights) - set(corpus.domains))
        if unknown:
            raise ConfigError(f"data weight for domain {unknown[0]!r}, which corpus {corpus.path} does not "
                              f"have (domains: {', '.join(corpus.domains)})")
        self.corpus = corpus
        self.names = [d for d in corpus.domains if weights.get(d, 0) > 0]
        if not self.names:
            raise ConfigError("data weights are all zero: no domain to draw from")
        w = np.array([weights[d] for d in self.names], dtype=np.float64)
        self.p = w / w.sum()
        self.streams = [self._stream(split, d) for d in self.names]
        self.max_len = min(total for _, _, total in self.streams)

    def _stream(self, split: str, domain: str):
        docs = self.corpus.doc_ids(split, domain)
        if not len(docs):
            raise MoelabError(f"corpus {self.corpus.path} has no {domain!r} documents in split {split!r}")
        starts = self.corpus.doc_start[docs]
        spans = self.corpus.doc_length[docs] + 1
        offsets = np.cumsum(spans) - spans
        return starts, offsets, int(spans.sum())

    def draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """Corpus token indices of one window of n <= max_len tokens."""
        starts, offsets, total = self.streams[int(rng.choice(len(self.names), p=self.p))]
        virtual = int(rng.integers(0, total - n + 1)) + np.arange(n)
        k = np.searchsorted(offsets, virtual, side="right") - 1
        return starts[k] + (virtual - offsets[k])
