"""Config dataclasses: to/from dict, TOML presets, dotted overrides, validation.

Every concern has one keyword-only dataclass deriving from `Config`. Settings flow one way:
dataclass defaults -> TOML preset -> `--set section.field=value` overrides, resolved once by the CLI.
Validation lives in each class's `validate()` and raises `ConfigError` with a message naming the field.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import types
import typing
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


NONE_WORDS = ("none", "null")


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


def _accepts_text(tp, text: str) -> bool:
    """Whether a field takes this string itself (a str field, or a Literal listing it)."""
    if tp is str:
        return True
    if typing.get_origin(tp) is typing.Literal:
        return text in typing.get_args(tp)
    return any(_accepts_text(a, text) for a in typing.get_args(tp)
               if typing.get_origin(tp) in (typing.Union, types.UnionType))


def _coerce(value: Any, tp, path: str) -> Any:
    """Check a plain (TOML/JSON) value against a field annotation, converting int -> float where asked.

    The word none (or null) is a value where the field lists it (model.moe.shared_placement=none),
    and the empty value where the field may be empty (train.freeze_router_after=none)."""
    if isinstance(value, str) and value.lower() in NONE_WORDS and not _accepts_text(tp, value):
        value = None
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
        if len(errors) == 1:  # one real type (X | None): its own message says more
            raise ConfigError(errors[0])
        ranged = [e for e in errors if "out of range" in e]  # the right type, the wrong size: say so
        if ranged:
            raise ConfigError(ranged[0])
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
    return _coerce_scalar(value, tp, path)


def _coerce_scalar(value: Any, tp, path: str) -> Any:
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}={value!r} should be true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer() and abs(value) <= 2**53:  # 1e40 is no count
                return int(value)
            raise ConfigError(f"{path}={value!r} should be an integer")
        if not -2**63 <= value < 2**63:  # torch and numpy take 64-bit integers: larger ones fail deep inside
            raise ConfigError(f"{path}={value} is out of range (an integer setting must fit in 64 bits)")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}={value!r} should be a number")
        if not math.isfinite(value):  # inf and nan pass every range check and fail later, silently
            raise ConfigError(f"{path}={value!r} should be a finite number")
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
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
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
        value = raw  # a bare word: none/null are resolved against the field's type (`_coerce`)
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


def _int_arg(text: str, low: int, high: int | None, bounds: str) -> int:
    """An argparse type's integer in low..high, refused as argparse expects (`bounds` says the range)."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < low or (high is not None and value > high):
        raise argparse.ArgumentTypeError(f"{value} must be {bounds}")
    return value


def positive_int(text: str) -> int:
    """An argparse type for counts and sizes: an integer >= 1 (0 never stands for "the default")."""
    return _int_arg(text, 1, None, ">= 1")


MAX_SEED = 2**63 - 1  # torch.manual_seed takes at most 2**64 - 1, numpy's generators no negative seed


def check_seed(value: int, name: str) -> None:
    """Refuse a seed torch or numpy cannot take (ConfigError naming `name`, a field or a flag)."""
    if not 0 <= value <= MAX_SEED:
        raise ConfigError(f"{name}={value} must be in 0..2**63-1 (a seed torch and numpy both accept)")


def seed_int(text: str) -> int:
    """An argparse type for --seed: an integer in 0..2**63-1."""
    return _int_arg(text, 0, MAX_SEED, "in 0..2**63-1")


def finite_float(text: str) -> float:
    """An argparse type for a real number: nan and inf pass every range check and fail later, so refuse them."""
    import argparse

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number")
    return value


def positive_float(text: str) -> float:
    """An argparse type for factors and sizes: a finite number > 0."""
    import argparse

    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be > 0")
    return value


def require(cond: bool, message: str) -> None:
    """Validation helper: raise ConfigError(message) unless cond."""
    if not cond:
        raise ConfigError(message)
