"""One config mechanism for every trainer: a defaults schema, a YAML file, dotted overrides.

The defaults dict *is* the schema: a key that is not in it is an error, and a value must have
the type of its default (ints are accepted where floats are expected; a default of ``None``
accepts anything). Errors name the offending dotted key.

    cfg = load_config("configs/phantom.yaml", ["optim.lr=0.01"], SEG_DEFAULTS)
    cfg["optim"]["lr"]  # 0.01
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from medseg_dpl.errors import MedsegError


class ConfigError(MedsegError, ValueError):
    """A config file or override that does not fit the schema; the message names the key."""


def parse_override(text: str) -> tuple[str, Any]:
    """``"optim.lr=0.01"`` -> ``("optim.lr", 0.01)``; the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {key}: cannot parse value {raw!r}: {exc}") from exc
    return key, value


def _check_type(key: str, default: Any, value: Any) -> Any:
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, str):
            # PyYAML (YAML 1.1) reads "1e-3" (no dot) as a string; accept it as the number it is.
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if isinstance(default, (list, tuple)):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return list(value)
    if isinstance(default, dict):
        if default:
            raise ConfigError(f"{key}: is a section; set its keys ({', '.join(default)})")
        if not isinstance(value, Mapping):  # an empty-dict default is a free-form mapping
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    return value


def merge(base: dict, update: Mapping, prefix: str = "") -> dict:
    """Recursively merge ``update`` into a copy of ``base``, validating keys and types."""
    out = copy.deepcopy(base)
    for k, v in update.items():
        key = f"{prefix}{k}"
        if k not in out:
            known = ", ".join(sorted(out)) or "none"
            raise ConfigError(f"unknown config key {key!r} (known here: {known})")
        if isinstance(out[k], dict) and out[k] and not isinstance(v, Mapping):
            raise ConfigError(f"{key}: is a section; expected a mapping, got {v!r}")
        if isinstance(out[k], dict) and out[k]:
            out[k] = merge(out[k], v, key + ".")
        else:
            out[k] = _check_type(key, out[k], v)
    return out


def set_dotted(cfg: dict, key: str, value: Any) -> dict:
    """Return a copy of ``cfg`` with ``a.b.c`` set to ``value`` (validated)."""
    nested: Any = value
    for part in reversed(key.split(".")):
        nested = {part: nested}
    return merge(cfg, nested)


def read_yaml(path: str | Path) -> Mapping:
    """A config file's top-level mapping, not yet validated; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def load_config(path: str | Path | None, overrides: Iterable[str] = (),
                defaults: Mapping | None = None) -> dict:
    """Defaults <- YAML file <- dotted overrides, each layer validated against the defaults."""
    cfg = copy.deepcopy(dict(defaults or {}))
    if path is not None:
        path = Path(path)
        data = read_yaml(path)
        try:
            cfg = merge(cfg, data)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from exc
    for text in overrides:
        key, value = parse_override(text)
        cfg = set_dotted(cfg, key, value)
    return cfg


def save_config(cfg: Mapping, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(dict(cfg), sort_keys=False), encoding="utf-8")
