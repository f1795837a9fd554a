"""Which transformers class a saved checkpoint folder is built as, for a trace, a live view or an ablation.

The order is what a user loading the folder expects: the causal LM that `AutoModelForCausalLM` maps the
config to; else the head class config.json's `architectures` names for this very config class (Mistral 4
and the multimodal families have no causal-LM mapping, and their base model would drop the LM head the
folder was saved with); else `AutoModel`'s base model; else whatever class config.json names (a
multimodal model's text decoder saved alone, e.g. Qwen3OmniMoeThinkerTextModel, that no auto class maps).
The preflight on the meta device and the load with weights use the same choice, so both build one model.
"""

from __future__ import annotations

import json
from pathlib import Path

from moelab.config import MoelabError

HEADS = ("ForCausalLM", "ForConditionalGeneration")


def named_classes(folder: Path) -> list[type]:
    """The transformers classes config.json's `architectures` names (what the folder was saved as)."""
    import transformers

    try:
        names = json.loads((Path(folder) / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError, AttributeError):
        return []
    found = [getattr(transformers, n, None) for n in names if isinstance(n, str)]
    return [c for c in found if isinstance(c, type) and hasattr(c, "from_pretrained")]


def model_class(folder: Path, config) -> type:
    """The class to build `folder`'s model as (an auto class or a concrete one; see the module doc)."""
    from transformers import AutoModel, AutoModelForCausalLM

    if type(config) in AutoModelForCausalLM._model_mapping:
        return AutoModelForCausalLM
    named = named_classes(folder)
    head = next((c for c in named
                 if c.__name__.endswith(HEADS) and getattr(c, "config_class", None) is type(config)), None)
    if head is not None:
        return head
    if type(config) in AutoModel._model_mapping:
        return AutoModel
    if named:
        return named[0]
    raise MoelabError(f"transformers has no model class for {folder}'s {type(config).__name__} (config.json "
                      "names none it knows in `architectures`)")


def build(cls: type, config):
    """The model of `config` with fresh weights (on the current device: the meta device in a preflight)."""
    return cls.from_config(config) if hasattr(cls, "_model_mapping") else cls(config)
