import dataclasses

import pytest

from moelab.config import Config, ConfigError, apply_overrides, parse_override
from moelab.model.config import ModelConfig, MoEConfig, RouterConfig


def test_round_trip_keeps_every_field():
    cfg = ModelConfig(d_model=64, n_heads=2, moe=MoEConfig(num_experts=[4, 8], moe_every=2,
                                                          router=RouterConfig(kind="rmoe", cell="lstm")))
    again = ModelConfig.from_dict(cfg.to_dict())
    assert again == cfg
    assert again.moe.router.cell == "lstm"


def test_unknown_key_names_the_dotted_path():
    with pytest.raises(ConfigError, match=r"model\.moe\.router\.kinds"):
        ModelConfig.from_dict({"moe": {"router": {"kinds": "x"}}}, path="model")


@pytest.mark.parametrize("text, keys, value", [
    ("model.moe.num_experts=16", ["model", "moe", "num_experts"], 16),
    ("model.moe.capacity_factor_train=1.25", ["model", "moe", "capacity_factor_train"], 1.25),
    ("model.moe.router.kind=rmoe", ["model", "moe", "router", "kind"], "rmoe"),
    ("model.moe.router.kind=\"rmoe\"", ["model", "moe", "router", "kind"], "rmoe"),
    ("model.tie_embeddings=true", ["model", "tie_embeddings"], True),
    ("model.moe.num_experts=[4, 8]", ["model", "moe", "num_experts"], [4, 8]),
    # the bare word stays a word; the field's type decides whether it means "empty" (test below)
    ("model.moe.capacity_factor_eval=none", ["model", "moe", "capacity_factor_eval"], "none"),
])
def test_parse_override_values(text, keys, value):
    assert parse_override(text) == (keys, value)


@pytest.mark.parametrize("bad", ["novalue", "=3", "a..b=1", ".a=1"])
def test_malformed_override(bad):
    with pytest.raises(ConfigError, match="malformed --set"):
        parse_override(bad)


def test_apply_overrides_is_a_copy_and_nests():
    base = {"model": {"moe": {"top_k": 2}}}
    out = apply_overrides(base, ["model.moe.top_k=1", "model.d_model=64"])
    assert out == {"model": {"moe": {"top_k": 1}, "d_model": 64}}
    assert base == {"model": {"moe": {"top_k": 2}}}


def test_wrong_types_name_the_field():
    with pytest.raises(ConfigError, match=r"model\.d_model"):
        ModelConfig.from_dict({"d_model": "wide"}, path="model")
    with pytest.raises(ConfigError, match=r"model\.tie_embeddings"):
        ModelConfig.from_dict({"tie_embeddings": 1}, path="model")
    with pytest.raises(ConfigError, match=r"cell.*'gru'"):
        RouterConfig.from_dict({"cell": "transformer"})


def test_int_accepted_where_float_expected():
    cfg = MoEConfig.from_dict({"capacity_factor_train": 2, "num_experts": 4})
    assert cfg.capacity_factor_train == 2.0 and isinstance(cfg.capacity_factor_train, float)


def test_config_is_keyword_only():
    assert all(f.kw_only for f in dataclasses.fields(ModelConfig))
    assert issubclass(ModelConfig, Config)


def test_none_is_a_value_where_the_field_lists_it_and_empty_elsewhere():
    from moelab.presets import load_preset

    cfg = load_preset("tiny-moe", ["model.moe.shared_placement=none", "model.moe.capacity_factor_eval=none",
                                   "model.moe.capacity_factor_train=null"])
    assert cfg.moe.shared_placement == "none"
    assert cfg.moe.capacity_factor_eval is None and cfg.moe.capacity_factor_train is None
    with pytest.raises(ConfigError, match="model.d_model may not be empty"):
        load_preset("tiny-moe", ["model.d_model=none"])


@pytest.mark.parametrize("override", ["model.moe.capacity_factor_train=inf", "model.moe.capacity_factor_eval=nan",
                                      "model.moe.balance_coef=-inf", "model.norm_eps=inf"])
def test_non_finite_numbers_are_refused(override):
    from moelab.presets import load_preset

    with pytest.raises(ConfigError, match="should be a finite number"):
        load_preset("tiny-moe", [override])
