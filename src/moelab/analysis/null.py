"""Chance levels: what a number would be under uniform random routing or with shuffled labels.

Every analysis reports its value next to one of these, so "0.08" comes with "0.01 by chance". Nulls that
need simulation take a seed and use their own `np.random.Generator`: the same call gives the same null.
"""

from __future__ import annotations

import numpy as np

CHUNK_TOKENS = 1 << 17


def entropy(counts: np.ndarray, axis: int = -1) -> np.ndarray:
    """Shannon entropy (nats) of count or probability vectors along `axis`; 0 log 0 = 0."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum(axis=axis, keepdims=True)
    p = np.divide(counts, total, out=np.zeros_like(counts), where=total > 0)
    plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    return -plogp.sum(axis=axis)


def mutual_information(counts_GE: np.ndarray) -> float:
    """MI (nats) between the row and column variables of a joint count table: H(G) + H(E) - H(G, E)."""
    counts_GE = np.asarray(counts_GE, dtype=np.float64)
    if counts_GE.sum() == 0:
        return float("nan")
    h_g = entropy(counts_GE.sum(axis=1))
    h_e = entropy(counts_GE.sum(axis=0))
    return float(h_g + h_e - entropy(counts_GE.reshape(-1)))


def normalised_mi(mi: float, counts_GE: np.ndarray) -> float:
    """MI / sqrt(H(G) H(E)): 0 for independence, 1 when either variable determines the other."""
    h_g = float(entropy(np.asarray(counts_GE).sum(axis=1)))
    h_e = float(entropy(np.asarray(counts_GE).sum(axis=0)))
    return mi / np.sqrt(h_g * h_e) if h_g > 0 and h_e > 0 else 0.0


def permutation_mi(counts_GE: np.ndarray, n_permutations: int, seed: int) -> np.ndarray:
    """MI after shuffling the labels over the rows, `n_permutations` times.

    The joint table after a shuffle depends only on the margins: group g's row is a draw of n(g) of the
    remaining choices without replacement, a multivariate hypergeometric given the experts left by the
    groups before it. Sampling the rows one after another that way is exactly the distribution of
    shuffling the trace's labels, in O(G x E) per permutation and without keeping the trace.
    """
    counts_GE = np.asarray(counts_GE, dtype=np.int64)
    G, E = counts_GE.shape
    n_G, load_E = counts_GE.sum(axis=1), counts_GE.sum(axis=0)
    rng = np.random.default_rng(seed)
    out = np.empty(n_permutations)
    for i in range(n_permutations):
        left, joint = load_E.copy(), np.zeros((G, E), np.int64)
        for g in np.argsort(-n_G, kind="stable"):
            if n_G[g] == left.sum():  # the last group takes what is left
                joint[g] = left
                break
            joint[g] = rng.multivariate_hypergeometric(left, int(n_G[g]))
            left -= joint[g]
        out[i] = mutual_information(joint)
    return out


def uniform_sets(n: int, num_experts: int, top_k: int, rng: np.random.Generator) -> np.ndarray:
    """n x k experts, each row a uniformly random k-subset of 0..E-1 (Floyd's algorithm: for j = E-k..E-1,
    draw t in 0..j and take j instead where t is already chosen). k draws a token instead of the E uniforms
    and the partition that the k smallest of E uniforms cost (8x faster at top-8 of 64)."""
    picks = np.empty((n, top_k), np.int64)
    for i, j in enumerate(range(num_experts - top_k, num_experts)):
        t = rng.integers(0, j + 1, n)
        picks[:, i] = np.where((picks[:, :i] == t[:, None]).any(axis=1), j, t)
    return picks


def random_topk_counts(n_G: np.ndarray, num_experts: int, top_k: int, seed: int,
                       max_groups: int = 2000) -> np.ndarray:
    """Expert counts (G' x E) of groups of n_G tokens routed uniformly at random, k distinct experts each.

    At most `max_groups` groups (a seeded sample) are simulated: a null's mean needs no more.
    """
    rng = np.random.default_rng(seed)
    n_G = np.asarray(n_G, dtype=np.int64)
    if len(n_G) > max_groups:
        n_G = n_G[rng.choice(len(n_G), size=max_groups, replace=False)]
    counts_GE = np.zeros((len(n_G), num_experts), dtype=np.int64)
    group_N = np.repeat(np.arange(len(n_G)), n_G)
    for start in range(0, len(group_N), CHUNK_TOKENS):
        g = group_N[start:start + CHUNK_TOKENS]
        picks = uniform_sets(len(g), num_experts, top_k, rng)
        counts_GE += np.bincount((g[:, None] * num_experts + picks).reshape(-1),
                                 minlength=counts_GE.size).reshape(counts_GE.shape)
    return counts_GE


def uniform_imbalance(num_tokens: int, num_experts: int, top_k: int, seed: int, draws: int = 32) -> float:
    """Expected max/mean expert load when `num_tokens` tokens route uniformly (k draws per token).

    The k choices of a token are drawn with replacement here, which is the multinomial the load converges
    to; the max/mean ratio it gives is the finite-sample chance level (1.0 only as tokens -> infinity).
    """
    if num_tokens == 0:
        return float("nan")
    rng = np.random.default_rng(seed)
    loads = rng.multinomial(num_tokens * top_k, np.full(num_experts, 1.0 / num_experts), size=draws)
    return float(np.mean(loads.max(axis=1) / loads.mean(axis=1)))
