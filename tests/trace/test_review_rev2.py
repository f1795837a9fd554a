"""Review of the top:N / float16 probs work (rev2): edge cases with a known answer.

Legend: T tokens, E experts, K experts per token, N probabilities kept by top:N.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moelab.model.moe import LayerRouting
from moelab.trace.build import keep_probs
from moelab.trace.capture import CapturedLayer
from moelab.trace.io import TraceWriter, open_trace
from moelab.trace.schema import TraceMeta
from moelab.trace.validate import BatchValidator


def captured(probs_TE: torch.Tensor, ids_TK: torch.Tensor) -> CapturedLayer:
    T, K = ids_TK.shape
    r = LayerRouting(0, ids_TK, probs_TE.gather(1, ids_TK), probs_TE, torch.zeros(T, K, dtype=torch.bool),
                     probs_TE.log())
    return CapturedLayer(routing=r)


def test_top_n_ties_go_to_the_lower_expert_as_the_router_breaks_them():
    # a uniform row (a router at init, a hash router's table) and a row with a three-way tie below the top:
    # the router's own rule (routers.top_k_stable) gives ties to the lower expert; torch.topk promises no order
    E, N = 64, 8
    probs_TE = torch.full((3, E), 1.0 / E)
    probs_TE[1] = torch.linspace(0.5, 1.5, E).flip(0)
    probs_TE[1, [5, 9, 40]] = 2.0
    probs_TE[1] /= probs_TE[1].sum()
    probs_TE[2] = probs_TE[2].half().float()  # float16-rounded, as a bf16/fp16 model's softmax ties often
    ids_TK = torch.tensor([[0, 1], [5, 9], [0, 1]])
    out = keep_probs([captured(probs_TE, ids_TK)], f"top:{N}")[0]
    # naive reference: sort (value descending, expert ascending) with Python's sort
    ref = [sorted(range(E), key=lambda e: (-float(row[e]), e))[:N] for row in probs_TE]
    assert out.topn_ids_TN.tolist() == ref
    np.testing.assert_array_equal(out.topn_probs_TN.numpy(), probs_TE.gather(1, torch.tensor(ref)).numpy())
    # the chosen experts lead the top-N where the router chose them by these probabilities
    assert out.topn_ids_TN[:, :2].tolist() == ids_TK.tolist()


def write_topn_trace(path, K=2, N=3, E=6, tokens=4):
    meta = TraceMeta(num_experts=[E], top_k=K, probs_mode=f"top:{N}")
    rng = np.random.default_rng(0)
    ids = np.stack([rng.permutation(E)[:N] for _ in range(tokens)]).astype(np.int16)
    probs = np.sort(rng.random((tokens, N)).astype(np.float32), axis=1)[:, ::-1]
    with TraceWriter(path, meta) as w:
        w.write({"seq": np.repeat(np.arange(tokens), K), "pos": 0, "token": 1, "layer": 0,
                 "rank": np.tile(np.arange(K), tokens), "expert": ids[:, :K].reshape(-1), "weight": 0.5,
                 "prob": 0.5, "topn_experts": ids, "topn_probs": probs})
    return ids, probs


def test_a_batch_without_rank0_rows_reads_top_n_ids_as_integers_and_copies_back(tmp_path):
    # batch_rows=1: every odd batch is one rank-1 row, which holds no list; its empty topn_experts must still
    # be integers, so that a batch read is a batch TraceWriter takes back (as iter_batches documents)
    ids, probs = write_topn_trace(tmp_path / "a.parquet")
    t = open_trace(tmp_path / "a.parquet")
    parts = list(t.iter_batches(batch_rows=1))
    assert all(b["topn_experts"].dtype == np.int16 for b in parts)
    assert all(b["topn_probs"].dtype == np.float32 for b in parts)
    with TraceWriter(tmp_path / "b.parquet", t.meta) as w:
        for b in parts:
            w.write(b)
    back = next(open_trace(tmp_path / "b.parquet").iter_batches())
    np.testing.assert_array_equal(back["topn_experts"], ids)
    np.testing.assert_array_equal(back["topn_probs"], probs)


def test_probs_mode_is_stored_in_its_canonical_form_and_checked_as_such(tmp_path):
    # parse_probs accepts " TOP:03 "; the record must be what the validator and the explorer read: "top:3"
    meta = TraceMeta(num_experts=[6], top_k=2, probs_mode=" TOP:03 ")
    assert meta.probs_mode == "top:3"
    assert BatchValidator(meta, "t").N == 3
    assert TraceMeta.from_json(meta.to_json()).probs_mode == "top:3"


def test_a_failure_while_closing_leaves_no_temporary_files(tmp_path, monkeypatch):
    # the last flush happens in close(): a full disk there must not leave <path>.tmp (nor the sidecar's)
    import pyarrow.parquet as pq

    def full_disk(self, *a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pq.ParquetWriter, "write_table", full_disk)
    with pytest.raises(OSError, match="No space left"):
        write_topn_trace(tmp_path / "t.parquet")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_list_columns_given_as_arrow_arrays_refuse_bad_ids_in_one_line(tmp_path):
    # an importer handing pyarrow lists: ids past int16 (or negative) are the same one-line refusal as numpy's
    import pyarrow as pa

    from moelab.config import MoelabError

    meta = TraceMeta(num_experts=[6], top_k=1, probs_mode="top:2")
    for bad in ([[70000, 1]], [[-1, 1]]):
        with pytest.raises(MoelabError, match="topn_experts"):
            with TraceWriter(tmp_path / "t.parquet", meta) as w:
                w.write({"seq": [0], "pos": [0], "token": [1], "layer": [0], "rank": [0], "expert": [0],
                         "weight": 1.0, "prob": 0.5, "topn_experts": pa.array(bad, pa.list_(pa.int64())),
                         "topn_probs": pa.array([[0.5, 0.2]], pa.list_(pa.float32()))})
    assert not list(tmp_path.iterdir())


def test_per_row_lists_of_ids_refuse_values_past_int16(tmp_path):
    # the object-array form (lists of different lengths, as iter_batches yields them): 70000 wrapped to 4464
    from moelab.config import MoelabError

    meta = TraceMeta(num_experts=[6], top_k=1)
    ids = np.empty(2, dtype=object)
    ids[:] = [np.array([70000, 1]), np.array([2, 3, 4])]
    probs = np.empty(2, dtype=object)
    probs[:] = [np.array([0.5, 0.2]), np.array([0.3, 0.2, 0.1])]
    with pytest.raises(MoelabError, match="'topn_experts' holds expert ids"):
        with TraceWriter(tmp_path / "t.parquet", meta) as w:
            w.write({"seq": [0, 1], "pos": [0, 0], "token": [1, 1], "layer": [0, 0], "rank": [0, 0],
                     "expert": [0, 0], "weight": 1.0, "prob": 0.5, "topn_experts": ids, "topn_probs": probs,
                     "topn_experts.rows": [0, 1], "topn_probs.rows": [0, 1]})
