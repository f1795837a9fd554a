"""Static analyses from the weights alone (A Closer Look; RMoE's expert similarity), one set per MoE layer.

Legend: E experts, F expert hidden dim, D model dim, P parts (up, gate, down).
Input per layer (numpy or torch): `w_up_EFD`, `w_gate_EFD`, `w_down_EDF` (down as E x D x F so neuron f
is column f), optionally `w_router_ED`, and optionally a dense reference FFN of the same width:
`ref_w_up_FD`, `ref_w_gate_FD`, `ref_w_down_DF` with `ref_name` saying what it is.

Definitions, each with the number a random initialisation gives (experts' weights drawn i.i.d.):
- Matrix-level similarity: cosine of the flattened matrices of every expert pair (E x E).
  Random init: 0, standard deviation 1/sqrt(F D) per pair.
- Neuron averaging: each expert reduced to its mean neuron (D values per part), cosine across experts.
  Random init: 0, standard deviation 1/sqrt(D) per pair.
- Router rows vs experts: R^2 of the line relating router-row cosine to averaged-neuron cosine over
  pairs i < j. Unrelated similarities: R^2 ~ 1/(pairs - 1), per layer with that layer's E.
- RMoE's expert similarity (`rmoe_similarity`, the paper's code): per part, normalise each expert's
  averaged neuron to unit length, concatenate the P parts into one vector per expert, and take the mean
  of the E x E Gram matrix, diagonal included. Each diagonal entry is P and an off-diagonal entry is
  a sum of P cosines, so random init gives P/E (3/E) with standard deviation 2 sqrt(P pairs / D) / E^2
  (pairwise cosines of independent isotropic vectors are uncorrelated with variance 1/D).
- moelab's per-part Gram means (`gram_mean`, `gram_mean_offdiag`): the same per part without the
  concatenation; random init gives 1/E (diagonal included) and 0 +- 1/sqrt(D pairs) (pairs i < j).
- Neuron reordering, the paper's per-matrix version and moelab's joint one: see `reorder.py`.
- PCA: z-scored flattened matrices (experts, then the reference) on two components: see `pca.py`.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Mapping, Sequence

import numpy as np

from moelab.analysis.common import Result
from moelab.analysis.pca import Projection, pca_explained_variance, project
from moelab.analysis.reorder import (  # noqa: F401 - count_inversions, kendall_tau: read from here too
    PARTS, JointMatch, as_array, count_inversions, joint_reordering, kendall_tau, kendall_tau_null_sd,
    neurons, paper_reordering, part_neurons, reorder_null,
)
from moelab.config import MoelabError

__all__ = ["PARTS", "WeightAnalysis", "WeightLayer", "averaged_neurons", "cosine_matrix", "gram_mean",
           "joint_reordering", "matrix_similarity", "paper_reordering", "pca_explained_variance",
           "reorder_pairs_within", "rmoe_null", "rmoe_similarity", "weight_analysis"]
REF_KEYS = {"up": "ref_w_up_FD", "gate": "ref_w_gate_FD", "down": "ref_w_down_DF"}


def cosine_matrix(x_NX: np.ndarray) -> np.ndarray:
    """N x N cosine similarity of the rows of x (zero rows give 0)."""
    x = as_array(x_NX)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    u = np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)
    return u @ u.T


def upper(m_EE: np.ndarray) -> np.ndarray:
    """The i < j entries, row-major."""
    return m_EE[np.triu_indices(m_EE.shape[0], 1)]


def matrix_similarity(w_E__: Any) -> np.ndarray:
    """E x E cosine between experts' flattened weight matrices."""
    w = as_array(w_E__)
    return cosine_matrix(w.reshape(w.shape[0], -1))


def averaged_neurons(w_up_EFD: Any, w_gate_EFD: Any, w_down_EDF: Any) -> dict[str, np.ndarray]:
    """Each expert reduced to its mean neuron, per part: E x D."""
    return {name: w.mean(axis=1) for name, w in neurons(w_up_EFD, w_gate_EFD, w_down_EDF).items()}


def r_squared(x: np.ndarray, y: np.ndarray) -> float:
    """R^2 of the least-squares line y ~ a + b x (the squared Pearson correlation)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if len(x) < 2 or x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1] ** 2)


def gram_mean(avg_ED: np.ndarray, include_diagonal: bool = True) -> float:
    """moelab's per-part expert similarity: mean of the Gram matrix of row-normalised averaged weights."""
    g = cosine_matrix(avg_ED)
    return float(g.mean() if include_diagonal else upper(g).mean())


def rmoe_similarity(avg: Mapping[str, np.ndarray], parts: Sequence[str] = PARTS) -> float:
    """RMoE's expert similarity: mean of the E x E Gram matrix of [unit(avg_up) | unit(avg_gate) | ...]."""
    units = []
    for p in parts:
        a = as_array(avg[p])
        norm = np.linalg.norm(a, axis=1, keepdims=True)
        units.append(np.divide(a, norm, out=np.zeros_like(a), where=norm > 0))
    v_EX = np.concatenate(units, axis=1)
    return float((v_EX @ v_EX.T).mean())


def rmoe_null(E: int, D: int, n_parts: int = len(PARTS)) -> tuple[float, float]:
    """rmoe_similarity of i.i.d. random experts: mean n_parts / E and its standard deviation."""
    pairs = E * (E - 1) / 2
    return n_parts / E, 2.0 * float(np.sqrt(pairs * n_parts / D)) / E**2


def reorder_pairs_within(E: int, F: int, budget: float = 4e7) -> list[tuple[int, int]]:
    """Expert pairs for neuron reordering: all of them while pairs * 3 matchings of F x F fit `budget`
    (in F^2 units: at F = 2048 one pair's three matchings took about 1 s on this 2-core machine, and 4e7
    allows 3 such pairs), else the first ones in (0, 1), (0, 2), ... order (at least one)."""
    pairs = list(itertools.combinations(range(E), 2))
    return pairs[: max(1, int(budget // (3 * F * F)))] if pairs else []


def reference_parts(layer: Mapping[str, Any], F: int, D: int) -> dict[str, np.ndarray] | None:
    """The dense reference FFN as F x D neuron matrices per part, or None when absent or of another width."""
    if not all(k in layer for k in REF_KEYS.values()):
        return None
    ref = {"up": as_array(layer[REF_KEYS["up"]]), "gate": as_array(layer[REF_KEYS["gate"]]),
           "down": as_array(layer[REF_KEYS["down"]]).T}
    return ref if all(r.shape == (F, D) for r in ref.values()) else None


@dataclasses.dataclass
class PaperReorder(Result):
    """The paper's reordering over expert pairs of one layer, per part (up / gate / down)."""
    pairs: list[tuple[int, int]]
    flat_cos_after: dict[str, np.ndarray]   # part -> E x E, NaN for pairs not matched, 1 on the diagonal
    mean_before: dict[str, float]           # part -> mean over pairs of the flattened cosine as stored
    mean_after: dict[str, float]            # ... after each pair's own matching (the paper's Table 2)
    mean_tau: dict[str, float]              # ... Kendall tau of the matchings
    null_after: dict[str, float]            # part -> the same on two Gaussian matrices of this shape
    null_after_sd: float                    # its spread over 5 such pairs (one cell of the heatmap)
    null_tau_sd: float                      # sd of tau for an order-blind matching (its mean is 0)


def paper_reorder_layer(n: Mapping[str, np.ndarray], pairs: Sequence[tuple[int, int]], null_seed: int = 0
                        ) -> PaperReorder:
    """The paper's reordering of every pair in `pairs`; `n` is the layer's neurons (part -> E x F x D)."""
    E, F, D = n["up"].shape
    after = {p: np.full((E, E), np.nan) for p in PARTS}
    for m in after.values():
        np.fill_diagonal(m, 1.0)
    before, after_pairs, taus = ({p: [] for p in PARTS} for _ in range(3))
    for a, b in pairs:
        for p, match in paper_reordering(n, a, b).items():
            after[p][a, b] = after[p][b, a] = match.flat_cos_after
            before[p].append(match.flat_cos_before)
            after_pairs[p].append(match.flat_cos_after)
            taus[p].append(match.kendall_tau)
    null, null_sd = reorder_null(F, D, null_seed)  # every part is F x D: one simulation serves all three
    return PaperReorder(
        pairs=[tuple(p) for p in pairs], flat_cos_after=after,
        mean_before={p: float(np.mean(before[p])) for p in PARTS},
        mean_after={p: float(np.mean(after_pairs[p])) for p in PARTS},
        mean_tau={p: float(np.mean(taus[p])) for p in PARTS},
        null_after={p: null for p in PARTS}, null_after_sd=null_sd, null_tau_sd=kendall_tau_null_sd(F))


@dataclasses.dataclass
class WeightLayer(Result):
    matrix_cos: dict[str, np.ndarray]     # part -> E x E cosine of flattened matrices
    averaged_cos: dict[str, np.ndarray]   # part -> E x E cosine of mean neurons
    matrix_null_sd: float                 # 1/sqrt(F D): spread of one pair's matrix cosine at random init
    averaged_null_sd: float               # 1/sqrt(D): the same for averaged neurons
    router_cos: np.ndarray | None         # E x E cosine of router rows
    router_r2: dict[str, float]           # part -> R^2 of averaged_cos ~ router_cos over pairs i < j
    null_r2: float                        # 1 / (pairs - 1) with this layer's E
    gram_mean: dict[str, float]           # part -> moelab's per-part Gram mean (diagonal included)
    gram_mean_offdiag: dict[str, float]   # part -> the same over pairs i < j; random init 0
    gram_offdiag_null_sd: float           # 1/sqrt(D pairs)
    rmoe_similarity: float                # RMoE's definition (concatenated normalised parts)
    rmoe_null: float                      # 3/E
    rmoe_null_sd: float
    reference: str                        # what the dense reference FFN is ("" when there is none)
    matrix_ref_cos: dict[str, np.ndarray]    # part -> E: each expert vs the reference, flattened matrices
    averaged_ref_cos: dict[str, np.ndarray]  # part -> E: the same with averaged neurons
    pca: dict[str, Projection]            # part -> z-scored flattened matrices in 2-D (reference last)
    paper_reorder: PaperReorder | None    # the paper's per-matrix neuron reordering
    joint_reorder: dict[str, JointMatch]  # "a-b" -> moelab's joint matching (mean per-neuron cosine)


def _reference_cos(stack_EX: np.ndarray, ref_X: np.ndarray) -> np.ndarray:
    return cosine_matrix(np.vstack([stack_EX, ref_X[None]]))[-1, :-1]


class _ExpertRows(dict):
    """expert -> its F x D neuron rows of one part, for the experts the reorderings match; `shape` is the
    whole part's E x F x D, as the reorderings read it."""

    def __init__(self, rows: dict[int, np.ndarray], shape: tuple[int, int, int]):
        super().__init__(rows)
        self.shape = shape


def analyse_layer(layer: Mapping[str, Any], pairs: Sequence[tuple[int, int]], null_seed: int | None) -> WeightLayer:
    missing = [k for k in ("w_up_EFD", "w_gate_EFD", "w_down_EDF") if k not in layer]
    if missing:
        raise MoelabError(f"weight analysis needs {missing[0]} for every layer")
    E, F, D = np.shape(layer["w_up_EFD"])
    ref = reference_parts(layer, F, D)
    matched = sorted({e for pair in pairs for e in pair})
    matrix_cos, avg, matrix_ref_cos, pca, n = {}, {}, {}, {}, {}
    # One part in float64 at a time, keeping of it only the means and the matched experts' rows: all three
    # parts with their working copies took 2.7-3.3x the layer's float32 size (4-5 GiB an OLMoE layer).
    for p, key in (("up", "w_up_EFD"), ("gate", "w_gate_EFD"), ("down", "w_down_EDF")):
        w_EFD = part_neurons(layer[key], p)
        flat = w_EFD.reshape(E, -1)  # down flattened as F x D: a reordering, same cosine
        matrix_cos[p] = cosine_matrix(flat)
        avg[p] = w_EFD.mean(axis=1)
        if ref is not None:
            matrix_ref_cos[p] = _reference_cos(flat, ref[p].reshape(-1))
        pca[p] = project(flat if ref is None else np.vstack([flat, ref[p].reshape(1, -1)]))
        n[p] = _ExpertRows({e: w_EFD[e].copy() for e in matched}, (E, F, D))
        del w_EFD, flat
    avg_cos = {p: cosine_matrix(a) for p, a in avg.items()}
    router = cosine_matrix(layer["w_router_ED"]) if "w_router_ED" in layer else None
    pairs_n = E * (E - 1) // 2
    rn, rsd = rmoe_null(E, D) if pairs_n else (float("nan"), float("nan"))  # one expert: nothing to compare
    return WeightLayer(
        matrix_cos=matrix_cos, averaged_cos=avg_cos,
        matrix_null_sd=1 / np.sqrt(F * D), averaged_null_sd=1 / np.sqrt(D), router_cos=router,
        router_r2={p: r_squared(upper(router), upper(c)) for p, c in avg_cos.items()} if router is not None else {},
        null_r2=1.0 / (pairs_n - 1) if pairs_n > 1 else float("nan"),
        gram_mean={p: gram_mean(a) for p, a in avg.items()},
        gram_mean_offdiag={p: gram_mean(a, include_diagonal=False) if E > 1 else float("nan")
                           for p, a in avg.items()},
        gram_offdiag_null_sd=1 / np.sqrt(D * pairs_n) if pairs_n else float("nan"),
        rmoe_similarity=rmoe_similarity(avg) if pairs_n else float("nan"), rmoe_null=rn, rmoe_null_sd=rsd,
        reference=str(layer.get("ref_name", "dense reference FFN")) if ref is not None else "",
        matrix_ref_cos=matrix_ref_cos,
        averaged_ref_cos={p: _reference_cos(avg[p], ref[p].mean(axis=0)) for p in PARTS} if ref is not None else {},
        pca=pca,
        paper_reorder=paper_reorder_layer(n, pairs, null_seed or 0) if pairs else None,
        joint_reorder={f"{a}-{b}": joint_reordering(n, a, b, null_seed=null_seed) for a, b in pairs},
    )


@dataclasses.dataclass
class WeightAnalysis(Result):
    layers: list[WeightLayer]
    router_r2_mean: dict[str, float]      # part -> mean over layers
    null_r2: float                        # mean over layers of each layer's 1 / (pairs - 1)
    null_cosine: float                    # 0: random init
    rmoe_similarity_mean: float           # mean over layers of RMoE's expert similarity
    rmoe_null_mean: float                 # mean over layers of 3/E


def _analyse(layer: Mapping[str, Any], reorder_pairs: Sequence[tuple[int, int]], null_seed: int | None):
    E = layer["w_up_EFD"].shape[0] if "w_up_EFD" in layer else 0
    return analyse_layer(layer, [(a, b) for a, b in reorder_pairs if max(a, b) < E], null_seed)


def weight_analysis(layers: Sequence[Mapping[str, Any]], *, reorder_pairs: Sequence[tuple[int, int]] = (),
                    null_seed: int | None = 0) -> WeightAnalysis:
    """All static analyses, layer by layer; `w_router_ED` may be absent (no router regression then).
    `reorder_pairs` are the expert pairs matched by both neuron reorderings (each layer that has them)."""
    out = []
    for i in range(len(layers)):  # by index: a lazily read layer (trace.weights.WeightLayers) dies after its turn
        out.append(_analyse(layers[i], reorder_pairs, null_seed))

    def mean(values: list[float]) -> float:  # over the finite values; nan, without a warning, when none is
        finite = [v for v in values if np.isfinite(v)]
        return float(np.mean(finite)) if finite else float("nan")

    r2_mean = {p: mean([lay.router_r2[p] for lay in out]) for p in PARTS
               if out and all(p in lay.router_r2 for lay in out)}
    return WeightAnalysis(layers=out, router_r2_mean=r2_mean, null_r2=mean([lay.null_r2 for lay in out]),
                          null_cosine=0.0, rmoe_similarity_mean=mean([lay.rmoe_similarity for lay in out]),
                          rmoe_null_mean=mean([lay.rmoe_null for lay in out]))
