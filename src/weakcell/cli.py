"""``weakcell <stage> [config.yaml] [key=value ...]``: one entry point for every stage.

Stages are looked up in ``STAGES`` (name -> ``module:function``), imported only when run, so a stage's
heavy dependencies (torch, cellpose, kaggle) never load for another. Each stage function takes the
resolved ``Config`` and does its work; ``python -m weakcell.<module>`` works the same way through
``stage_main``.
"""

from __future__ import annotations

import importlib
import logging
import sys
from collections.abc import Callable

from weakcell.config import Config, ConfigError, all_keys, load_config
from weakcell.errors import WeakcellError

# name -> (module:function, one-line help). Later stages register here.
STAGES: dict[str, tuple[str, str]] = {
    "data": (
        "weakcell.synthetic.writer:run",
        "generate the synthetic HPA benchmark (hpa2021 layout + truth/)",
    ),
    "preview": (
        "weakcell.synthetic.preview:run",
        "montage of composites, outlines, labels, a cell per class",
    ),
    "folds": ("weakcell.folds:run", "multilabel-stratified K-fold at image level -> folds/<dataset>.csv"),
    "cache": (
        "weakcell.cache.build:run",
        "segment every image, cache cell crops -> cache/<dataset>/<backend>/",
    ),
    "cache-merge": ("weakcell.cache.build:merge", "join the indexes written by --num-shards parts"),
    "preview-cells": ("weakcell.cache.preview:run", "outlines on real and synthetic images, a grid of crops"),
    "train": ("weakcell.train:run", "K folds: cell model (weak labels) -> attention MIL -> OOF predictions"),
    "refine": (
        "weakcell.refine:run",
        "pseudo-label rounds: relabel cells from OOF outputs, retrain -> runs/<name>/round<r>/",
    ),
    "ablate": (
        "weakcell.ablate:run",
        "every variant on the same folds -> reports/leaderboard.md (+ .json, .png)",
    ),
    "infer": (
        "weakcell.infer:run",
        "TTA x folds on the test split -> submissions/<name>/cell_level.csv, image_level.csv",
    ),
    "download": (
        "weakcell.kagglekit.api:download",
        "kaggle competitions download into data/<dataset>/, unzipped, resumable",
    ),
    "wheels": (
        "weakcell.kagglekit.datasets:wheels",
        "Kaggle dataset folder: weakcell wheel + wheels the Kaggle image lacks",
    ),
    "weights-dataset": (
        "weakcell.kagglekit.datasets:weights_dataset",
        "Kaggle dataset folder of a run: weights only, thresholds.json, config.yaml",
    ),
    "backbone-dataset": (
        "weakcell.kagglekit.datasets:backbone_dataset",
        "Kaggle dataset folder of model.pretrained_file, the train kernel's initial backbone weights",
    ),
    "weights": (
        "weakcell.pretrained:run",
        "fetch pretrained weights (backbone via timm, Cellpose-SAM, SAM) -> weights/ + MANIFEST.json",
    ),
    "pretrained-datasets": (
        "weakcell.kagglekit.datasets:pretrained_datasets",
        "Kaggle dataset folders of what `weights` fetched (backbone, cellpose-sam, segment-anything)",
    ),
    "kernels": (
        "weakcell.kagglekit.kernels:run",
        "generate offline Kaggle kernels -> kernels/<variant>/ (metadata + script)",
    ),
    "submit": (
        "weakcell.kagglekit.api:submit",
        "2018: kaggle competitions submit; 2021: push the kernel, print the next steps",
    ),
    "submit-kernel": (
        "weakcell.kagglekit.api:submit_kernel_output",
        "2021: submit submission.csv of version kaggle.kernel_version of the pushed kernel",
    ),
    "validate": (
        "weakcell.submission:validate_main",
        "check a submission CSV (cell or image level); exit 0/2",
    ),
    "score": (
        "weakcell.score:score_main",
        "the organisers' 2021 metric of any cell-level CSV against a truth folder; --json OUT",
    ),
    "thresholds": (
        "weakcell.thresholds:run",
        "per-class thresholds tuned on OOF image predictions -> thresholds.json",
    ),
    "evaluate": (
        "weakcell.evaluate:run",
        "image and cell scores, per-class plots, best/worst attention maps -> evaluation.json, reports/<name>/",
    ),
    "external": (
        "weakcell.external.stage:run",
        "public HPA images of a list -> data/<dataset>-external/ (train/, train.csv, sources.csv); --dry-run",
    ),
    "duplicates": (
        "weakcell.duplicates.stage:main",
        "DIR [DIR ...] --json OUT: near-duplicate pairs and clusters by perceptual hashes",
    ),
}


# Stages that take a file and flags of their own rather than a config.
FILE_STAGES = ("validate", "score", "duplicates")


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


def stage_main(run: Callable[[Config], object], argv: list[str] | None = None) -> int:
    """Entry point shared by every stage: parse args, load config, run. Expected errors (``EXPECTED_ERRORS``)
    become one ``error:`` line and exit status 2; anything else is a bug and propagates with its traceback."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        config_path, overrides = split_args(list(sys.argv[1:] if argv is None else argv))
        cfg = load_config(config_path, overrides)
        run(cfg)
    except EXPECTED_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def _usage() -> str:
    width = max(map(len, STAGES))
    lines = [f"  {name:<{width}}  {text}" for name, (_, text) in STAGES.items()]
    lines.append(f"  {'keys':<{width}}  list every config key")
    return "usage: weakcell <stage> [config.yaml] [key=value ...]\n\nstages:\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    stage, rest = args[0], args[1:]
    if stage == "keys":
        print("\n".join(all_keys()))
        return 0
    if stage in FILE_STAGES:  # take a file and flags, not a config
        module, _, function = STAGES[stage][0].partition(":")
        file_main: Callable[[list[str]], int] = getattr(importlib.import_module(module), function)
        return file_main(rest)
    if stage not in STAGES:
        import difflib

        close = difflib.get_close_matches(stage, STAGES, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        print(f"error: unknown stage {stage!r}{hint}\n\n{_usage()}", file=sys.stderr)
        return 2
    return stage_main(_resolve(STAGES[stage][0]), rest)
