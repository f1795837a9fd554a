"""Streaming: any batch size gives the result of one batch; checkpoints align or fail with a clear error."""

from __future__ import annotations

import numpy as np
import pytest

from moelab.analysis import analyze_all, early_routing, to_json_dict
from moelab.analysis.common import regroup, token_key
from moelab.analysis.synthetic import planted_batches
from moelab.config import MoelabError

E, K, L = 6, 2, 3
ARGS = dict(num_seqs=12, seq_len=24, num_layers=L, num_experts=E, top_k=K, vocab=30, seqs_per_batch=4)


def assert_close(a, b, path="result"):
    """Nested results equal up to float summation order."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            assert_close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_close(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and b is not None:
        assert a == pytest.approx(b, rel=1e-9, abs=1e-12), path
    else:
        assert a == b, path


def test_small_batches_give_the_one_batch_result(write_trace):
    batches = list(planted_batches(rule="token", capacity_factor=1.0, all_experts=True, **ARGS))
    trace = write_trace(batches, [E] * L, K, row_group_rows=500)
    kw = dict(simulate=dict(capacity_factor=1.0, batch_seqs=4), min_count=5, n_permutations=4)
    whole = to_json_dict(analyze_all(trace, batch_rows=10**7, **kw))
    pieces = to_json_dict(analyze_all(trace, batch_rows=37, **kw))  # cuts tokens and sequences apart
    stored = [dict(b, probs=b["probs"].astype(np.float16).astype(np.float32)) for b in batches]  # probs: float16
    in_memory = to_json_dict(analyze_all(stored, num_experts=[E] * L, top_k=K, **kw))
    assert_close(pieces, whole)
    assert_close(in_memory, whole)
    assert whole["drops_simulated"]["share_LB"] == whole["drops"]["share_LB"]  # same rule, same batches
    assert whole["dynamic"]["top1_is_largest_norm"] == [1.0] * L  # planted: norms follow the scores


def test_regroup_keeps_tokens_whole():
    (batch,) = list(planted_batches(rule="uniform", **dict(ARGS, seqs_per_batch=12)))
    pieces = [{k: v[i:i + 29] for k, v in batch.items() if not k.endswith((".rows", ".names")) and k != "probs"}
              for i in range(0, len(batch["expert"]), 29)]
    out = list(regroup(pieces, token_key))
    assert sum(len(b["expert"]) for b in out) == len(batch["expert"])
    assert all(len(b["expert"]) % (L * K) == 0 for b in out)
    keys = [token_key(b) for b in out]
    assert all(a[-1] < b[0] for a, b in zip(keys, keys[1:]))
    shuffled = [dict(pieces[0], pos=pieces[0]["pos"][::-1].copy())]
    with pytest.raises(MoelabError, match="not in \\(seq, pos, layer, rank\\) order"):
        list(regroup(shuffled, token_key))


def test_early_routing_across_checkpoint_traces(write_trace):
    def trace(rule, name, step, seed=3, row_group_rows=300):
        return write_trace(planted_batches(rule=rule, seed=seed, **ARGS), [E] * L, K, name=name,
                           row_group_rows=row_group_rows, checkpoint_step=step)

    early, final = trace("position", "a.parquet", 10), trace("token", "c.parquet", 30)
    same = trace("token", "b.parquet", 20, row_group_rows=1000)  # row groups cut elsewhere: still aligned
    res = early_routing([early, same, final], min_count=3, batch_rows=101)
    assert res.steps == [10, 20]
    assert res.top1_agreement[1] == pytest.approx([1.0] * L) and res.topk_overlap[1] == pytest.approx([1.0] * L)
    assert res.jsd[1] == pytest.approx([0.0] * L)
    assert (res.jsd[0] > 2 * np.asarray(res.uniform_jsd)).all()  # unrelated: well above two random routings
    assert np.abs(res.jsd[0] - res.null_jsd[0]).max() < 0.1 * res.null_jsd[0].max()  # ... and at its own null
    assert (res.jsd[1] < 0.1 * res.null_jsd[1]).all()  # the same routing: far below the unrelated level
    assert (np.abs(res.top1_agreement[0] - res.null_top1[0]) < 0.1).all()
    assert res.first["top1"].n_bootstrap > 0 and res.first["jsd"].n_permutations > 0
    with pytest.raises(MoelabError, match="column 'token' \\(different tokens\\)"):
        early_routing([trace("token", "d.parquet", 1, seed=4), final])
    other = write_trace(planted_batches(rule="token", seed=3, **dict(ARGS, num_experts=E + 1)), [E + 1] * L, K,
                        name="e.parquet")
    with pytest.raises(MoelabError, match="num_experts"):
        early_routing([other, final])
