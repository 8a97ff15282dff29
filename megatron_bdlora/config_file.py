"""Settings files read into dataclasses: one section at a time, unknown keys and wrong types named by their path.

Used by the trainer's run config (training/config.py) and the server's --config (serve.py): a typo in a key is an
error naming it, never a silent fallback to a default.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any


class ConfigError(ValueError):
    """A configuration problem, reported before any process group work."""


def build_section(cls: type, raw: Any, path: str) -> Any:
    """Instantiate a config dataclass from a mapping, rejecting unknown keys and wrong types by path."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{path or 'config'} must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        where = f" in {path}" if path else ""
        keys = [f"{path}.{k}".lstrip(".") for k in unknown]
        raise ConfigError(f"unknown config key(s) {keys}{where}; allowed: {sorted(names)}")
    kwargs = {}
    for key, value in raw.items():
        hint = hints[key]
        sub = f"{path}.{key}".lstrip(".")
        if dataclasses.is_dataclass(hint):
            kwargs[key] = build_section(hint, value, sub)
        else:
            kwargs[key] = _coerce(value, hint, sub)
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, path: str) -> Any:
    """Check (and gently coerce: int -> float) a scalar or list against its annotation."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], path)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path} must be a list, got {value!r}")
        return [_coerce(v, args[0], f"{path}[{i}]") for i, v in enumerate(value)]
    if hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path} must be a mapping, got {value!r}")
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(f"{path} must be {hint.__name__}, got {value!r}")
    return value
