"""A multimodal model's text type maps to its own family's entry, never to a shorter name or the fallback."""

import pytest

from moelab.trace.adapters import FAMILIES, UNLISTED, family_entry


@pytest.mark.parametrize("text_type, family", [
    ("qwen3_vl_moe_text", "qwen3_vl_moe"), ("qwen3_5_moe_text", "qwen3_5_moe"), ("glm4v_moe_text", "glm4v_moe"),
    ("qwen3_omni_moe_thinker", "qwen3_omni_moe"), ("mixtral", "mixtral"),
])
def test_text_types_find_their_family(text_type, family):
    assert family in FAMILIES
    assert family_entry(text_type) is FAMILIES[family]


def test_unknown_type_falls_back():
    assert family_entry("no_such_moe_text") is UNLISTED
