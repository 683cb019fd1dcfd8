"""Strict loading of the config tree: YAML files merged in order, then --set overrides.

Every leaf value remembers where it came from (a file or a --set flag) so that an
error can name the exact place to fix. Unknown keys are refused with the closest
valid spelling: a typo that silently falls back to a default is how a week of
cluster time gets lost.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from megamem.config.errors import ConfigError
from megamem.config.schema import Config
from megamem.config.sources import Sources
from megamem.config.validate import validate


class _Loader(yaml.SafeLoader):
    """yaml.SafeLoader that also reads `3e-3` as a float (YAML 1.1 wants `3.0e-3`)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_config(paths: Iterable[str | Path], overrides: Iterable[str] = ()) -> Config:
    """Load, merge, override, type-check and validate. Raises ConfigError."""
    raw: dict[str, Any] = {}
    sources = Sources()
    for path in paths:
        _merge(raw, _read_yaml(Path(path)), str(path), sources, prefix="")
    for override in overrides:
        key, value = _parse_override(override)
        _merge(raw, _nest(key, value), f"--set {override}", sources, prefix="")
    config = _build(Config, raw, sources, prefix="")
    validate(config, sources)
    return config


def config_from_dict(data: dict[str, Any], source: str = "config") -> Config:
    """Build and validate a config from a plain mapping (e.g. one stored beside exported weights)."""
    sources = Sources()
    _merge({}, data, source, sources, prefix="")
    config = _build(Config, data, sources, prefix="")
    validate(config, sources)
    return config


def config_to_dict(config: Config) -> dict[str, Any]:
    return dataclasses.asdict(config)


def save_config(config: Config, path: str | Path) -> None:
    """Write the resolved config so that a run directory says exactly what ran."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))
    tmp.replace(path)


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}. "
                          "Fix: pass an existing YAML file, e.g. configs/cpu-smoke.yaml")
    try:
        data = yaml.load(path.read_text(), Loader=_Loader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} is not valid YAML ({getattr(err, 'problem', err)}). "
                          "Fix the syntax there") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (model:, train:, ...), "
                          f"got {type(data).__name__}")
    return data


def _parse_override(override: str) -> tuple[str, Any]:
    key, sep, text = override.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {override}: expected key=value, e.g. --set train.steps=100")
    try:
        value = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError:
        value = text
    return key.strip(), value


def _nest(dotted: str, value: Any) -> dict[str, Any]:
    for part in reversed(dotted.split(".")):
        value = {part: value}
    return value


def _merge(into: dict, new: dict, source: str, sources: Sources, prefix: str) -> None:
    for key, value in new.items():
        key = str(key)
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value, source, sources, prefix=f"{dotted}.")
            continue
        into[key] = value
        _record(value, dotted, source, sources)


def _record(value: Any, dotted: str, source: str, sources: Sources) -> None:
    sources[dotted] = source
    if isinstance(value, dict):
        for key, sub in value.items():
            _record(sub, f"{dotted}.{key}", source, sources)


def _build(cls: type, raw: Any, sources: Sources, prefix: str) -> Any:
    where = prefix.rstrip(".") or "the config"
    if not isinstance(raw, dict):
        raise ConfigError(f"{sources.of(where)}: {where} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            dotted = f"{prefix}{key}"
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"did you mean {prefix}{close[0]}?" if close else f"valid keys here: {', '.join(names)}"
            raise ConfigError(f"{sources.of(dotted)}: unknown key {dotted}; {hint}")
    values = {name: _convert(raw[name], hints[name], f"{prefix}{name}", sources) for name in names if name in raw}
    return cls(**values)


def _convert(value: Any, hint: Any, dotted: str, sources: Sources) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, sources, prefix=f"{dotted}.")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(value, inner, dotted, sources)
    if origin is typing.Literal:
        if value not in args:
            raise _type_error(dotted, value, " or ".join(repr(a) for a in args), sources)
        return value
    if origin is list:
        if not isinstance(value, list):
            raise _type_error(dotted, value, "a list", sources)
        return [_convert(v, args[0], f"{dotted}[{i}]", sources) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise _type_error(dotted, value, "a mapping", sources)
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise _type_error(dotted, value, "true or false", sources)
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _type_error(dotted, value, "an integer", sources)
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _type_error(dotted, value, "a number", sources)
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise _type_error(dotted, value, "a string", sources)
        return value
    raise TypeError(f"config schema uses an unsupported type {hint!r} at {dotted}")


def _type_error(dotted: str, value: Any, expected: str, sources: Sources) -> ConfigError:
    source = sources.of(dotted)
    return ConfigError(f"{source}: {dotted} must be {expected}, got {value!r} ({type(value).__name__})")
