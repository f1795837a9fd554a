"""Which experts fire together: co-activation P(j | i) within a layer, and top-1 transitions from each MoE
layer to the next for the same token.

Null of P(j | i): a router whose only structure is its load. Each token draws k distinct experts
independently of every other choice, with weights fitted so that every expert's inclusion rate matches
the layer's load (`resample.fit_load_weights`); as many tokens as the layer has, at most 2^14 per draw,
the draws' spread then shrunk to the layer's token count (sd ~ 1/sqrt(tokens)). Shuffling the rank
columns across tokens would keep the load exactly but lets a token draw one expert twice, which under
unequal load biases the null low. Uniform random top-k's (k - 1) / (E - 1) stays as a reference
(`uniform_p`): under unequal load it is not the chance level. The strongest pair carries a bootstrap
interval over sequences and its own null draws (the strongest pair of each load-matched routing). A layer
with one expert or k = 1 has no pairs: NaN. Transitions: independent layers give the outer product of the
two layers' top-1 marginals (and MI 0: the reported chance MI is the G-test's (E_a - 1)(E_b - 1) / 2N,
the bias of MI estimated from N tokens).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from moelab.analysis.common import (
    Batch, PackedCounts, Result, check_experts, consume, iter_input, layer_choices, regroup, require_columns,
    token_key,
)
from moelab.analysis.null import mutual_information
from moelab.analysis.resample import (
    Estimate, draw_sets, fit_load_weights, fold_of, layer_estimates, stack_ragged, subset_scale,
)
from moelab.config import MoelabError


def coactivation_counts(ids_TK: np.ndarray, num_experts: int) -> np.ndarray:
    """C[i, j] = tokens with both i and j in their top-k (the diagonal: tokens with i)."""
    ids_TK = np.asarray(ids_TK, np.int64)
    E = num_experts
    pairs = (ids_TK[:, :, None] * E + ids_TK[:, None, :]).reshape(-1)  # all (a, b) rank pairs, a == b on diag
    return np.bincount(pairs, minlength=E * E).reshape(E, E)


def conditional_coactivation(counts_EE: np.ndarray) -> np.ndarray:
    """P(j | i) = C[i, j] / C[i, i]; rows of experts never chosen are NaN."""
    diag = np.diag(counts_EE).astype(np.float64)[:, None]
    return np.divide(counts_EE, diag, out=np.full(counts_EE.shape, np.nan), where=diag > 0)


def strongest_pair(p_EE: np.ndarray) -> float:
    """The largest off-diagonal P(j | i); NaN without pairs (one expert, k = 1, nothing routed)."""
    p = np.array(p_EE, np.float64)
    if p.shape[0] < 2:
        return float("nan")
    np.fill_diagonal(p, np.nan)
    return float(np.nanmax(p)) if np.isfinite(p).any() else float("nan")


NULL_TOKENS = 1 << 14


def null_coactivation(load_E: np.ndarray, top_k: int, tokens: int, n_permutations: int,
                      seed: int) -> list[np.ndarray]:
    """P(j | i) of `n_permutations` load-matched independent routings of min(tokens, 2^18) tokens each."""
    rng = np.random.default_rng([seed, 0xC0AC])
    logw = fit_load_weights(load_E, top_k, rng)
    n = min(int(tokens), NULL_TOKENS)
    return [conditional_coactivation(coactivation_counts(draw_sets(logw, top_k, n, rng), len(load_E)))
            for _ in range(n_permutations)]


@dataclasses.dataclass
class Coactivation(Result):
    counts: list[np.ndarray]        # per layer E x E co-occurrence counts
    p_j_given_i: list[np.ndarray]   # per layer E x E, diagonal 1
    null_p: list[np.ndarray]        # per layer E x E: mean P(j | i) over rank-shuffled permutations
    uniform_p: list[float]          # reference: uniform random top-k, (k - 1) / (E - 1)
    strongest: list[Estimate]       # per layer: max off-diagonal P(j | i), interval, permutation null
    strongest_overall: Estimate
    transitions: list[np.ndarray]   # per layer pair (l, l+1): E_l x E_{l+1} top-1 counts
    transition_p: list[np.ndarray]  # row-normalised: P(top-1 at l+1 = b | top-1 at l = a)
    transition_null: list[np.ndarray]  # independence: outer product of the marginals, as probabilities
    transition_mi: list[float]      # nats
    transition_null_mi: list[float]  # chance MI at this many tokens


class CoactivationAccumulator:
    """Needs token-complete batches (regroup by token): rows of one token across layers together."""

    columns = ("seq", "pos", "layer", "rank", "expert")

    def __init__(self, num_experts: Sequence[int], top_k: int, *, folds: int = 1):
        self.num_experts, self.top_k, self.folds = list(num_experts), top_k, folds
        self.co = [np.zeros((folds, E, E), np.int64) for E in self.num_experts]
        self.trans = [np.zeros((a, b), np.int64) for a, b in zip(self.num_experts, self.num_experts[1:])]

    def update(self, batch: Batch) -> None:
        require_columns(batch, self.columns, "co-activation")
        check_experts(batch, self.num_experts)
        prev = None
        for l, E in enumerate(self.num_experts):
            tk = layer_choices(batch, l, self.top_k, ("expert", "seq", "pos"), len(self.num_experts))
            if self.folds > 1:
                ids = tk["expert"].astype(np.int64)
                fold = fold_of(tk["seq"][:, 0], self.folds)[:, None, None]
                key = fold * E * E + ids[:, :, None] * E + ids[:, None, :]
                self.co[l] += np.bincount(key.reshape(-1), minlength=self.folds * E * E).reshape(self.folds, E, E)
            else:
                self.co[l][0] += coactivation_counts(tk["expert"], E)
            cur = (tk["seq"][:, 0], tk["pos"][:, 0], tk["expert"][:, 0].astype(np.int64))
            if prev is not None:
                if not (np.array_equal(prev[0], cur[0]) and np.array_equal(prev[1], cur[1])):
                    raise MoelabError(f"layers {l - 1} and {l} cover different tokens: transitions need every layer")
                n_b = self.num_experts[l]
                self.trans[l - 1] += np.bincount(prev[2] * n_b + cur[2],
                                                 minlength=self.trans[l - 1].size).reshape(self.trans[l - 1].shape)
            prev = cur

    def merge(self, other: "CoactivationAccumulator") -> None:
        for mine, theirs in zip(self.co + self.trans, other.co + other.trans):
            if isinstance(theirs, PackedCounts):
                theirs.add_into(mine)
            else:
                mine += theirs

    def for_transfer(self) -> "CoactivationAccumulator":
        """This part with its fold tables packed (a part's sequences fill a few of the folds), to be sent
        to the parent and merged there (`parallel.py`); after this it can only be merged."""
        self.co = [PackedCounts.pack(c) for c in self.co]
        return self

    def strongest_layer(self, l: int, weights: np.ndarray | None = None,
                        n_permutations: int = 16) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
        """One layer's strongest pair: (value, the null's mean P(j | i), bootstrap replicates, null draws)."""
        E = self.num_experts[l]
        co = self.co[l].sum(axis=0)
        pairs = E > 1 and self.top_k > 1  # else P(j | i) = 0 off the diagonal by construction, not a finding
        value = strongest_pair(conditional_coactivation(co)) if pairs else float("nan")
        resample = weights is not None and self.folds > 1 and pairs
        reps = np.einsum("rf,fij->rij", weights, self.co[l]) if resample else []
        boot = np.array([strongest_pair(conditional_coactivation(c)) for c in reps])
        if n_permutations == 0 or not pairs or not np.diag(co).any():
            return value, np.full((E, E), np.nan), boot, np.full(n_permutations, np.nan)
        tokens = int(np.diag(co).sum() // self.top_k)
        draws = null_coactivation(np.diag(co), self.top_k, tokens, n_permutations, l)
        null_mean = np.mean(draws, axis=0) if draws else np.full((E, E), np.nan)
        return value, null_mean, boot, subset_scale(np.array([strongest_pair(d) for d in draws]),
                                                    min(tokens, NULL_TOKENS), tokens)

    def result(self, weights: np.ndarray | None = None, n_permutations: int = 16,
               layers: list[tuple] | None = None, **_: Any) -> Coactivation:
        """`layers`: the parts `strongest_layer` returned, in layer order, where they were computed apart."""
        if layers is None:
            layers = [self.strongest_layer(l, weights, n_permutations) for l in range(len(self.num_experts))]
        values, null_mean, boots, nulls = (list(x) for x in zip(*layers)) if layers else ([], [], [], [])
        per, overall = layer_estimates(values, stack_ragged(boots), stack_ragged(nulls),
                                       interval="95% bootstrap over sequences",
                                       null="k distinct experts per token drawn independently, weights fitted "
                                            "to the layer's load")
        co = [c.sum(axis=0) for c in self.co]
        tp, tn, tmi, tnull = [], [], [], []
        for m in self.trans:
            n = max(m.sum(), 1)
            rows = m.sum(axis=1, keepdims=True)
            tp.append(np.divide(m, rows, out=np.full(m.shape, np.nan), where=rows > 0))
            tn.append(np.outer(m.sum(axis=1), m.sum(axis=0)) / n**2)
            tmi.append(mutual_information(m) if m.sum() else float("nan"))
            tnull.append((m.shape[0] - 1) * (m.shape[1] - 1) / (2 * n))
        return Coactivation(
            counts=co, p_j_given_i=[conditional_coactivation(c) for c in co], null_p=null_mean,
            uniform_p=[(self.top_k - 1) / (E - 1) if E > 1 else float("nan") for E in self.num_experts],
            strongest=per, strongest_overall=overall,
            transitions=self.trans, transition_p=tp, transition_null=tn, transition_mi=tmi,
            transition_null_mi=tnull,
        )


def coactivation(trace_like: Any, num_experts: Sequence[int], top_k: int, *,
                 batch_rows: int = 1 << 20) -> Coactivation:
    """Co-activation and layer-to-layer transitions in one streaming pass (no null or interval: use
    `analyze_all` for those)."""
    acc = CoactivationAccumulator(num_experts, top_k)
    consume(regroup(iter_input(trace_like, acc.columns, batch_rows), token_key), [acc])
    return acc.result()
