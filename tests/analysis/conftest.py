"""Shared fixtures for the analysis tests: the independent reference vectors and a trace writer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from moelab.trace.io import TraceWriter, open_trace
from moelab.trace.schema import TraceMeta

VECTORS = Path(__file__).parents[3] / "shared/reference/vectors.json"


@pytest.fixture(scope="session")
def vectors() -> dict:
    if not VECTORS.is_file():
        pytest.skip(f"reference vectors not found at {VECTORS}")
    return json.loads(VECTORS.read_text())


@pytest.fixture
def write_trace(tmp_path):
    """write_trace(batches, num_experts, top_k, name=..., **meta) -> opened Trace."""

    def write(batches, num_experts, top_k, name="trace.parquet", row_group_rows=1 << 20, **meta):
        path = tmp_path / name
        with TraceWriter(path, TraceMeta(num_experts=list(num_experts), top_k=top_k, **meta),
                         row_group_rows=row_group_rows) as writer:
            for batch in batches:
                writer.write(batch)
        return open_trace(path)

    return write


def batch_from_choices(ids_LTK, *, tokens_T=None, seq_T=None, pos_T=None, probs_LTE=None, prob_LTK=None,
                       dropped_LTK=None, domain_T=None, turn_T=None):
    """A trace batch in (seq, pos, layer, rank) row order from per-layer T x K expert ids."""
    ids = np.asarray(ids_LTK)
    L, T, K = ids.shape
    seq_T = np.zeros(T, np.int64) if seq_T is None else np.asarray(seq_T)
    pos_T = np.arange(T) if pos_T is None else np.asarray(pos_T)
    tokens_T = np.arange(T) if tokens_T is None else np.asarray(tokens_T)

    def rows(a_T):  # per-token value -> one per (token, layer, rank) row
        return np.repeat(np.asarray(a_T), L * K)

    def tlk(a_LTK):  # L x T x K -> rows in (token, layer, rank) order
        return np.transpose(np.asarray(a_LTK), (1, 0, 2)).reshape(-1)

    prob = np.full(ids.shape, 0.5) if prob_LTK is None else np.asarray(prob_LTK)
    batch = {
        "seq": rows(seq_T).astype(np.int64), "pos": rows(pos_T).astype(np.int32),
        "token": rows(tokens_T).astype(np.int32),
        "layer": np.tile(np.repeat(np.arange(L), K), T).astype(np.int16),
        "rank": np.tile(np.arange(K), T * L).astype(np.int8), "expert": tlk(ids).astype(np.int16),
        "prob": tlk(prob).astype(np.float32),
        "dropped": np.zeros(ids.size, bool) if dropped_LTK is None else tlk(dropped_LTK).astype(bool),
        "turn": rows(np.full(T, -1) if turn_T is None else turn_T).astype(np.int16),
        "domain": rows(np.full(T, "none") if domain_T is None else domain_T),
    }
    if probs_LTE is not None:
        probs = np.transpose(np.asarray(probs_LTE), (1, 0, 2)).reshape(T * L, -1)
        batch["probs"] = probs.astype(np.float32)
        batch["probs.rows"] = np.flatnonzero(batch["rank"] == 0)
    return batch


@pytest.fixture
def make_batch():
    return batch_from_choices
