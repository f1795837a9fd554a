"""Which experts fire together: co-activation P(j | i) within a layer, and top-1 transitions from each
MoE layer to the next for the same token.

Nulls: uniform random top-k gives P(j | i) = (k - 1) / (E - 1) for j != i; independent layers give the
outer product of the two layers' top-1 marginals (and MI 0: the reported chance MI is the G-test's
(E_a - 1)(E_b - 1) / 2N, the bias of MI estimated from N tokens).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from moelab.analysis.common import (
    Batch, Result, check_experts, consume, iter_input, layer_choices, regroup, require_columns, token_key,
)
from moelab.analysis.null import mutual_information
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


@dataclasses.dataclass
class Coactivation(Result):
    counts: list[np.ndarray]        # per layer E x E co-occurrence counts
    p_j_given_i: list[np.ndarray]   # per layer E x E, diagonal 1
    null_p: list[float]             # (k - 1) / (E - 1)
    transitions: list[np.ndarray]   # per layer pair (l, l+1): E_l x E_{l+1} top-1 counts
    transition_p: list[np.ndarray]  # row-normalised: P(top-1 at l+1 = b | top-1 at l = a)
    transition_null: list[np.ndarray]  # independence: outer product of the marginals, as probabilities
    transition_mi: list[float]      # nats
    transition_null_mi: list[float]  # chance MI at this many tokens


class CoactivationAccumulator:
    """Needs token-complete batches (regroup by token): rows of one token across layers together."""

    columns = ("seq", "pos", "layer", "rank", "expert")

    def __init__(self, num_experts: Sequence[int], top_k: int):
        self.num_experts, self.top_k = list(num_experts), top_k
        self.co = [np.zeros((E, E), np.int64) for E in self.num_experts]
        self.trans = [np.zeros((a, b), np.int64) for a, b in zip(self.num_experts, self.num_experts[1:])]

    def update(self, batch: Batch) -> None:
        require_columns(batch, self.columns, "co-activation")
        check_experts(batch, self.num_experts)
        prev = None
        for l, E in enumerate(self.num_experts):
            tk = layer_choices(batch, l, self.top_k, ("expert", "seq", "pos"))
            self.co[l] += coactivation_counts(tk["expert"], E)
            cur = (tk["seq"][:, 0], tk["pos"][:, 0], tk["expert"][:, 0].astype(np.int64))
            if prev is not None:
                if not (np.array_equal(prev[0], cur[0]) and np.array_equal(prev[1], cur[1])):
                    raise MoelabError(f"layers {l - 1} and {l} cover different tokens: transitions need every layer")
                n_b = self.num_experts[l]
                self.trans[l - 1] += np.bincount(prev[2] * n_b + cur[2],
                                                 minlength=self.trans[l - 1].size).reshape(self.trans[l - 1].shape)
            prev = cur

    def result(self) -> Coactivation:
        tp, tn, tmi, tnull = [], [], [], []
        for m in self.trans:
            n = max(m.sum(), 1)
            rows = m.sum(axis=1, keepdims=True)
            tp.append(np.divide(m, rows, out=np.full(m.shape, np.nan), where=rows > 0))
            tn.append(np.outer(m.sum(axis=1), m.sum(axis=0)) / n**2)
            tmi.append(mutual_information(m) if m.sum() else float("nan"))
            tnull.append((m.shape[0] - 1) * (m.shape[1] - 1) / (2 * n))
        return Coactivation(
            counts=self.co, p_j_given_i=[conditional_coactivation(c) for c in self.co],
            null_p=[(self.top_k - 1) / (E - 1) if E > 1 else float("nan") for E in self.num_experts],
            transitions=self.trans, transition_p=tp, transition_null=tn, transition_mi=tmi,
            transition_null_mi=tnull,
        )


def coactivation(trace_like: Any, num_experts: Sequence[int], top_k: int, *,
                 batch_rows: int = 1 << 20) -> Coactivation:
    """Co-activation and layer-to-layer transitions in one streaming pass."""
    acc = CoactivationAccumulator(num_experts, top_k)
    consume(regroup(iter_input(trace_like, acc.columns, batch_rows), token_key), [acc])
    return acc.result()
