"""A Closer Look's static analyses, from the weights alone (numpy or torch arrays, one set per MoE layer):
`w_up_EFD`, `w_gate_EFD`, `w_down_EDF` (down as E x D x F so neuron i is column i) and `w_router_ED`.
Neuron i of an expert is (W_up[i, :], W_gate[i, :], W_down[:, i]).

- Matrix-level similarity: cosine of the flattened matrices of every expert pair (E x E).
- Neuron averaging: each expert reduced to its mean neuron, cosine across experts (E x E).
- Neuron reordering: the best one-to-one neuron matching of two experts (linear_sum_assignment on the
  F x F neuron cosine, maximised), the mean cosine before/after, and Kendall tau of the matching.
- Router rows vs experts: cosine of router rows against the averaged-neuron similarity of up / gate / down
  over expert pairs i < j; linear-regression R^2 per layer and averaged.
- RMoE's expert similarity: mean of the Gram matrix of the normalised averaged expert weights.
Nulls: random init gives cosine ~0, tau ~0, R^2 ~ 1/(pairs - 1); reordering's null is the same matching
on Gaussian weights of the same shape (a maximum matching of noise is not 0).
"""

from __future__ import annotations

import dataclasses
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


def neurons(w_up_EFD: Any, w_gate_EFD: Any, w_down_EDF: Any) -> dict[str, np.ndarray]:
    """Each part as E x F x D: row f of expert e is neuron f's vector in that matrix."""
    return {"up": as_array(w_up_EFD), "gate": as_array(w_gate_EFD),
            "down": np.swapaxes(as_array(w_down_EDF), 1, 2)}


def averaged_neurons(w_up_EFD: Any, w_gate_EFD: Any, w_down_EDF: Any) -> dict[str, np.ndarray]:
    """Each expert reduced to its mean neuron, per part: E x D."""
    return {name: w.mean(axis=1) for name, w in neurons(w_up_EFD, w_gate_EFD, w_down_EDF).items()}


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


@dataclasses.dataclass
class NeuronMatch(Result):
    perm: np.ndarray          # neuron f of expert a matches neuron perm[f] of expert b
    similarity_before: float  # mean cosine of neuron f with neuron f
    similarity_after: float   # mean cosine of neuron f with neuron perm[f]
    kendall_tau: float        # of perm vs identity
    null_after: float | None  # the same matching on Gaussian weights of the same shape
    null_tau: float = 0.0     # a matching unrelated to the neuron order


def _match(a_FX: np.ndarray, b_FX: np.ndarray) -> tuple[np.ndarray, float, float]:
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError:  # pragma: no cover
        raise MoelabError("neuron reordering needs scipy (pip install scipy)") from None
    an = a_FX / np.maximum(np.linalg.norm(a_FX, axis=1, keepdims=True), 1e-300)
    bn = b_FX / np.maximum(np.linalg.norm(b_FX, axis=1, keepdims=True), 1e-300)
    cos_FF = an @ bn.T
    rows, cols = linear_sum_assignment(cos_FF, maximize=True)
    perm = cols[np.argsort(rows)]
    return perm, float(np.diag(cos_FF).mean()), float(cos_FF[np.arange(len(perm)), perm].mean())


def neuron_reordering(layer: Mapping[str, Any], a: int, b: int, *, parts: Sequence[str] = PARTS,
                      null_seed: int | None = 0) -> NeuronMatch:
    """Best neuron matching between experts a and b; neurons are the concatenation of `parts`."""
    n = neurons(layer["w_up_EFD"], layer["w_gate_EFD"], layer["w_down_EDF"])
    x_EFX = np.concatenate([n[p] for p in parts], axis=2)
    perm, before, after = _match(x_EFX[a], x_EFX[b])
    null = None
    if null_seed is not None:
        rng = np.random.default_rng(null_seed)
        _, _, null = _match(rng.standard_normal(x_EFX[a].shape), rng.standard_normal(x_EFX[b].shape))
    return NeuronMatch(perm=perm, similarity_before=before, similarity_after=after,
                       kendall_tau=kendall_tau(perm), null_after=null)


def r_squared(x: np.ndarray, y: np.ndarray) -> float:
    """R^2 of the least-squares line y ~ a + b x (the squared Pearson correlation)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if len(x) < 2 or x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1] ** 2)


def gram_mean(avg_ED: np.ndarray, include_diagonal: bool = True) -> float:
    """RMoE: mean of the E x E Gram matrix of row-normalised averaged expert weights."""
    g = cosine_matrix(avg_ED)
    return float(g.mean() if include_diagonal else upper(g).mean())


def pca_explained_variance(x_NX: Any, n_components: int = 10) -> np.ndarray:
    """Share of variance along the top principal components of the rows of x (Gram trick when N < X)."""
    x = as_array(x_NX)
    x = x.reshape(x.shape[0], -1) - x.reshape(x.shape[0], -1).mean(axis=0)
    s = np.linalg.svd(x @ x.T if x.shape[0] < x.shape[1] else x.T @ x, compute_uv=False)
    total = s.sum()
    return s[:n_components] / total if total > 0 else np.zeros(min(n_components, len(s)))


@dataclasses.dataclass
class WeightLayer(Result):
    matrix_cos: dict[str, np.ndarray]     # part -> E x E cosine of flattened matrices
    averaged_cos: dict[str, np.ndarray]   # part -> E x E cosine of mean neurons
    router_cos: np.ndarray | None         # E x E cosine of router rows
    router_r2: dict[str, float]           # part -> R^2 of averaged_cos ~ router_cos over pairs i < j
    gram_mean: dict[str, float]           # part -> RMoE expert similarity (diagonal included)
    gram_mean_offdiag: dict[str, float]
    reorder: dict[str, NeuronMatch]       # "a-b" -> matching


@dataclasses.dataclass
class WeightAnalysis(Result):
    layers: list[WeightLayer]
    router_r2_mean: dict[str, float]      # part -> mean over layers
    null_r2: float                        # 1 / (pairs - 1): independent similarities
    null_cosine: float                    # 0: random init


def weight_analysis(layers: Sequence[Mapping[str, Any]], *, reorder_pairs: Sequence[tuple[int, int]] = (),
                    null_seed: int | None = 0) -> WeightAnalysis:
    """All static analyses, layer by layer; `w_router_ED` may be absent (no router regression then)."""
    out, E = [], None
    for layer in layers:
        missing = [k for k in ("w_up_EFD", "w_gate_EFD", "w_down_EDF") if k not in layer]
        if missing:
            raise MoelabError(f"weight analysis needs {missing[0]} for every layer")
        E = as_array(layer["w_up_EFD"]).shape[0]
        mats = {"up": layer["w_up_EFD"], "gate": layer["w_gate_EFD"], "down": layer["w_down_EDF"]}
        avg = averaged_neurons(layer["w_up_EFD"], layer["w_gate_EFD"], layer["w_down_EDF"])
        avg_cos = {p: cosine_matrix(a) for p, a in avg.items()}
        router = cosine_matrix(layer["w_router_ED"]) if "w_router_ED" in layer else None
        r2 = {p: r_squared(upper(router), upper(c)) for p, c in avg_cos.items()} if router is not None else {}
        reorder = {f"{a}-{b}": neuron_reordering(layer, a, b, null_seed=null_seed) for a, b in reorder_pairs}
        out.append(WeightLayer(
            matrix_cos={p: matrix_similarity(m) for p, m in mats.items()}, averaged_cos=avg_cos,
            router_cos=router, router_r2=r2, gram_mean={p: gram_mean(a) for p, a in avg.items()},
            gram_mean_offdiag={p: gram_mean(a, include_diagonal=False) for p, a in avg.items()}, reorder=reorder,
        ))
    r2_mean = {p: float(np.nanmean([lay.router_r2[p] for lay in out])) for p in PARTS
               if out and all(p in lay.router_r2 for lay in out)}
    pairs = (E or 0) * ((E or 0) - 1) // 2
    return WeightAnalysis(layers=out, router_r2_mean=r2_mean,
                          null_r2=1.0 / (pairs - 1) if pairs > 1 else float("nan"), null_cosine=0.0)
