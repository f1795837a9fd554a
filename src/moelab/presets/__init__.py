"""TOML presets. A preset holds a [model] table (and optionally [train], [data]) and a [reference]
table with the published figures that `moelab params` prints beside the analytic counts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moelab.config import ConfigError, apply_overrides, read_toml

PRESET_DIR = Path(__file__).parent


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


def preset_path(name: str) -> Path:
    """A bundled preset's path; a path to a .toml file is accepted as-is."""
    p = Path(name)
    if p.suffix == ".toml" and p.is_file():
        return p
    path = PRESET_DIR / f"{name}.toml"
    if not path.is_file() and (p.suffix == ".toml" or len(p.parts) > 1):  # a path, not a preset name
        what = ("is not a .toml file" if p.is_file() else "is a folder, not a .toml file" if p.exists()
                else "does not exist")
        raise ConfigError(f"preset file {name} {what} (or give a bundled preset: {', '.join(list_presets())})")
    if not path.is_file():
        raise ConfigError(f"unknown preset {name!r} (available: {', '.join(list_presets())})")
    return path


def load_preset_dict(name: str, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """The whole preset as a dict (reference table removed) with `section.field=value` overrides."""
    d = read_toml(preset_path(name))
    d.pop("reference", None)
    return apply_overrides(d, list(overrides))


def preset_reference(name: str) -> dict[str, Any]:
    return dict(read_toml(preset_path(name)).get("reference", {}))


def load_preset(name: str, overrides: list[str] | tuple[str, ...] = ()):
    """The preset's ModelConfig, with overrides such as `model.moe.num_experts=16`."""
    from moelab.model.config import ModelConfig

    d = load_preset_dict(name, overrides)
    unknown = sorted(set(d) - {"model", "train", "data"})
    if unknown:
        raise ConfigError(f"unknown config section {unknown[0]!r} (known: model, train, data)")
    return ModelConfig.from_dict(d.get("model", {}), path="model")
