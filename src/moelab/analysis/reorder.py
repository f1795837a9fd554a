"""Neuron reordering (A Closer Look, Lo et al. 2024): do two experts hold the same neurons in another order?

Legend: F expert hidden dim (neurons), D model dim, X = the length of one neuron's vector.
Neuron f of an expert is (W_up[f, :], W_gate[f, :], W_down[:, f]); `neurons()` lays each part out as
F x D so that row f is neuron f's vector in that matrix.

Two definitions, named apart because their numbers are not comparable:

- `paper_reordering` (the paper's, its Table 2): each matrix is matched on its own. For W_up, the F x F
  cosine between expert a's neurons and expert b's is maximised by linear_sum_assignment; b's neurons
  are permuted by that matching; the number is the cosine of the two FLATTENED matrices after the
  permutation (so a neuron counts by its norm), with Kendall tau of the permutation against the identity.
  The same for W_gate and W_down, each with its own permutation.
- `joint_reordering` (moelab's earlier metric): ONE matching on the concatenated [up | gate | down^T]
  neuron vectors, and the MEAN of the per-neuron cosines (every neuron counts the same).

Baselines: independent random experts give a flattened cosine of 0 before matching; after it, the
maximum matching of noise is positive, so the null is the same procedure on Gaussian matrices of the same
shape (`reorder_null`). A matching unrelated to the neuron order has Kendall tau 0 with standard deviation
sqrt(2 (2F + 5) / (9 F (F - 1))) (the permutation distribution of tau, no ties).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Sequence

import numpy as np

from moelab.analysis.common import Result
from moelab.config import MoelabError

PARTS = ("up", "gate", "down")


def as_array(w: Any) -> np.ndarray:
    """numpy or torch -> float64 numpy (torch is only touched through duck typing)."""
    if hasattr(w, "detach"):
        w = w.detach().float().cpu().numpy()
    return np.asarray(w, dtype=np.float64)


def neurons(w_up_EFD: Any, w_gate_EFD: Any, w_down_EDF: Any) -> dict[str, np.ndarray]:
    """Each part as E x F x D: row f of expert e is neuron f's vector in that matrix (contiguous copies,
    so that the many matrix products of a layer's matchings run on plain memory)."""
    return {"up": part_neurons(w_up_EFD, "up"), "gate": part_neurons(w_gate_EFD, "gate"),
            "down": part_neurons(w_down_EDF, "down")}


def part_neurons(w: Any, part: str) -> np.ndarray:
    """One part of `neurons`: up and gate as given (E x F x D), down (E x D x F) transposed, in float64."""
    if part != "down":
        return as_array(w)
    return np.ascontiguousarray(np.swapaxes(as_array(w), 1, 2))


def layer_neurons(layer: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """`neurons` of one layer's weight dict (keys w_up_EFD, w_gate_EFD, w_down_EDF)."""
    return neurons(layer["w_up_EFD"], layer["w_gate_EFD"], layer["w_down_EDF"])


def count_inversions(values: np.ndarray) -> int:
    """Pairs i < j with values[i] > values[j], by a vectorised bottom-up merge: O(n log^2 n)."""
    n = len(values)
    if n < 2:
        return 0
    ranks = np.empty(n, np.int64)
    ranks[np.argsort(values, kind="stable")] = np.arange(n)  # ties keep order: not inversions
    size = 1 << (n - 1).bit_length()
    x = np.concatenate([ranks, np.arange(n, size)])  # padding larger than all and increasing: no inversions
    total, w = 0, 1
    while w < size:
        blocks = x.reshape(-1, 2 * w)
        offset = (np.arange(len(blocks)) * size)[:, None]  # separates the blocks in one global search
        left, right = (blocks[:, :w] + offset).reshape(-1), (blocks[:, w:] + offset).reshape(-1)
        not_greater = np.searchsorted(left, right, side="right") - np.repeat(np.arange(len(blocks)) * w, w)
        total += int((w - not_greater).sum())
        x = np.sort(blocks, axis=1).reshape(-1)
        w *= 2
    return total


def kendall_tau(perm: np.ndarray) -> float:
    """Kendall tau of a sequence against the identity order: 1 sorted, -1 reversed, ~0 random."""
    n = len(perm)
    if n < 2:
        return float("nan")
    return 1.0 - 4.0 * count_inversions(np.asarray(perm)) / (n * (n - 1))


def kendall_tau_null_sd(n: int) -> float:
    """Standard deviation of tau over uniformly random permutations of n items."""
    return float(np.sqrt(2.0 * (2 * n + 5) / (9.0 * n * (n - 1)))) if n > 1 else float("nan")


def neuron_cosine(a_FX: np.ndarray, b_FX: np.ndarray) -> np.ndarray:
    """F x F cosine between neuron f of a and neuron g of b (zero neurons give 0)."""
    an = a_FX / np.maximum(np.linalg.norm(a_FX, axis=1, keepdims=True), 1e-300)
    bn = b_FX / np.maximum(np.linalg.norm(b_FX, axis=1, keepdims=True), 1e-300)
    return an @ bn.T


def best_matching(cos_FF: np.ndarray) -> np.ndarray:
    """perm with neuron f of a matched to neuron perm[f] of b, maximising the summed cosine."""
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError:  # pragma: no cover
        raise MoelabError("neuron reordering needs scipy (pip install scipy)") from None
    rows, cols = linear_sum_assignment(cos_FF, maximize=True)
    return cols[np.argsort(rows)]


def flat_cosine(a_FX: np.ndarray, b_FX: np.ndarray) -> float:
    """Cosine of the two matrices flattened (0 when either is all zeros)."""
    den = float(np.linalg.norm(a_FX) * np.linalg.norm(b_FX))
    return float((a_FX * b_FX).sum() / den) if den > 0 else 0.0


@dataclasses.dataclass
class PartMatch(Result):
    perm: np.ndarray     # neuron f of expert a matches neuron perm[f] of expert b, in this matrix alone
    flat_cos_before: float  # cosine of the flattened matrices as stored
    flat_cos_after: float   # the same after permuting b's neurons by perm (the paper's Table 2 number)
    kendall_tau: float   # of perm vs identity (1: the matching keeps the order)


def match_part(a_FX: np.ndarray, b_FX: np.ndarray) -> PartMatch:
    perm = best_matching(neuron_cosine(a_FX, b_FX))
    return PartMatch(perm=perm, flat_cos_before=flat_cosine(a_FX, b_FX),
                     flat_cos_after=flat_cosine(a_FX, b_FX[perm]), kendall_tau=kendall_tau(perm))


def paper_reordering(n: Mapping[str, np.ndarray], a: int, b: int,
                     parts: Sequence[str] = PARTS) -> dict[str, PartMatch]:
    """The paper's reordering of experts a and b (`n` from `layer_neurons`): part -> its own matching."""
    return {p: match_part(n[p][a], n[p][b]) for p in parts}


@functools.lru_cache(maxsize=16)
def reorder_null(F: int, D: int, seed: int = 0, draws: int = 5) -> tuple[float, float]:
    """flat_cos_after of independent Gaussian F x D matrix pairs: what a best matching of noise reaches,
    as (mean, standard deviation) over `draws` pairs. Cached: every layer and part of one shape shares it."""
    rng = np.random.default_rng(seed)
    values = [match_part(rng.standard_normal((F, D)), rng.standard_normal((F, D))).flat_cos_after
              for _ in range(draws)]
    return float(np.mean(values)), float(np.std(values, ddof=1)) if draws > 1 else float("nan")


@dataclasses.dataclass
class JointMatch(Result):
    perm: np.ndarray           # one matching for all parts: neuron f of a <-> neuron perm[f] of b
    mean_neuron_cos_before: float  # mean over f of cos(neuron f of a, neuron f of b), [up|gate|down^T]
    mean_neuron_cos_after: float   # mean over f of cos(neuron f of a, neuron perm[f] of b)
    kendall_tau: float         # of perm vs identity
    null_after: float | None   # the same on Gaussian weights of this shape, each part at its own scale
    null_tau: float = 0.0      # a matching unrelated to the neuron order


def _scaled_noise(n: Mapping[str, np.ndarray], e: int, parts: Sequence[str], rng) -> np.ndarray:
    """Gaussian neurons of expert e's shape, each part at that part's spread: parts initialised at
    different scales (moelab's down projection starts smaller) weigh in the concatenation as they do."""
    return np.concatenate([rng.standard_normal(n[p][e].shape) * n[p][e].std() for p in parts], axis=1)


def joint_reordering(n: Mapping[str, np.ndarray], a: int, b: int, *, parts: Sequence[str] = PARTS,
                     null_seed: int | None = 0) -> JointMatch:
    """moelab's earlier metric (`n` from `layer_neurons`): one matching on the concatenation of `parts`,
    mean per-neuron cosine."""
    cos_FF = neuron_cosine(*(np.concatenate([n[p][e] for p in parts], axis=1) for e in (a, b)))
    perm = best_matching(cos_FF)
    null = None
    if null_seed is not None:
        rng = np.random.default_rng(null_seed)
        noise_FF = neuron_cosine(_scaled_noise(n, a, parts, rng), _scaled_noise(n, b, parts, rng))
        null = float(noise_FF[np.arange(len(perm)), best_matching(noise_FF)].mean())
    return JointMatch(perm=perm, mean_neuron_cos_before=float(np.diag(cos_FF).mean()),
                      mean_neuron_cos_after=float(cos_FF[np.arange(len(perm)), perm].mean()),
                      kendall_tau=kendall_tau(perm), null_after=null)
