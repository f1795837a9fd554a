"""Config dataclasses: to/from dict, TOML presets, dotted overrides, validation.

Every concern has one keyword-only dataclass deriving from `Config`. Settings flow one way:
dataclass defaults -> TOML preset -> `--set section.field=value` overrides, resolved once by the CLI.
Validation lives in each class's `validate()` and raises `ConfigError` with a message naming the field.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class MoelabError(Exception):
    """An error caused by the user's input: the CLI prints its message on one line and exits 2."""


class ConfigError(MoelabError, ValueError):
    """A config value that is unknown, malformed or out of range."""


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _config_class(tp) -> type | None:
    """The Config subclass inside a type annotation such as `RouterConfig` or `RouterConfig | None`."""
    if isinstance(tp, type) and issubclass(tp, Config):
        return tp
    for arg in typing.get_args(tp):
        if isinstance(arg, type) and issubclass(arg, Config):
            return arg
    return None


def _allows_none(tp) -> bool:
    return tp is type(None) or type(None) in typing.get_args(tp)


def _coerce(value: Any, tp, path: str) -> Any:
    """Check a plain (TOML/JSON) value against a field annotation, converting int -> float where asked."""
    if value is None:
        if _allows_none(tp) or tp is Any:
            return None
        raise ConfigError(f"{path} may not be empty (None)")
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{path}={value!r} has the wrong type (expected {_type_name(tp)})")
    if origin is typing.Literal:
        if value not in args:
            allowed = ", ".join(repr(a) for a in args)
            raise ConfigError(f"{path}={value!r} is not one of {allowed}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}={value!r} should be a list")
        inner = args[0] if args else Any
        return [_coerce(v, inner, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}={value!r} should be a table")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}={value!r} should be true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{path}={value!r} should be an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}={value!r} should be a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}={value!r} should be a string")
        return value
    return value


def _type_name(tp) -> str:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    names = []
    for a in args:
        names.append(getattr(a, "__name__", str(a)))
    return " or ".join(names) or getattr(tp, "__name__", str(tp))


@dataclasses.dataclass(kw_only=True)
class Config:
    """Base of every config dataclass."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the field when a value is out of range. Override per class."""

    # ---- dict round trip -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = v.to_dict() if isinstance(v, Config) else _plain(v)
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None, *, path: str = "") -> "Config":
        d = dict(d or {})
        types_ = _field_types(cls)
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(d) - names)
        if unknown:
            where = f"{path}." if path else ""
            raise ConfigError(
                f"unknown config key {where}{unknown[0]} (known keys: {', '.join(sorted(names))})"
            )
        kwargs = {}
        for name, value in d.items():
            fpath = f"{path}.{name}" if path else name
            sub = _config_class(types_[name])
            if sub is not None and isinstance(value, dict):
                kwargs[name] = sub.from_dict(value, path=fpath)
            else:
                kwargs[name] = _coerce(value, types_[name], fpath)
        return cls(**kwargs)

    def replace(self, **changes) -> "Config":
        return dataclasses.replace(self, **changes)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)


def _plain(v):
    if isinstance(v, tuple):
        return [_plain(x) for x in v]
    if isinstance(v, list):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


# ---- TOML and overrides ----------------------------------------------------------------------
def read_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path} is not valid TOML: {e}") from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a", "b", "c"], value); value parsed as a TOML value, else kept as a string."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"malformed --set {text!r}: expected section.field=value")
    raw = raw.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        if raw.lower() in ("none", "null"):
            value = None
        else:
            value = raw
    return key.split("."), value


def apply_overrides(d: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.field=value` strings to a nested dict (a deep copy is returned)."""
    out = json.loads(json.dumps(d))
    for text in overrides:
        keys, value = parse_override(text)
        node = out
        for k in keys[:-1]:
            nxt = node.setdefault(k, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {text!r}: {k} is a value, not a section")
            node = nxt
        node[keys[-1]] = value
    return out


def require(cond: bool, message: str) -> None:
    """Validation helper: raise ConfigError(message) unless cond."""
    if not cond:
        raise ConfigError(message)
