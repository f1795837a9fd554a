"""Held-out loss per sequence, and intervals for loss differences over seeds and sequences.

Every model of a comparison sees the same held-out sequences (`iter_sequential` is deterministic), so a
difference is paired by sequence; with several seeds the interval redraws both the seeds and the
sequences (a two-level bootstrap), so it holds the spread between training runs as well as the text.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


@torch.no_grad()
def seq_losses(checkpoint: Path, corpus: Path, seq_len: int, batch_size: int,
               max_tokens: int = 0, device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """(sum of next-token losses, number of predicted tokens) per held-out sequence, in corpus order, with
    the model on `device` (the workspace's: a GPU run evaluates on the GPU)."""
    from moelab.data.objectives import iter_sequential
    from moelab.data.shards import load_corpus
    from moelab.train.checkpoint import load_model

    model = load_model(checkpoint, device).eval()
    sums, counts, seen = [], [], 0
    for batch in iter_sequential(load_corpus(corpus), seq_len=seq_len, batch_size=batch_size, split="heldout"):
        logits_BSV = model(batch["input_ids"].to(device)).logits.float()
        tgt_BS = batch["labels"][:, 1:].to(device)
        nll_BS = torch.nn.functional.cross_entropy(logits_BSV[:, :-1].transpose(1, 2), tgt_BS,
                                                   ignore_index=-100, reduction="none")
        valid_BS = tgt_BS != -100
        sums.append((nll_BS * valid_BS).sum(1).double().cpu().numpy())
        counts.append(valid_BS.sum(1).double().cpu().numpy())
        seen += int(valid_BS.sum())
        if max_tokens and seen >= max_tokens:
            break
    return np.concatenate(sums), np.concatenate(counts)


def two_level_bootstrap(sums_NS: np.ndarray, counts_S: np.ndarray, n_boot: int = 2000, seed: int = 0,
                        level: float = 0.95) -> tuple[float, float, float]:
    """Token-weighted mean of per-(seed, sequence) sums, with a percentile interval that redraws seeds
    (rows) and sequences (columns) with replacement. One seed: sequences only."""
    sums_NS = np.atleast_2d(np.asarray(sums_NS, np.float64))
    counts_S = np.asarray(counts_S, np.float64)
    keep = counts_S > 0
    sums_NS, counts_S = sums_NS[:, keep], counts_S[keep]
    N, S = sums_NS.shape
    value = float(sums_NS.sum() / (N * counts_S.sum()))
    rng = np.random.default_rng(seed)
    boot = np.empty(n_boot)
    for b in range(n_boot):  # a loop: (n_boot x S) draws are cheap, (n_boot x N x S) gathers are not
        rows = rng.integers(0, N, N)
        cols = rng.integers(0, S, S)
        boot[b] = sums_NS[np.ix_(rows, cols)].sum() / (N * counts_S[cols].sum())
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(boot, [tail, 100 - tail])
    return value, float(lo), float(hi)
