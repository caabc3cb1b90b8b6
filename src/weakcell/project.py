"""``weakcell init TEMPLATE DIR [key=value ...]``: one config per project, which every stage then reads.

It writes ``DIR/weakcell.yaml``: ``base:`` one of the kit's configs (found beside the file or among the
kit's ``configs/``, ``weakcell.config.loading.find_base``), then the choices a competitor makes once, each
with a comment: where outputs go (``paths.root`` = DIR), where the competition files are (``data.dir``),
the segmentation backend, the backbone and its initial weights, and whether to refine. Every ``make``
target then takes ``CONFIG=DIR/weakcell.yaml`` and nothing else: ``refine.rounds: 0`` reaches thresholds,
inference, evaluation, the weights dataset and the kernels from this one line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from weakcell.config import Config, ConfigError, load_config, parse_overrides
from weakcell.config.lineage import nested
from weakcell.config.loading import KIT_CONFIGS, _section_at
from weakcell.errors import StageError, UnknownName
from weakcell.outputs import atomic_write_text

CONFIG_NAME = "weakcell.yaml"


@dataclass(frozen=True)
class Template:
    """A kind of project: the kit config it starts from and a line on what it is for."""

    base: str
    about: str


TEMPLATES: dict[str, Template] = {
    "hpa2021": Template("hpa2021.yaml", "the 2021 Single Cell Classification data (cell-level submission)"),
    "hpa2018": Template("hpa2018.yaml", "the 2018 Image Classification data (image-level submission)"),
    "competition": Template(
        "competition.yaml",
        "the 2021 data on one GPU (ResNet-50 from ImageNet, Cellpose-SAM: `make weights` first)",
    ),
}

# The choices written into every project file, in order, with the comment each gets (the schema's
# description says the rest; `weakcell keys PREFIX` lists it).
CHOICES: dict[str, str] = {
    "name": "the run: runs/<name>/, submissions/<name>/, the Kaggle dataset and kernel names",
    "paths.root": "every output goes under here: folds/, cache/, runs/, submissions/, reports/, kernels/, dist/",
    "data.dir": "the unzipped competition files (train/, train.csv, test/, sample_submission.csv); "
    "null = {paths.root}/data/<dataset>, where `make download` puts them",
    "segment.backend": "classical (CPU, no weights) | cellpose | cellpose+sam (their weights: `make weights`)",
    "model.backbone": "any timm model name (timm.list_models())",
    "model.pretrained_file": "initial backbone weights: null = random; weights = weights/<backbone>.safetensors "
    "from `make weights`",
    "refine.rounds": "pseudo-label rounds; 0 = none (thresholds, infer, evaluate, weights-dataset and "
    "kernels read it from here)",
}


def _yaml_scalar(value: Any) -> str:
    """A value as YAML flow text, quoted where YAML would read it as something else (``'null'``)."""
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()


def render(tree: dict[str, Any], comments: dict[str, str], prefix: str = "", indent: str = "") -> list[str]:
    """YAML lines of a nested dict in its order, ``# comment`` after the keys that have one."""
    lines = []
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value and _section_at(dotted.split(".")) is not None:
            lines.append(f"{indent}{key}:")
            lines += render(value, comments, f"{dotted}.", indent + "  ")
            continue
        comment = f"  # {comments[dotted]}" if dotted in comments else ""
        lines.append(f"{indent}{key}: {_yaml_scalar(value)}{comment}")
    return lines


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``, down to the schema's leaves (a dict-valued key stays whole)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and _section_at(dotted.split(".")) is not None:
            flat.update(_flat(value, f"{dotted}."))
        else:
            flat[dotted] = value
    return flat


def project_text(template: str, folder: Path, overrides: list[str]) -> str:
    """The project file's text: the template's base, the choices (the base's values unless overridden,
    ``paths.root`` = ``folder``, a relative ``data.dir`` made absolute) and any other override given."""
    if template not in TEMPLATES:
        raise UnknownName(f"unknown project template {template!r}; known: {', '.join(TEMPLATES)}")
    spec = TEMPLATES[template]
    given = _flat(parse_overrides(overrides))
    if isinstance(given.get("data.dir"), str) and given["data.dir"]:
        # relative to where the command runs, not to paths.root
        given["data.dir"] = str(Path(given["data.dir"]).expanduser().resolve())
    given["paths.root"] = str(folder.resolve())
    base = _flat(load_config(KIT_CONFIGS / spec.base).model_dump(mode="json"))
    values = {key: given.get(key, base[key]) for key in CHOICES}
    extras = {key: value for key, value in given.items() if key not in CHOICES}
    header = [
        f"# weakcell project: {spec.about}. Written by `weakcell init {template} {folder}`.",
        f"# Every stage reads this one file: make <stage> CONFIG={folder / CONFIG_NAME} (or weakcell <stage> "
        "<this file>).",
        "# Keys and defaults: weakcell keys [PREFIX]; what a stage reads: weakcell <stage> --help.",
        f"base: {spec.base}  # the kit's configs/{spec.base}: every key not set here",
    ]
    body = render(nested(values), CHOICES)
    if extras:
        body += ["", "# given to weakcell init", *render(nested(extras), {})]
    return "\n".join(header + body) + "\n"


def init(args: list[str]) -> Path:
    """``weakcell init TEMPLATE DIR [key=value ...] [--force]``: write ``DIR/weakcell.yaml`` (checked to
    load, the backbone to exist) and print what to run next."""
    force = "--force" in args
    positional = [a for a in args if "=" not in a and a != "--force"]
    overrides = [a for a in args if "=" in a]
    if len(positional) != 2:
        raise ConfigError(
            f"usage: weakcell init {{{','.join(TEMPLATES)}}} DIR [key=value ...] [--force], e.g. "
            "weakcell init hpa2021 ~/hpa data.dir=~/hpa-single-cell-image-classification"
        )
    template, folder = positional[0], Path(positional[1]).expanduser().resolve()
    target = folder / CONFIG_NAME
    if target.exists() and not force:
        raise StageError(f"{target} exists; edit it, or rewrite it with --force")
    text = project_text(template, folder, overrides)
    folder.mkdir(parents=True, exist_ok=True)
    # a draft beside the target (its base resolves as the target's will) must load before the target exists
    draft = atomic_write_text(target.with_name(f".{target.name}.draft"), text)
    try:
        cfg = load_config(draft)
        from weakcell.models.backbone import check_backbone

        check_backbone(cfg.model.backbone)
    finally:
        draft.unlink()
    atomic_write_text(target, text)
    summary(cfg, target)
    return target


def summary(cfg: Config, target: Path) -> None:
    print(
        f"init: {target} ({cfg.data.dataset}, data.dir={cfg.data_dir}, {cfg.model.backbone}, "
        f"segment.backend={cfg.segment.backend}, refine.rounds={cfg.refine.rounds})\n"
        f"  next: make check CONFIG={target}   (then folds, cache, train, ... with the same CONFIG)"
    )


def init_main(argv: list[str]) -> int:
    """``weakcell init ...`` from the command line: exit 0, or 2 with one ``error:`` line."""
    import sys

    from weakcell.cli import EXPECTED_ERRORS

    try:
        init(argv)
    except EXPECTED_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
