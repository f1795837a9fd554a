"""Weight analyses read from a transformers checkpoint of any family with matrix experts, tensor by tensor:
the matrices equal the experts the model computes with (stacked and per-expert layouts)."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "trace"))

from hf_tiny import tiny_model  # noqa: E402

from moelab.analysis.weights import weight_analysis  # noqa: E402
from moelab.config import MoelabError  # noqa: E402
from moelab.hf.weights import hf_weight_layers  # noqa: E402
from moelab.trace.adapters import find_moe_blocks  # noqa: E402


def _expert_matrices(experts):
    """(gate, up, down) stacks of the in-memory experts: transformers 5 fuses gate and up."""
    gu, down = experts.gate_up_proj.detach(), experts.down_proj.detach()
    F = gu.shape[1] // 2
    return gu[:, :F].numpy(), gu[:, F:].numpy(), down.numpy()


@pytest.mark.parametrize("model_type", ["deepseek_v3", "dots1", "qwen3_moe", "minimax_m2", "ernie4_5_moe"])
def test_weights_equal_the_experts_the_model_runs(model_type, tmp_path):
    model = tiny_model(model_type)
    model.save_pretrained(tmp_path / "m")
    layers = hf_weight_layers(tmp_path / "m")
    blocks = find_moe_blocks(model)
    assert [x["block"] for x in layers] == [b.block for b in blocks]
    for got, b in zip(layers, blocks):
        gate, up, down = _expert_matrices(b.experts)
        np.testing.assert_array_equal(got["w_gate_EFD"], gate)
        np.testing.assert_array_equal(got["w_up_EFD"], up)
        np.testing.assert_array_equal(got["w_down_EDF"], down)
        router = getattr(b.router, "weight", None)
        if "w_router_ED" in got:
            np.testing.assert_array_equal(got["w_router_ED"], router.detach().numpy())
    assert len(weight_analysis(layers).layers) == len(layers)


def test_stacked_layout_is_read_one_expert_at_a_time(tmp_path):
    """A checkpoint holding transformers 5's in-memory (stacked) layout reads the same."""
    from safetensors.torch import save_file

    model = tiny_model("qwen3_moe")
    experts = find_moe_blocks(model)[0].experts
    state = {"model.layers.0.mlp.experts.gate_up_proj": experts.gate_up_proj.detach().contiguous(),
             "model.layers.0.mlp.experts.down_proj": experts.down_proj.detach().contiguous()}
    (tmp_path / "s").mkdir()
    save_file(state, tmp_path / "s" / "model.safetensors")
    (layer,) = hf_weight_layers(tmp_path / "s")
    gate, up, down = _expert_matrices(experts)
    np.testing.assert_array_equal(layer["w_gate_EFD"], gate)
    np.testing.assert_array_equal(layer["w_down_EDF"], down)
    assert "router_note" in layer  # no router matrix in this file: said, not guessed


def test_no_expert_matrices_is_one_line(tmp_path):
    from safetensors.torch import save_file

    (tmp_path / "d").mkdir()
    save_file({"model.layers.0.mlp.gate_proj.weight": torch.zeros(4, 4)}, tmp_path / "d" / "model.safetensors")
    with pytest.raises(MoelabError, match="no MoE expert matrices"):
        hf_weight_layers(tmp_path / "d")


def test_report_weights_accepts_a_transformers_folder(tmp_path):
    from moelab.trace.weights import checkpoint_weight_layers

    tiny_model("glm4_moe").save_pretrained(tmp_path / "m")
    layers = checkpoint_weight_layers(tmp_path / "m")
    assert [x["block"] for x in layers] == [0, 1] and layers[0]["w_router_ED"].shape == (8, 32)
