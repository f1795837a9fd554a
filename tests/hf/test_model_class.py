"""The class a saved folder is loaded as: the causal LM, else the head class the folder was saved as, else the
base model, else the class config.json names; the meta-device preflight builds the same one.

Reference: transformers' own classes (the model built in memory) and the folder's config.json as written."""

import json
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "trace"))

from hf_tiny import tiny_model  # noqa: E402

from moelab.config import MoelabError  # noqa: E402
from moelab.hf.model_class import model_class  # noqa: E402
from moelab.trace.hf import load_hf_model, preflight  # noqa: E402


def _saved(model_type: str, folder: Path, architectures=...) -> torch.nn.Module:
    """The family's tiny model saved to `folder`, config.json's `architectures` replaced when given."""
    model = tiny_model(model_type)
    model.save_pretrained(folder)
    if architectures is not ...:
        raw = json.loads((folder / "config.json").read_text())
        raw["architectures"] = architectures
        (folder / "config.json").write_text(json.dumps(raw))
    return model


def _loaded_and_preflight(folder: Path):
    return load_hf_model(folder, "cpu", dtype="float32"), preflight(folder, None)


def test_an_unmapped_causal_lm_loads_with_its_head(tmp_path):
    """Mistral 4 has no AutoModelForCausalLM mapping; the folder says Mistral4ForCausalLM, so the LM head
    (and its logits) come back, not the base model's hidden states."""
    if "mistral4" not in transformers.models.auto.configuration_auto.CONFIG_MAPPING_NAMES:
        pytest.skip("this transformers has no Mistral 4")
    model = _saved("mistral4", tmp_path)
    assert type(model).__name__ == "Mistral4ForCausalLM"
    loaded, meta = _loaded_and_preflight(tmp_path)
    assert type(loaded) is type(model) and type(meta) is type(model)
    ids = torch.arange(6).view(1, 6)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_without_a_named_head_the_base_model_is_loaded(tmp_path):
    """No `architectures` (or one naming another family's head) leaves the base model: a head class is
    taken only for the config class it was written for."""
    if "mistral4" not in transformers.models.auto.configuration_auto.CONFIG_MAPPING_NAMES:
        pytest.skip("this transformers has no Mistral 4")
    for i, names in enumerate((None, ["MixtralForCausalLM"])):
        folder = tmp_path / str(i)
        _saved("mistral4", folder, names)
        loaded, meta = _loaded_and_preflight(folder)
        assert type(loaded).__name__ == type(meta).__name__ == "Mistral4Model"


def test_a_mapped_causal_lm_ignores_architectures(tmp_path):
    """Mixtral's auto causal LM wins over what config.json names (the order users get from transformers)."""
    _saved("mixtral", tmp_path, ["MixtralModel"])
    cfg = transformers.AutoConfig.from_pretrained(tmp_path)
    assert model_class(tmp_path, cfg) is transformers.AutoModelForCausalLM
    assert type(load_hf_model(tmp_path, "cpu", dtype="float32")) is transformers.MixtralForCausalLM


def test_a_config_no_class_maps_is_refused_in_one_line(tmp_path):
    """Qwen3-Omni's thinker text decoder saved alone: no auto class maps its config, so only the name in
    config.json reaches it; without that name the load says so in one line."""
    if "qwen3_omni_moe" not in transformers.models.auto.configuration_auto.CONFIG_MAPPING_NAMES:
        pytest.skip("this transformers has no Qwen3-Omni")
    model = _saved("qwen3_omni_moe", tmp_path / "named")
    loaded, meta = _loaded_and_preflight(tmp_path / "named")
    assert type(loaded) is type(model) and type(meta) is type(model)
    _saved("qwen3_omni_moe", tmp_path / "bare", [])
    for call in (lambda: preflight(tmp_path / "bare", None), lambda: load_hf_model(tmp_path / "bare", "cpu")):
        with pytest.raises(MoelabError, match="has no model class") as err:
            call()
        assert "\n" not in str(err.value)


def test_a_multimodal_checkpoint_loads_with_its_lm_head_and_traces(tmp_path):
    """Qwen3-VL-MoE as hub folders hold it (Qwen3VLMoeForConditionalGeneration, tiny vision tower): no
    causal-LM mapping, so before the named head class it came back as the headless base model. Reference:
    the model built in memory, its logits on text alone."""
    from hf_tiny import tiny_config

    from moelab.trace.adapters import HFRoutingRecorder

    if "qwen3_vl_moe" not in transformers.models.auto.configuration_auto.CONFIG_MAPPING_NAMES:
        pytest.skip("this transformers has no Qwen3-VL-MoE")
    cfg = transformers.AutoConfig.for_model("qwen3_vl_moe")
    for k, v in dict(depth=1, hidden_size=32, num_heads=2, intermediate_size=32, out_hidden_size=32,
                     deepstack_visual_indexes=[]).items():
        setattr(cfg.vision_config, k, v)
    cfg.text_config = tiny_config("qwen3_vl_moe")
    torch.manual_seed(0)
    model = transformers.Qwen3VLMoeForConditionalGeneration(cfg).eval()
    model.save_pretrained(tmp_path)
    loaded, meta = _loaded_and_preflight(tmp_path)
    assert type(loaded) is type(model) and type(meta) is type(model)
    ids = torch.arange(8).view(1, 8)
    with torch.no_grad(), HFRoutingRecorder(loaded, "qwen3_vl_moe") as rec:
        out = loaded(input_ids=ids, use_cache=False).logits
        assert len(rec.pop()) == cfg.text_config.num_hidden_layers
        torch.testing.assert_close(out, model(input_ids=ids, use_cache=False).logits)
