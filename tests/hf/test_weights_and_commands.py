"""Weight analyses on a transformers checkpoint, and the `convert` verb's handler."""

import argparse
import json

import numpy as np
import pytest

from moelab.analysis.weights import weight_analysis
from moelab.config import MoelabError
from moelab.hf import commands
from moelab.hf.families import FAMILIES
from moelab.hf.weights import hf_weight_layers
from moelab.train.checkpoint import load_model


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_weight_layers_equal_the_converted_models(family, hf_dirs, converted, monkeypatch):
    from moelab.hf.io import TensorReader
    from moelab.trace.weights import layer_shapes

    reads = []
    for name in ("get", "row"):
        real = getattr(TensorReader, name)
        monkeypatch.setattr(TensorReader, name, lambda self, *a, _real=real, **k: reads.append(a) or _real(self, *a, **k))
    ours = hf_weight_layers(hf_dirs[family])
    layers = load_model(converted[family]).moe_layers()
    assert not reads  # the shapes come from names and headers: each layer is read when analysed
    assert layer_shapes(ours) == [{"block": m.layer, "experts": m.experts.num_experts, "hidden": m.experts.hidden}
                                  for m in layers]
    assert len(ours) == len(layers)
    for a, layer in zip(ours, layers):
        b = {k: v.numpy() for k, v in layer.experts.matrices().items()}
        b["w_router_ED"] = layer.router.weight_ED.detach().numpy()
        assert a["block"] == layer.layer and a["router_kind"] == "linear"
        for key in ("w_up_EFD", "w_gate_EFD", "w_down_EDF", "w_router_ED"):
            assert a[key].shape == b[key].shape and a[key].dtype == np.float32
            np.testing.assert_array_equal(a[key], b[key])
    result = weight_analysis(ours)
    assert len(result.layers) == len(ours) and result.layers[0].router_cos is not None


def test_hf_weight_layers_picks_layers(hf_dirs):
    layers = hf_weight_layers(hf_dirs["qwen2_moe"], layers=[1])
    assert [x["block"] for x in layers] == [3]  # decoder_sparse_step=2: MoE blocks 1 and 3
    with pytest.raises(MoelabError, match="MoE layer 2 does not exist"):
        hf_weight_layers(hf_dirs["qwen2_moe"], layers=[2])


def _parse(argv):
    parser = argparse.ArgumentParser()
    commands.register(parser.add_subparsers())
    return parser.parse_args(argv)


def test_convert_verb_both_ways(hf_dirs, tmp_path, capsys):
    args = _parse(["convert", "--from-hf", str(hf_dirs["olmoe"]), "--out", str(tmp_path / "ml")])
    assert args.func(args) == 0
    assert load_model(tmp_path / "ml").config.qk_norm_kind == "full"
    args = _parse(["convert", "--to-hf", str(tmp_path / "ml"), "--out", str(tmp_path / "hf"),
                   "--family", "olmoe"])
    assert args.func(args) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == ["OlmoeForCausalLM"]
    assert "transformers checkpoint" in capsys.readouterr().out


def test_convert_verb_rejects_family_on_import(hf_dirs, tmp_path):
    args = _parse(["convert", "--from-hf", str(hf_dirs["olmoe"]), "--out", str(tmp_path / "x"),
                   "--family", "mixtral"])
    with pytest.raises(MoelabError, match="--family applies to --to-hf"):
        args.func(args)
    with pytest.raises(SystemExit):
        _parse(["convert", "--out", "x"])  # one of --from-hf / --to-hf is required
