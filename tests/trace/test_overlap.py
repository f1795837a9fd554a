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


class _OnGPU(torch.Tensor):
    """A CPU tensor that says it lives on a CUDA device, standing for a capture's tensors on that GPU."""

    index = 0

    @property
    def device(self):
        return torch.device("cuda", self.index)


def _on_gpu(t: torch.Tensor, index: int) -> torch.Tensor:
    out = t.as_subclass(_OnGPU)
    out.index = index
    return out


def test_host_copies_wait_for_every_source_device_s_stream(monkeypatch):
    """A non-blocking copy runs on its source device's stream: with blocks on cuda:0 and cuda:1 (device_map)
    or a model on cuda:1 alone, the writer must wait on an event recorded on each of those streams. One
    event on the current device's stream returned while cuda:1's copies were still queued."""
    import moelab.trace.build as build
    from moelab.trace.capture import CapturedLayer
    from moelab.model.moe import LayerRouting

    recorded = []

    class Event:
        def record(self, stream):
            recorded.append(stream)

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: f"stream of {device}")
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(build, "_pinned_like", lambda t: torch.empty(t.shape, dtype=t.dtype))

    def layer(block, index):
        ids = torch.tensor([[0, 1], [2, 3]])
        return CapturedLayer(LayerRouting(block, _on_gpu(ids, index), _on_gpu(torch.rand(2, 2), index),
                                          _on_gpu(torch.rand(2, 4), index), _on_gpu(ids < 0, index), None))

    out, events = build._host_copy([layer(0, 1)])  # the whole model on cuda:1
    assert len(events) == 1 and recorded == ["stream of cuda:1"]
    recorded.clear()
    out, events = build._host_copy([layer(0, 0), layer(1, 1), layer(2, 1)])  # spread over two GPUs
    assert len(events) == 2 and recorded == ["stream of cuda:0", "stream of cuda:1"]
    assert all(type(c.routing.expert_ids_TK) is torch.Tensor for c in out)  # host copies, not the GPU tensors
    torch.testing.assert_close(out[1].routing.expert_ids_TK, torch.tensor([[0, 1], [2, 3]]))
    assert build._host_copy([CapturedLayer(LayerRouting(0, *[torch.zeros(1)] * 4, None))])[1] == []  # CPU
