"""Bad transformers input fails before writing, in one line that names the problem."""

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moelab.config import MoelabError
from moelab.hf.convert import import_hf
from moelab.hf.families import DEFAULTS, FAMILIES, moelab_config, read_hf_config


def _copy(src, dst, edit_tensors=None, edit_config=None):
    shutil.copytree(src, dst)
    if edit_tensors:
        with safe_open(str(dst / "model.safetensors"), "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        edit_tensors(tensors)
        save_file(tensors, str(dst / "model.safetensors"))
    if edit_config:
        cfg = json.loads((dst / "config.json").read_text())
        edit_config(cfg)
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _fails(folder, out, *words):
    with pytest.raises(MoelabError) as err:
        import_hf(folder, out)
    msg = str(err.value)
    assert "\n" not in msg and all(w in msg for w in words), msg
    assert not out.exists()
    return msg


def test_unsupported_architecture_lists_supported(hf_dirs, tmp_path):
    bad = _copy(hf_dirs["mixtral"], tmp_path / "llama",
                edit_config=lambda c: c.update(model_type="llama", architectures=["LlamaForCausalLM"]))
    _fails(bad, tmp_path / "out", "unsupported architecture 'llama'", *FAMILIES)


def test_missing_tensor_is_named(hf_dirs, tmp_path):
    name = "model.layers.1.mlp.experts.3.up_proj.weight"
    bad = _copy(hf_dirs["qwen2_moe"], tmp_path / "m", edit_tensors=lambda t: t.pop(name))
    _fails(bad, tmp_path / "out", "lacks 1 tensor", name)


def test_extra_tensor_is_named(hf_dirs, tmp_path):
    name = "model.layers.0.mlp.experts.8.w1.weight"
    bad = _copy(hf_dirs["mixtral"], tmp_path / "m", edit_tensors=lambda t: t.update({name: torch.zeros(48, 32)}))
    _fails(bad, tmp_path / "out", "config does not", name)


def test_shape_mismatch_names_tensor_and_both_shapes(hf_dirs, tmp_path):
    name = "model.layers.1.self_attn.k_norm.weight"
    bad = _copy(hf_dirs["qwen3_moe"], tmp_path / "m", edit_tensors=lambda t: t.update({name: torch.ones(8)}))
    _fails(bad, tmp_path / "out", name, "[8]", "[16]")


@pytest.mark.parametrize("family, edit, words", [
    ("mixtral", dict(sliding_window=16), "sliding_window=16"),
    ("mixtral", dict(router_jitter_noise=0.1), "router_jitter_noise"),
    ("qwen2_moe", dict(use_sliding_window=True), "use_sliding_window"),
    ("qwen3_moe", dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}), "yarn"),
    ("qwen3_moe", dict(rope_scaling={"type": "linear", "factor": 2.0}), "rope_scaling"),
    ("olmoe", dict(clip_qkv=8.0), "clip_qkv=8.0"),
    ("olmoe", dict(hidden_act="gelu"), "hidden_act='gelu'"),
])
def test_unsupported_settings_are_named(family, edit, words, hf_dirs, tmp_path):
    bad = _copy(hf_dirs[family], tmp_path / "m", edit_config=lambda c: c.update(edit))
    _fails(bad, tmp_path / "out", words, "not supported")


def test_a_window_longer_than_any_sequence_is_full_attention(hf_dirs):
    raw = read_hf_config(hf_dirs["mixtral"])
    raw["sliding_window"] = raw["max_position_embeddings"]
    assert moelab_config(raw)[0] == "mixtral"


def test_missing_folder_and_offline_hub_name_fail_in_one_line(tmp_path, monkeypatch):
    with pytest.raises(MoelabError, match="no such folder"):
        import_hf(str(tmp_path / "nope"), tmp_path / "out")
    import moelab.data.tokenizer as tok

    monkeypatch.setattr(tok, "_hub_reachable", lambda timeout=5.0: False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MoelabError, match="cannot be reached") as err:
        import_hf("moelab-test/not-a-model", tmp_path / "out")
    assert "\n" not in str(err.value)


def test_output_folder_must_be_empty(hf_dirs, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(MoelabError, match="not empty"):
        import_hf(hf_dirs["olmoe"], tmp_path / "out")


@pytest.mark.parametrize("family", FAMILIES)
def test_defaults_are_transformers_config_defaults(family):
    """Fields a config.json leaves out take the defaults transformers would use."""
    import transformers

    cls = {"mixtral": "MixtralConfig", "qwen2_moe": "Qwen2MoeConfig", "qwen3_moe": "Qwen3MoeConfig",
           "olmoe": "OlmoeConfig"}[family]
    theirs = getattr(transformers, cls)()
    for key, value in DEFAULTS[family].items():
        if key == "rope_theta":
            assert theirs.rope_parameters["rope_theta"] == value
        elif key == "head_dim" or (key == "sliding_window" and family != "mixtral"):
            continue  # None means hidden_size / heads; post-init rewrites the qwen window
        elif key == "num_key_value_heads" and value is None:
            assert theirs.num_key_value_heads == theirs.num_attention_heads
        else:
            assert getattr(theirs, key) == value, key
    _, cfg = moelab_config({"model_type": family})  # an all-defaults config converts
    assert cfg.d_model == theirs.hidden_size


def test_a_tensor_of_the_wrong_shape_is_one_quiet_line(hf_dirs, tmp_path, capfd):
    """transformers prints a load report with a Python traceback for a tensor it cannot convert; the loader
    keeps that to itself and names the tensor and the cause in its one line (audit item 9)."""
    from transformers.utils import logging as hf_logging

    from moelab.trace.hf import load_hf_model

    name = "model.layers.0.mlp.experts.0.w1.weight"
    bad = _copy(hf_dirs["mixtral"], tmp_path / "m", edit_tensors=lambda t: t.update({name: torch.zeros(5, 5)}))
    level = hf_logging.get_verbosity()
    capfd.readouterr()
    with pytest.raises(MoelabError) as err:
        load_hf_model(bad, "cpu")
    msg = str(err.value)
    assert "\n" not in msg and "could not load" in msg and "model.layers.0.mlp.experts" in msg, msg
    assert "above report" not in msg, msg
    out, errtext = capfd.readouterr()
    assert not out and not errtext, errtext[:2000]
    assert hf_logging.get_verbosity() == level  # transformers' logging is restored after the load
