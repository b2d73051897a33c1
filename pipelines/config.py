"""Typed, validated configs at the edge: YAML/JSON/dicts -> frozen dataclasses, with `--set
a.b=value` overrides. Unknown keys and wrong types raise ConfigError naming the dotted key
before anything starts; past this point code trusts its config.
"""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


def config_error() -> type[ValueError]:
    """The one ConfigError (vaemodels', which models raise for their own fields): a config key is
    unknown, missing, or has a bad value. Loaded on first use, because vaemodels imports torch and
    reading a config must stay quick (the CLI checks flags and the tracking server before torch)."""
    from vaemodels.common import ConfigError

    return ConfigError


def __getattr__(name: str) -> Any:  # `from pipelines.config import ConfigError`
    if name == "ConfigError":
        return config_error()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML (or JSON) mapping; an empty file is an empty mapping."""
    path = Path(path)
    if not path.is_file():
        raise config_error()(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise config_error()(f"config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise config_error()(f"config file {path} must hold a mapping at the top level")
    return data


def apply_overrides(data: dict[str, Any], assignments: list[str]) -> dict[str, Any]:
    """Apply `key.sub=value` strings (values parsed as YAML scalars) to a nested mapping copy."""
    out = _deep_copy(data)
    for assignment in assignments:
        key, sep, raw = assignment.partition("=")
        if not sep or not key:
            raise config_error()(f"--set expects key=value, got {assignment!r}")
        set_dotted(out, key, yaml.safe_load(raw) if raw != "" else None)
    return out


def set_dotted(data: dict[str, Any], dotted_key: str, value: Any) -> None:
    node = data
    *parents, last = dotted_key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise config_error()(f"cannot set {dotted_key!r}: {part!r} is not a section")
    node[last] = value


def _deep_copy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data


def from_dict(cls: type[T], data: dict[str, Any] | None, path: str = "") -> T:
    """Build dataclass `cls` from a mapping, recursing into dataclass-typed fields."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise config_error()(f"{path[:-1] or 'config'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        names = ", ".join(f"{path}{k}" for k in unknown)
        raise config_error()(f"unknown config key(s): {names}; known keys{' in ' + path[:-1] if path else ''}: "
                          f"{', '.join(sorted(fields))}")
    values = {}
    for name, field in fields.items():
        key = f"{path}{name}"
        if name not in data:
            if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
                raise config_error()(f"missing required config key: {key}")
            continue
        values[name] = _coerce(hints[name], data[name], key)
    try:
        return cls(**values)
    except config_error():
        raise
    except (TypeError, ValueError) as exc:
        raise config_error()(f"{path[:-1] or cls.__name__}: {exc}") from exc


def _coerce(hint: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(option, value, key)
            except config_error() as exc:
                errors.append(str(exc))
        raise config_error()(errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of {hint}")
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, key + ".")
    if hint is Any:
        return value
    if origin in (dict,):
        if not isinstance(value, dict):
            raise config_error()(f"{key} must be a mapping, got {type(value).__name__} {value!r}")
        return dict(value)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise config_error()(f"{key} must be a list, got {type(value).__name__} {value!r}")
        item = args[0] if args else Any
        items = [_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if hint is float:
        if isinstance(value, str) and _SCIENTIFIC.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads `1e-4` (no dot) as a string; it is a number to a user
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise config_error()(f"{key} must be a number, got {type(value).__name__} {value!r}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise config_error()(f"{key} must be an integer, got {type(value).__name__} {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise config_error()(f"{key} must be true or false, got {type(value).__name__} {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise config_error()(f"{key} must be a string, got {type(value).__name__} {value!r}")
        return value
    return value


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}: for logging a whole config as MLflow params."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
