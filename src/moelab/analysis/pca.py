"""Principal components of expert weights (A Closer Look's projection of expert matrices to 2-D).

Legend: N points (the experts of a layer, plus the dense reference FFN where there is one), X the length
of one flattened weight matrix (F * D), C components kept.

The paper flattens each expert's W_up (or W_gate, or W_down) into one row, z-scores every column over
the rows (mean 0, standard deviation 1 with the N - 1 divisor), and projects the rows on the top two
principal components. A column where every expert holds the same value has no spread to scale: moelab
sets it to 0 (it carries no information about which expert is which) where the paper's division would
give NaN.

Baseline: experts whose weights are independent draws of one distribution are exchangeable, so the
centred Gram matrix of N such rows is, in expectation, proportional to I - 11^T / N: its N - 1 nonzero
eigenvalues are equal and each component explains 1 / (N - 1) of the variance. C components explain
C / (N - 1) (the limit X >> N; with few columns the top components of noise take somewhat more).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from moelab.analysis.common import Result


def _matrix(x: Any, dtype: Any = np.float64) -> np.ndarray:
    """Rows flattened; dtype None keeps the stored precision (a block is converted when it is used)."""
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    x = np.asarray(x, dtype=dtype)
    return x.reshape(x.shape[0], -1)


def zscore_columns(x_NX: Any) -> np.ndarray:
    """Each column to mean 0 and (N - 1)-divisor standard deviation 1; constant columns to 0."""
    x = _matrix(x_NX)
    centred = x - x.mean(axis=0)
    sd = x.std(axis=0, ddof=1) if x.shape[0] > 1 else np.zeros(x.shape[1])
    return np.divide(centred, sd, out=np.zeros_like(centred), where=sd > 0)


def _sign_fixed(u_NC: np.ndarray) -> np.ndarray:
    """An eigenvector's sign is arbitrary: make each column's largest |entry| positive (reproducible)."""
    idx = np.abs(u_NC).argmax(axis=0)
    return u_NC * np.sign(u_NC[idx, np.arange(u_NC.shape[1])])


@dataclasses.dataclass
class Projection(Result):
    coords: np.ndarray        # N x C: each row projected on the top C principal components
    explained: np.ndarray     # C: share of the total variance along each component
    null_explained: float     # 1 / (N - 1): each component's share for exchangeable random rows


def centred_gram(x_NX: Any, *, zscore: bool = True, chunk: int = 1 << 16) -> np.ndarray:
    """N x N Gram matrix of the z-scored (or only centred) rows, a block of columns at a time, so a large
    flattened matrix never needs a second full-size copy."""
    x = _matrix(x_NX, dtype=None)
    gram = np.zeros((x.shape[0], x.shape[0]))
    for start in range(0, x.shape[1], chunk):
        block = x[:, start:start + chunk]
        block = zscore_columns(block) if zscore else block - block.mean(axis=0)
        gram += block @ block.T
    return gram


def project(x_NX: Any, n_components: int = 2, *, zscore: bool = True) -> Projection:
    """Rows of x on their top principal components, by the N x N Gram matrix (N is small, X is not)."""
    gram = centred_gram(x_NX, zscore=zscore)
    N = gram.shape[0]
    C = max(0, min(n_components, N - 1))
    lam, u = np.linalg.eigh(gram)  # ascending
    lam, u = np.clip(lam[::-1], 0.0, None), u[:, ::-1]
    total = float(lam.sum())
    coords = _sign_fixed(u[:, :C]) * np.sqrt(lam[:C])  # = z @ (unit principal axes)
    explained = lam[:C] / total if total > 0 else np.zeros(C)
    return Projection(coords=coords, explained=explained,
                      null_explained=1.0 / (N - 1) if N > 1 else float("nan"))


def pca_explained_variance(x_NX: Any, n_components: int = 10) -> np.ndarray:
    """Share of variance along the top principal components of the rows of x (centred, not z-scored)."""
    x = _matrix(x_NX)
    x = x - x.mean(axis=0)
    s = np.linalg.svd(x @ x.T if x.shape[0] < x.shape[1] else x.T @ x, compute_uv=False)
    total = s.sum()
    return s[:n_components] / total if total > 0 else np.zeros(min(n_components, len(s)))
