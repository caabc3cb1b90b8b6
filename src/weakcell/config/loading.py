"""Loading a config: YAML files (``base: other.yaml`` chains), ``key=value`` overrides, validation
against the schema with errors that name the key, and the resolved config written into each output.

A YAML file may start with ``base: other.yaml`` (relative to itself) and then only say what changes.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from weakcell.config.schema import Config
from weakcell.errors import WeakcellError
from weakcell.outputs import atomic_write_text


class ConfigError(WeakcellError, ValueError):
    """A config file or override that does not fit the schema; the message says which key and why."""


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a config file, following ``base:`` links (each relative to the file that names it)."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path} (the shipped ones are in configs/)")
    if path.resolve() in seen:
        raise ConfigError(f"config {path} names itself as a base (chain: {' -> '.join(map(str, seen))})")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config {path} is not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"config {path} must be a mapping of keys, got {type(raw).__name__}")
    base = raw.pop("base", None)
    if base is None:
        return raw
    return deep_merge(_read_yaml(path.parent / str(base), (*seen, path.resolve())), raw)


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``update`` laid over it, section by section (a new dict; neither input changes)."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _section_at(keys: list[str]) -> type[BaseModel] | None:
    """The schema class reached by following ``keys`` from the root, or None past a leaf."""
    model: type[BaseModel] = Config
    for key in keys:
        field = model.model_fields.get(key)
        annotation = field.annotation if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model


def all_keys(model: type[BaseModel] = Config, prefix: str = "") -> list[str]:
    """Every dotted key of the schema, e.g. ``synthetic.n_train``."""
    keys = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys.extend(all_keys(annotation, f"{prefix}{name}."))
        else:
            keys.append(f"{prefix}{name}")
    return keys


def _unknown_key_message(dotted: str) -> str:
    keys = all_keys()
    sections = sorted({k.rsplit(".", 1)[0] for k in keys if "." in k})
    close = difflib.get_close_matches(dotted, keys + sections, n=3, cutoff=0.6)
    if not close:  # a wrong section name: suggest by the last part alone
        leaf = dotted.rsplit(".", 1)[-1]
        close = [k for k in keys if difflib.get_close_matches(leaf, [k.rsplit(".", 1)[-1]], cutoff=0.75)]
    hint = f"; did you mean {' or '.join(repr(k) for k in close[:3])}?" if close else ""
    return f"unknown config key {dotted!r}{hint} (list every key with `weakcell keys`)"


def _check_keys(raw: dict[str, Any], prefix: list[str]) -> None:
    model = _section_at(prefix)
    if model is None:
        return
    for key, value in raw.items():
        dotted = [*prefix, str(key)]
        if key not in model.model_fields:
            raise ConfigError(_unknown_key_message(".".join(dotted)))
        if isinstance(value, dict):
            _check_keys(value, dotted)


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["train.epochs=3", "data.dataset=hpa2021"]`` -> nested dict; values are parsed as YAML scalars
    or lists (``3`` is an int, ``[64,128]`` a list, ``null`` None); nothing is ever evaluated."""
    nested: dict[str, Any] = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. synthetic.n_train=100)")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError:
            value = text
        parts = key.strip().split(".")
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is a value, not a section")
        node[parts[-1]] = value
    return nested


def load_config(path: str | os.PathLike[str] | None = None, overrides: list[str] | None = None) -> Config:
    """Load ``path`` (or the defaults), apply ``overrides`` and validate against the schema."""
    raw = _read_yaml(Path(path)) if path else {}
    raw = deep_merge(raw, parse_overrides(overrides or []))
    _check_keys(raw, [])
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        problems = [
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']} (got {e.get('input')!r})" for e in err.errors()
        ]
        source = f" in {path}" if path else ""
        raise ConfigError(f"invalid config{source}: " + "; ".join(problems)) from None


def save_config(cfg: Config, folder: str | os.PathLike[str]) -> Path:
    """Write the resolved config as ``folder/config.yaml`` (every output folder gets one)."""
    target = Path(folder) / "config.yaml"
    target.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
    return atomic_write_text(target, text)
