"""``weakcell <stage> [config.yaml] [key=value ...]``: one entry point for every stage.

Stages are looked up in ``STAGES`` (name -> ``module:function``), imported only when run, so a stage's
heavy dependencies (torch, cellpose, kaggle) never load for another. Each stage function takes the
resolved ``Config`` and does its work; ``python -m weakcell.<module>`` works the same way through
``stage_main``.

Over 400 lines on purpose: most of it is ``STAGES``, one declarative row per stage (its function, the
settings it reads and its help text), which ``weakcell keys`` and ``weakcell <stage> --help`` print; the
code around it is under 160 lines.
"""

from __future__ import annotations

import importlib
import logging
import sys
from collections.abc import Callable, Sequence
from typing import NamedTuple

from weakcell.config import Config, ConfigError, describe_keys, load_config
from weakcell.errors import WeakcellError


class Stage(NamedTuple):
    """A stage: its ``module:function``, one line of help, and the config keys it reads (dotted prefixes,
    ``"train."`` a section, ``"name"`` one key), which ``weakcell STAGE --help`` lists with their values."""

    target: str
    help: str
    reads: tuple[str, ...] = ()


# Keys many stages read: where things are, and which run.
_WHERE = ("paths.root", "data.")
_RUN = ("name", "paths.runs", "refine.rounds")
_CACHE = ("paths.cache", "cache.dir", "cache.crop_size", "segment.backend")
_NETWORK = (
    "model.",
    "mil.",
    "train.batch_size",
    "train.device",
    "train.amp",
    "train.channels_last",
    "train.workers",
)
_TRAINING = (
    *_WHERE,
    *_RUN,
    *_CACHE,
    "seed",
    "force",
    "folds.file",
    "paths.folds",
    "model.",
    "mil.",
    "train.",
    "infer.image_power",
    "infer.image_best_cell",
    "evaluate.verified",
    "checks.",
)
# The Kaggle stages compare (and the weights dataset packs) the whole-image model when the submission uses it.
_KAGGLE = (
    *_WHERE,
    *_RUN,
    "kaggle.",
    "image_model.",
    "infer.image_model_rule",
    "infer.image_model_power",
    "infer.image_level",
)

STAGES: dict[str, Stage] = {
    "init": Stage(
        "weakcell.project:init_main",
        "write DIR/weakcell.yaml, the one config of a project: weakcell init {hpa2021,hpa2018} DIR [key=value]",
    ),
    "check": Stage(
        "weakcell.check:run",
        "data layout (and each data.sources folder's), segmentation backend, weights files, run / weights dataset "
        "/ kernel agreement",
        (
            *_WHERE,
            "paths.data",
            "cache.splits",
            "segment.",
            "model.backbone",
            "model.pretrained_file",
            "weights.dir",
            "checks.max_missing_share",
            *_RUN,
            "kaggle.datasets_dir",
            "kaggle.weights_dataset",
            "kaggle.submit_variant",
            "paths.kernels",
        ),
    ),
    "data": Stage(
        "weakcell.synthetic.writer:run",
        "generate the synthetic HPA benchmark (hpa2021 layout + truth/)",
        ("paths.root", "paths.data", "data.", "synthetic.", "force"),
    ),
    "preview": Stage(
        "weakcell.synthetic.preview:run",
        "montage of composites, outlines, labels, a cell per class",
        ("paths.root", "paths.data", "paths.reports", "data.", "synthetic."),
    ),
    "folds": Stage(
        "weakcell.folds:run",
        "multilabel-stratified K-fold at image level -> folds/<dataset>.csv",
        (*_WHERE, "paths.data", "paths.folds", "folds.", "force"),
    ),
    "cache": Stage(
        "weakcell.cache.build:run",
        "segment every image, cache cell crops -> cache/<dataset>/<backend>/ (+ cache/<source>/<backend>/ each)",
        (*_WHERE, "paths.data", "paths.cache", "segment.", "cache.", "checks.", "force"),
    ),
    "cache-merge": Stage(
        "weakcell.cache.build:merge",
        "join the indexes written by --num-shards parts",
        (*_WHERE, *_CACHE, "cache.splits", "cache.num_shards", "checks.lock_wait_s"),
    ),
    "preview-cells": Stage(
        "weakcell.cache.preview:run",
        "outlines on real and synthetic images, a grid of crops",
        (*_WHERE, "paths.reports", *_CACHE, "segment."),
    ),
    "train": Stage(
        "weakcell.train:run",
        "K folds: cell model (weak labels) -> attention MIL -> OOF predictions",
        _TRAINING,
    ),
    "image-model": Stage(
        "weakcell.image_model:run",
        "K folds of a whole-image model on downscaled images -> runs/<name>/image_model/ (OOF, metrics)",
        (
            *_WHERE,
            *_RUN,
            *_CACHE,
            "seed",
            "force",
            "folds.file",
            "paths.folds",
            "image_model.",
            "train.",
            "infer.tta",
            "cache.workers",
            "checks.lock_wait_s",
        ),
    ),
    "refine": Stage(
        "weakcell.refine:run",
        "pseudo-label rounds: relabel cells from OOF outputs, retrain -> runs/<name>/round<r>/",
        (*_TRAINING, "refine.", "thresholds."),
    ),
    "ablate": Stage(
        "weakcell.ablate:run",
        "every variant on the same folds -> reports/leaderboard.md (+ .json, .png)",
        (*_TRAINING, "refine.", "thresholds.", "ablate.", "infer.", "paths.reports"),
    ),
    "infer": Stage(
        "weakcell.infer:run",
        "TTA x folds on the test split -> submissions/<name>/cell_level.csv, image_level.csv",
        (
            *_WHERE,
            *_RUN,
            *_CACHE,
            *_NETWORK,
            "image_model.",
            "paths.submissions",
            "infer.",
            "checks.lock_wait_s",
            "force",
        ),
    ),
    "download": Stage(
        "weakcell.kagglekit.api:download",
        "kaggle competitions download into data/<dataset>/, unzipped, resumable",
        (
            *_WHERE,
            "paths.data",
            "kaggle.download",
            "kaggle.competitions",
            "kaggle.keep_zip",
            "kaggle.dry_run",
        ),
    ),
    "wheels": Stage(
        "weakcell.kagglekit.datasets:wheels",
        "Kaggle dataset folder: weakcell wheel + wheels the Kaggle image lacks",
        ("paths.root", "kaggle."),
    ),
    "weights-dataset": Stage(
        "weakcell.kagglekit.datasets:weights_dataset",
        "Kaggle dataset folder of a run: weights only (+ the whole-image model when used), thresholds, config.yaml",
        _KAGGLE,
    ),
    "backbone-dataset": Stage(
        "weakcell.kagglekit.datasets:backbone_dataset",
        "Kaggle dataset folder of model.pretrained_file, the train kernel's initial backbone weights",
        ("name", "paths.root", "model.backbone", "model.pretrained_file", "kaggle."),
    ),
    "weights": Stage(
        "weakcell.pretrained:run",
        "fetch pretrained weights (backbone via timm, Cellpose-SAM, SAM) -> weights/ + MANIFEST.json",
        ("paths.root", "model.backbone", "weights."),
    ),
    "pretrained-datasets": Stage(
        "weakcell.kagglekit.datasets:pretrained_datasets",
        "Kaggle dataset folders of what `weights` fetched (backbone, cellpose-sam, segment-anything)",
        ("name", "paths.root", "model.backbone", "weights.", "kaggle."),
    ),
    "kernels": Stage(
        "weakcell.kagglekit.kernels:run",
        "generate offline Kaggle kernels -> kernels/<variant>/ (metadata + script)",
        (*_KAGGLE, "paths.kernels", *_CACHE, "model.", "segment."),
    ),
    "submit": Stage(
        "weakcell.kagglekit.api:submit",
        "2018: kaggle competitions submit; 2021: push the kernel, print the next steps",
        (*_KAGGLE, "paths.kernels", "paths.submissions", "infer.output"),
    ),
    "submit-kernel": Stage(
        "weakcell.kagglekit.api:submit_kernel_output",
        "2021: submit submission.csv of version kaggle.kernel_version of the pushed kernel",
        ("name", "paths.root", "paths.kernels", "kaggle."),
    ),
    "validate": Stage(
        "weakcell.submission:validate_main",
        "check a submission CSV (cell or image level); exit 0/2",
    ),
    "score": Stage(
        "weakcell.score:score_main",
        "the organisers' 2021 metric of any cell-level CSV against a truth folder; --json OUT",
    ),
    "thresholds": Stage(
        "weakcell.thresholds:run",
        "per-class thresholds tuned on OOF image predictions -> thresholds.json",
        (*_WHERE, *_RUN, "thresholds.", "infer.image_level", "checks.lock_wait_s"),
    ),
    "evaluate": Stage(
        "weakcell.evaluate:run",
        "image and cell scores, per-class plots, best/worst attention maps -> evaluation.json, reports/<name>/",
        (*_WHERE, *_RUN, *_CACHE, "paths.reports", "paths.submissions", "evaluate.", "infer.", "thresholds."),
    ),
    "external": Stage(
        "weakcell.external.stage:run",
        "public HPA images of a list -> data/<dataset>-external/ (train/, train.csv, sources.csv); --dry-run",
        ("paths.root", "paths.data", "data.dataset", "external.", "checks.lock_wait_s"),
    ),
    "duplicates": Stage(
        "weakcell.duplicates.stage:main",
        "DIR [DIR ...] --json OUT: near-duplicate pairs and clusters by perceptual hashes",
    ),
}


# Stages that take arguments of their own rather than a config (a file and flags, a folder; each parses
# them and returns an exit code).
OWN_ARGUMENTS = ("validate", "score", "init", "duplicates")

# Stages run one after the other in one process (``make demo``): each would otherwise start an interpreter
# and import torch, timm and pandas again, seconds of work that teach nothing on a slow laptop.
CHAINS: dict[str, tuple[str, ...]] = {
    "demo": ("data", "preview", "folds", "cache", "train", "refine", "thresholds", "infer", "evaluate"),
}


def run_chain(stages: Sequence[str]) -> Callable[[Config], None]:
    """One function running ``stages`` in order on the same config (each as its own stage would)."""

    def run(cfg: Config) -> None:
        for name in stages:
            print(f"== weakcell {name}", flush=True)
            _resolve(STAGES[name].target)(cfg)

    return run


def _resolve(target: str) -> Callable[[Config], object]:
    module, _, function = target.partition(":")
    return getattr(importlib.import_module(module), function)


# Flags that schedulers (SLURM arrays, several Kaggle kernels) conventionally pass, as config keys.
FLAG_KEYS: dict[str, str] = {"--shard-index": "cache.shard_index", "--num-shards": "cache.num_shards"}
# Flags without a value, as config keys set to true.
SWITCH_KEYS: dict[str, str] = {"--dry-run": "external.dry_run"}


def split_args(argv: list[str]) -> tuple[str | None, list[str]]:
    """First argument that is not ``key=value`` is the config file; the rest are overrides.
    ``--shard-index 3`` / ``--num-shards=8`` become ``cache.shard_index=3`` / ``cache.num_shards=8``;
    ``--dry-run`` becomes ``external.dry_run=true``."""
    config_path = None
    overrides = []
    args = iter(argv)
    for arg in args:
        flag, eq, value = arg.partition("=")
        if arg in SWITCH_KEYS:
            overrides.append(f"{SWITCH_KEYS[arg]}=true")
        elif flag in FLAG_KEYS:
            if not eq:
                value = next(args, "")
            if not value:
                raise ConfigError(f"{flag} needs a value, e.g. {flag} 0")
            overrides.append(f"{FLAG_KEYS[flag]}={value}")
        elif "=" in arg:
            overrides.append(arg)
        elif config_path is None:
            config_path = arg
        else:
            raise ConfigError(f"unexpected argument {arg!r}: give one config file, then key=value overrides")
    return config_path, overrides


# What a user can cause and fix: the kit's own errors (ConfigError among them) and files (OSError). A
# plain ValueError or KeyError may be a bug in the kit or a library: its traceback says where.
EXPECTED_ERRORS = (WeakcellError, OSError)


def stage_main(
    run: Callable[[Config], object], argv: list[str] | None = None, reads: Sequence[str] = ()
) -> int:
    """Entry point shared by every stage: parse args, load config, check the names it builds (a stage that
    reads ``model.`` needs a backbone timm knows), run. Expected errors (``EXPECTED_ERRORS``) become one
    ``error:`` line and exit status 2; anything else is a bug and propagates with its traceback."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        config_path, overrides = split_args(list(sys.argv[1:] if argv is None else argv))
        cfg = load_config(config_path, overrides)
        backbones = [cfg.model.backbone] if any(key.startswith("model.") for key in reads) else []
        if cfg.image_model.enabled and any(key.startswith("image_model.") for key in reads):
            backbones.append(cfg.image_model.backbone)
        if backbones:  # before any folder is created
            from weakcell.models.backbone import check_backbone

            for backbone in backbones:
                check_backbone(backbone)
        run(cfg)
    except EXPECTED_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def _usage() -> str:
    width = max(map(len, STAGES))
    lines = [f"  {name:<{width}}  {stage.help}" for name, stage in STAGES.items()]
    lines.append(
        f"  {'keys':<{width}}  every config key (or those starting with PREFIX), its default and what it does"
    )
    lines += [f"  {name:<{width}}  {' -> '.join(stages)}, in one process" for name, stages in CHAINS.items()]
    return (
        "usage: weakcell <stage> [config.yaml] [key=value ...]   (weakcell <stage> --help: the keys it reads)\n\n"
        "stages:\n" + "\n".join(lines)
    )


def key_lines(rows: list[tuple[str, str, str]]) -> list[str]:
    """``key  value  description`` lines, columns aligned (a long value gets its own line)."""
    width = max((len(key) for key, _, _ in rows), default=0)
    value_width = 16
    lines = []
    for key, value, description in rows:
        if len(value) > value_width:
            lines += [f"  {key:<{width}}  {value}", f"  {'':<{width}}  {'':<{value_width}}  {description}"]
        else:
            lines.append(f"  {key:<{width}}  {value:<{value_width}}  {description}")
    return lines


def stage_help(name: str, args: list[str]) -> str:
    """``weakcell STAGE [config] --help``: what the stage does and every key it reads, with its value in
    the config given (the defaults without one) and its description."""
    stage = STAGES[name]
    config_path, overrides = split_args([a for a in args if a not in ("-h", "--help")])
    cfg = load_config(config_path, overrides) if config_path or overrides else None
    source = f"in {config_path}" if config_path else "defaults"
    head = [f"usage: weakcell {name} [config.yaml] [key=value ...]", f"{stage.help}", ""]
    if not stage.reads:
        return "\n".join(head)
    rows = describe_keys(cfg, tuple(stage.reads))
    head.append(f"keys it reads ({source}; set them in the config or as key=value):")
    return "\n".join(head + key_lines(rows))


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    stage, rest = args[0], args[1:]
    if stage == "keys":
        prefixes = tuple(rest) or ("",)
        rows = describe_keys(None, prefixes)
        if not rows:
            print(
                f"error: no config key starts with {' or '.join(prefixes)} (weakcell keys lists them all)",
                file=sys.stderr,
            )
            return 2
        print("\n".join(key_lines(rows)))
        return 0
    if stage in CHAINS:
        reads = tuple(key for name in CHAINS[stage] for key in STAGES[name].reads)
        return stage_main(run_chain(CHAINS[stage]), rest, reads)
    if stage in OWN_ARGUMENTS:  # take their own arguments, not a config
        own_main: Callable[[list[str]], int] = _resolve(STAGES[stage].target)  # type: ignore[assignment]
        return own_main(rest)
    if stage not in STAGES:
        import difflib

        close = difflib.get_close_matches(stage, STAGES, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        print(f"error: unknown stage {stage!r}{hint}\n\n{_usage()}", file=sys.stderr)
        return 2
    if "-h" in rest or "--help" in rest:
        try:
            print(stage_help(stage, rest))
        except EXPECTED_ERRORS as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        return 0
    return stage_main(_resolve(STAGES[stage].target), rest, STAGES[stage].reads)
