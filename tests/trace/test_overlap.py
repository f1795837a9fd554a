"""The overlapped trace loop (rows built and written on a worker thread while the next batch runs forward)
writes the same file, byte for byte, as the synchronous loop; an error on the worker still leaves no file."""

from __future__ import annotations

import pytest
import torch

from moelab.config import MoelabError
from moelab.model.config import ModelConfig, MoEConfig, RouterConfig
from moelab.model.transformer import build_model
from moelab.trace.build import trace_batches, trace_meta


def _model():
    moe = MoEConfig(router=RouterConfig(kind="linear"), num_experts=4, top_k=2, moe_every=1, expert_hidden=16,
                    capacity_factor_eval=1.0)
    cfg = ModelConfig(vocab_size=50, d_model=16, n_layers=2, n_heads=2, ffn_hidden=32, max_seq_len=32, moe=moe)
    return build_model(cfg, seed=0).eval()


def _batches(n, B=2, S=8):
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        ids = torch.randint(0, 50, (B, S), generator=g)
        doc = torch.arange(B).repeat_interleave(S).view(B, S) + i * B
        doc[-1, -3:] = -1  # padding ends the last row
        yield {"input_ids": ids, "labels": ids, "doc": doc, "pos": torch.arange(S).repeat(B, 1),
               "domain_id": torch.zeros(B, S, dtype=torch.int16), "lang_id": torch.ones(B, S, dtype=torch.int16),
               "turn": torch.full((B, S), -1, dtype=torch.int16)}


@pytest.mark.parametrize("all_experts", [False, True])
def test_overlapped_loop_writes_the_synchronous_file(tmp_path, all_experts):
    model = _model()
    meta = trace_meta(model, 1.0, 3, None, "moelab", ["code"], ["en", "py"])
    files = {}
    for overlap in (False, True):
        path = tmp_path / f"t{int(overlap)}.parquet"
        stats = trace_batches(model, _batches(5), path, meta, max_tokens=60, capacity_factor=1.0,
                              all_experts=all_experts, overlap=overlap)
        assert stats["tokens"] == 60  # cut inside the fifth batch
        files[overlap] = (path.read_bytes(), path.with_suffix(".json").read_bytes()
                          if path.with_suffix(".json").exists() else b"")
    assert len(files[True][0]) > 1000 and files[True] == files[False]


def test_an_error_on_the_writer_thread_surfaces_and_leaves_no_file(tmp_path, monkeypatch):
    import moelab.trace.build as build

    def broken(*a, **k):
        raise MoelabError("row building failed")

    monkeypatch.setattr(build, "batch_rows", broken)
    model = _model()
    meta = trace_meta(model, 1.0, 3, None, "moelab", ["code"], ["en", "py"])
    with pytest.raises(MoelabError, match="row building failed"):
        trace_batches(model, _batches(3), tmp_path / "t.parquet", meta, max_tokens=40, capacity_factor=1.0)
    assert not (tmp_path / "t.parquet").exists()
