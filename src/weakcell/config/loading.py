"""Loading a config: YAML files (``base: other.yaml`` chains), ``key=value`` overrides, validation
against the schema with errors that name the key and where it was set, and the resolved config written
into each output.

A YAML file may start with ``base: other.yaml`` and then only say what changes. The base is looked up
beside the file first, then among the kit's shipped configs (``KIT_CONFIGS``), so a project config kept
anywhere (``weakcell init``) can say ``base: hpa2021.yaml``.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from weakcell.config.schema import Config
from weakcell.errors import WeakcellError
from weakcell.outputs import atomic_write_text

# The kit's shipped configs (a source checkout: <repo>/configs beside src/).
KIT_CONFIGS = Path(__file__).resolve().parents[3] / "configs"
COMMAND_LINE = "the command line"


class ConfigError(WeakcellError, ValueError):
    """A config file or override that does not fit the schema; the message says which key and why."""


@dataclass
class RawConfig:
    """A config file's keys (its ``base:`` chain merged) and, per dotted key, the file that set it."""

    values: dict[str, Any] = dataclasses.field(default_factory=dict)
    origins: dict[str, str] = dataclasses.field(default_factory=dict)


def find_base(path: Path, base: str) -> Path:
    """The file ``base:`` names: beside ``path`` first, then among the kit's configs; an error lists both."""
    candidates = [path.parent / base]
    if not Path(base).is_absolute():
        candidates.append(KIT_CONFIGS / base)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    shipped = ", ".join(sorted(p.name for p in KIT_CONFIGS.glob("*.yaml"))) or "none found"
    raise ConfigError(
        f"config {path}: base {base!r} not found beside it nor in the kit's configs "
        f"({' or '.join(map(str, candidates))}); shipped: {shipped}"
    )


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> RawConfig:
    """Read a config file, following ``base:`` links (``find_base``); each key remembers its file."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path} (the shipped ones are in {KIT_CONFIGS})")
    if path.resolve() in seen:
        raise ConfigError(f"config {path} names itself as a base (chain: {' -> '.join(map(str, seen))})")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config {path} is not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"config {path} must be a mapping of keys, got {type(raw).__name__}")
    base = raw.pop("base", None)
    _check_keys(raw, [], f"in {path}")
    own = RawConfig(raw, {key: str(path) for key in flat_keys(raw)})
    if base is None:
        return own
    inherited = _read_yaml(find_base(path, str(base)), (*seen, path.resolve()))
    return RawConfig(deep_merge(inherited.values, raw), {**inherited.origins, **own.origins})


def flat_keys(tree: dict[str, Any], prefix: str = "") -> list[str]:
    """The dotted keys of a nested dict's leaves (a dict value is a section, anything else a leaf)."""
    keys: list[str] = []
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            keys.extend(flat_keys(value, f"{prefix}{key}."))
        else:
            keys.append(f"{prefix}{key}")
    return keys


def deep_merge(base: dict[str, Any], update: dict[str, Any], at: tuple[str, ...] = ()) -> dict[str, Any]:
    """``base`` with ``update`` laid over it, section by section (a new dict; neither input changes).

    Only the schema's sections merge: a setting whose value is a mapping (``ablate.variants``,
    ``model.backbone_kwargs``) is replaced whole, as a list is, so ``ablate.variants={}`` means no variants
    rather than the base's variants plus none."""
    merged = dict(base)
    for key, value in update.items():
        inside = (*at, key)
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and _section_at(list(inside)):
            merged[key] = deep_merge(merged[key], value, inside)
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


def _field_at(dotted: str) -> Any:
    """The pydantic field of a dotted leaf key."""
    *sections, leaf = dotted.split(".")
    model = _section_at(sections)
    assert model is not None, dotted
    return model.model_fields[leaf]


def _value_text(value: Any) -> str:
    """A value as it would be written on the command line (YAML flow style)."""
    if isinstance(value, str):
        return value if value else "''"
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()


def describe_keys(cfg: Config | None = None, prefixes: tuple[str, ...] = ("",)) -> list[tuple[str, str, str]]:
    """``(key, value, description)`` of every key starting with one of ``prefixes`` (``"train."`` a
    section, ``"name"`` one key), the value as ``cfg`` has it (the defaults when None)."""
    tree = (cfg or Config()).model_dump(mode="json")
    rows = []
    for key in all_keys():
        if not key.startswith(prefixes):
            continue
        value: Any = tree
        for part in key.split("."):
            value = value[part]
        rows.append((key, _value_text(value), _field_at(key).description or ""))
    return rows


def _unknown_key_message(dotted: str, where: str) -> str:
    keys = all_keys()
    sections = sorted({k.rsplit(".", 1)[0] for k in keys if "." in k})
    close = difflib.get_close_matches(dotted, keys + sections, n=3, cutoff=0.6)
    if not close:  # a wrong section name: suggest by the last part alone
        leaf = dotted.rsplit(".", 1)[-1]
        close = [k for k in keys if difflib.get_close_matches(leaf, [k.rsplit(".", 1)[-1]], cutoff=0.75)]
    hint = f"; did you mean {' or '.join(repr(k) for k in close[:3])}?" if close else ""
    return f"unknown config key {dotted!r} {where}{hint} (list every key with `weakcell keys`)"


def _check_keys(raw: dict[str, Any], prefix: list[str], where: str) -> None:
    model = _section_at(prefix)
    if model is None:
        return
    for key, value in raw.items():
        dotted = [*prefix, str(key)]
        if key not in model.model_fields:
            raise ConfigError(_unknown_key_message(".".join(dotted), where))
        if isinstance(value, dict):
            _check_keys(value, dotted, where)


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
    """Load ``path`` (or the defaults), apply ``overrides`` and validate against the schema. An error
    names the key and where its value came from: the command line, or the file that set it."""
    file = _read_yaml(Path(path)) if path else RawConfig()
    given = parse_overrides(overrides or [])
    _check_keys(given, [], f"on {COMMAND_LINE}")
    raw = deep_merge(file.values, given)
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        problems = [_problem(e, given, file.origins, path) for e in err.errors()]
        raise ConfigError("invalid config: " + "; ".join(problems)) from None


def _problem(error: Any, given: dict[str, Any], origins: dict[str, str], path: Any) -> str:
    """One validation error as ``key on the command line: why`` or ``key in FILE: why``: the value that
    failed is blamed where it was set."""
    dotted = ".".join(str(part) for part in error["loc"])

    def covers(key: str) -> bool:  # a list item or union member's error lies under its key
        return dotted == key or dotted.startswith(key + ".")

    given_keys = [key for key in flat_keys(given) if covers(key)]
    file_keys = sorted((key for key in origins if covers(key)), key=len, reverse=True)
    if given_keys:
        where = f" on {COMMAND_LINE}"
    elif file_keys:
        where = f" in {origins[file_keys[0]]}"
    else:
        where = f" in {path}" if path else ""
    return f"{dotted}{where}: {error['msg']} (got {error.get('input')!r})"


def save_config(cfg: Config, folder: str | os.PathLike[str]) -> Path:
    """Write the resolved config as ``folder/config.yaml`` (every output folder gets one)."""
    target = Path(folder) / "config.yaml"
    target.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
    return atomic_write_text(target, text)
