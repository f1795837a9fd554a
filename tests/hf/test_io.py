"""The streaming safetensors writer and the lazy reader: byte-exact files, one chunk at a time."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from moelab.config import MoelabError
from moelab.hf.convert import import_producer
from moelab.hf.io import Entry, TensorReader, one, shard_groups, write_sharded, write_streaming
from moelab.hf.links import model_links
from moelab.model.config import ModelConfig
from moelab.train.checkpoint import read_checkpoint_config


def test_streamed_file_reads_back_with_safetensors(tmp_path):
    tensors = {"a": torch.randn(3, 5), "b": torch.randn(4, 2).to(torch.bfloat16), "empty": torch.zeros(0, 7),
               "i": torch.arange(6, dtype=torch.int64).view(2, 3)}
    chunks = {"a": lambda: iter(tensors["a"].split(1)), "b": one(lambda: tensors["b"]),
              "empty": one(lambda: tensors["empty"]), "i": one(lambda: tensors["i"])}
    entries = [Entry(k, tuple(v.shape), v.dtype, chunks[k]) for k, v in tensors.items()]
    write_streaming(tmp_path / "x.safetensors", entries, {"format": "pt"})
    back = load_file(str(tmp_path / "x.safetensors"))
    assert set(back) == set(tensors) and all(torch.equal(back[k], v) for k, v in tensors.items())
    assert not (tmp_path / "x.safetensors.partial").exists()


def test_a_producer_of_the_wrong_size_is_an_error(tmp_path):
    entries = [Entry("a", (2, 3), torch.float32, one(lambda: torch.zeros(5)))]
    with pytest.raises(MoelabError, match="tensor a: wrote 20 bytes, expected 24"):
        write_streaming(tmp_path / "x.safetensors", entries)
    assert not (tmp_path / "x.safetensors").exists()


def test_sharded_writer_and_reader_agree(tmp_path):
    tensors = {f"t{i}": torch.randn(10, 10) for i in range(5)}  # 400 bytes each
    entries = [Entry(k, (10, 10), torch.float32, one(lambda v=v: v)) for k, v in tensors.items()]
    assert [len(g) for g in shard_groups(entries, 900)] == [2, 2, 1]
    files = write_sharded(tmp_path, entries, 900)
    assert len(files) == 3
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 2000 and set(index["weight_map"]) == set(tensors)
    reader = TensorReader(tmp_path)
    assert sorted(reader.keys()) == sorted(tensors)
    assert torch.equal(reader.get("t3"), tensors["t3"]) and torch.equal(reader.row("t4", 2), tensors["t4"][2])
    assert reader.shape("t0") == (10, 10) and reader.dtype("t0") == torch.float32


def test_reader_names_what_is_missing(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(MoelabError, match="no .safetensors weights.*pytorch_model.bin"):
        TensorReader(tmp_path)
    save_file({"x": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    save_file({"layers.0.w1": torch.zeros(2)}, str(tmp_path / "consolidated.safetensors"))  # another layout
    assert TensorReader(tmp_path).keys() == ["x"]
    with pytest.raises(MoelabError, match="no tensor named y"):
        TensorReader(tmp_path).get("y")


def test_experts_stream_one_expert_at_a_time(hf_dirs, converted):
    """Memory stays bounded: a stacked expert tensor is produced as E pieces of one expert each."""
    cfg = ModelConfig.from_dict(read_checkpoint_config(converted["mixtral"])["model"])
    reader = TensorReader(hf_dirs["mixtral"])
    links = {link.name: link for link in model_links(cfg, "mixtral", set(reader.keys()))}
    w_in = links["blocks.0.moe.experts.w_in_EDX"]
    pieces = list(import_producer(w_in, reader)())
    assert len(pieces) == 8 and all(p.shape == w_in.shape[1:] for p in pieces)
    stacked = load_file(str(converted["mixtral"] / "model.safetensors"))["blocks.0.moe.experts.w_in_EDX"]
    assert torch.equal(torch.stack(pieces), stacked)
