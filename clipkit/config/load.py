"""Loading the run configuration: the dataclasses' defaults <- a YAML file <- dotted overrides, every key and
type checked against the schema, then validated; and writing the resolved config beside a run.

    cfg = load_config("my.yaml", ["train.global_batch_size=64", "model.name=ViT-B-32"])

An unknown key or a value of the wrong type raises ConfigError naming the dotted key, so a typo never silently
falls back to a default.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Union

import yaml

from .schema import RENAMED, Config, ConfigError
from .validate import validate

# --------------------------------------------------------------------------------------------------
# Building dataclasses from plain dicts, checking every key and type.


# String keys whose value may be the word off, which YAML 1.1 reads as false (`train.compile: off`).
OFF_WORD_KEYS = ("train.compile",)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _coerce(value: Any, tp: Any, key: str) -> Any:
    tp, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"config key '{key}' may not be null (expected {tp.__name__})")
    if tp == Union[float, str]:  # a number, or a word such as "auto" (checked by validate)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            return float(value) if _looks_like_float(value) else value
        raise ConfigError(f"config key '{key}' expects a number or a word such as auto, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping of sub-keys, got {value!r}")
        return _build(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _looks_like_float(value):
            return float(value)  # YAML 1.1 reads "1e-3" (no dot) as a string
    elif tp is str:
        if isinstance(value, str):
            return value
        if value is False and key in OFF_WORD_KEYS:
            return "off"
    elif tp == list[int]:
        if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return list(value)
        raise ConfigError(f"config key '{key}' expects a list of integers such as [16, 32], got {value!r}")
    elif tp == list[str]:
        if isinstance(value, str):  # an override such as curate.filters.languages=en,de
            return [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value)
        raise ConfigError(f"config key '{key}' expects a list of strings such as [en, de], got {value!r}")
    else:  # pragma: no cover - only the types above are used in Config
        raise TypeError(f"unsupported config type {tp} at '{key}'")
    raise ConfigError(f"config key '{key}' expects {tp.__name__}, got {type(value).__name__} {value!r}")


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown and _join(prefix, unknown[0]) in RENAMED:
        old = _join(prefix, unknown[0])
        raise ConfigError(f"config key '{old}' is now '{RENAMED[old]}'")
    if unknown:
        where = f"'{prefix}'" if prefix else "the top level"
        raise ConfigError(
            f"unknown config key '{_join(prefix, unknown[0])}' (valid keys under {where}: "
            f"{', '.join(sorted(names))})"
        )
    kwargs = {k: _coerce(v, hints[k], _join(prefix, k)) for k, v in data.items()}
    return cls(**kwargs)


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _parse_override(item: str) -> dict:
    if "=" not in item:
        raise ConfigError(f"override '{item}' is not of the form dotted.key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{item}' has an empty key")
    # YAML scalars: 64 -> int, 1e-3 -> float, true -> bool, null -> None, anything else a string.
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    node: dict = {}
    cursor = node
    parts = key.split(".")
    for part in parts[:-1]:
        cursor[part] = {}
        cursor = cursor[part]
    cursor[parts[-1]] = value
    return node


def _looks_like_float(raw: str) -> bool:
    try:
        float(raw)
        return True
    except ValueError:
        return False


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """The dataclasses' defaults <- the user's YAML file <- dotted overrides, validated."""
    data = _read_yaml(Path(path)) if path is not None else {}
    for item in overrides:
        data = _merge(data, _parse_override(item))
    return config_from_dict(data)


def config_from_dict(data: dict) -> Config:
    cfg = _build(Config, data)
    validate(cfg)
    return cfg


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
