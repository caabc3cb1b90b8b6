"""Which settings each finished output is made from: ``OUTPUT_INPUTS``, the one table of them, and
``reads(output, cfg)``, the settings an output actually reads under a given config (refinement under
``refine.score=confidence`` reads the submitted confidence's formula, under ``stage1`` it does not).

What an output is made from besides settings (the data's content, the cache, the folds file, the round
before) is named in ``Inputs.upstream`` and fingerprinted by ``weakcell.lineage``, which records both in
the output's ``lineage.json`` and decides whether it may be reused. ``changed_settings`` compares a
folder's saved ``config.yaml`` with the current config: what decides for outputs written before lineage
records existed, and for the networks inference builds from a run's config.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from weakcell.config.loading import deep_merge
from weakcell.config.schema import Config


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config dict as ``{"section.key": value}``."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def nested(flat: Mapping[str, Any]) -> dict[str, Any]:
    """``{"a.b": 1}`` -> ``{"a": {"b": 1}}`` (the inverse of ``flatten``)."""
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        *sections, name = key.split(".")
        branch = tree
        for section in sections:
            branch = branch.setdefault(section, {})
        branch[name] = value
    return tree


# The settings an output reads beyond its fixed ones, as a function of the config.
Conditional = Callable[[Config], tuple[str, ...]]


@dataclass(frozen=True)
class Inputs:
    """The settings a finished output is computed from: dotted keys starting with one of ``include`` (plus
    those ``conditional(cfg)`` adds under the config at hand) and none of ``exclude`` (settings that change
    where or how fast it is made, not what it holds). ``upstream`` names what else it is made from, each
    fingerprinted by ``weakcell.lineage`` (``images``: the data's per-image content hashes; ``labels``: the
    label file's content; ``truth``: the synthetic truth; ``duplicates``, ``external``: the near-duplicates
    file and the external sets' tables grouped folds read; ``cache``, ``folds``; ``sources``: the external
    sources a run trains on; ``previous``: the round it continues)."""

    include: tuple[str, ...] = ("",)
    exclude: tuple[str, ...] = ()
    conditional: Conditional | None = None
    upstream: tuple[str, ...] = ()

    def prefixes(self, cfg: Config | None = None) -> tuple[str, ...]:
        """``include`` plus what ``conditional`` adds under ``cfg`` (nothing without a config)."""
        extra = self.conditional(cfg) if self.conditional is not None and cfg is not None else ()
        return (*self.include, *extra)

    def selects(self, key: str, cfg: Config | None = None) -> bool:
        return key.startswith(self.prefixes(cfg)) and not key.startswith(self.exclude)

    def changed(
        self, saved: Mapping[str, Any], current: Mapping[str, Any], cfg: Config | None = None
    ) -> list[str]:
        """``key: old -> new`` for each of these settings whose value differs between two nested config
        dicts (``Config.model_dump(mode="json")`` shape), sorted by key; ``cfg`` resolves the conditional
        settings (the current config)."""
        old, new = flatten(saved), flatten(current)
        keys = sorted(
            key for key in set(old) | set(new) if self.selects(key, cfg) and old.get(key) != new.get(key)
        )
        return [f"{key}: {old.get(key)!r} -> {new.get(key)!r}" for key in keys]


# Settings that change where or how fast something is made, never what it holds: no output depends on them.
_RUNTIME = (
    "synthetic.workers",
    "cache.workers",
    "segment.cellpose.device",
    "segment.cellpose.batch_size",
    "segment.sam.device",
    "segment.sam.box_batch_size",
    "segment.hpacellseg.device",
    "segment.hpacellseg.batch_size",  # an image gets the same masks in any batch (weakcell.segment.batched)
    "cache.batched",
    "cache.queue_images",
    "train.device",
    "train.workers",
    "train.prefetch",
    "train.validate_every",  # what the epoch log shows, never what is trained
    "train.compile",
)
# What a run's fold models are trained from, besides the cache, the folds file and the labels (their
# content is upstream, so neither the data's nor the segmentation's settings are listed: a data set moved
# to another folder keeps its runs). ``train.folds`` only says which folds this call trains.
_ROUND_ZERO = ("seed", "data.dataset", "model.", "mil.", "train.")


def _segmenters(cfg: Config) -> tuple[str, ...]:
    """The cache reads the sections of its backend and refiners only (``segment.cellpose.*`` does not
    change a classical cache)."""
    return tuple(f"segment.{name.strip()}." for name in cfg.segment.backend.split("+"))


def _rule_reads(cfg: Config) -> tuple[str, ...]:
    """What refinement's rule reads beyond ``refine.*``: the submitted confidence's formula when it scores
    cells by it; the tuned image thresholds when a floor is drawn from them (at ``threshold_scale=0`` every
    score passes and the thresholds are never read)."""
    keys: tuple[str, ...] = ()
    if cfg.refine.score == "confidence":
        keys += ("infer.image_power", "infer.image_best_cell")
    if cfg.refine.threshold_scale > 0:
        keys += ("thresholds.",)
    return keys


def _image_model_reads(cfg: Config) -> tuple[str, ...]:
    """A submission reads the whole-image model's section only when it uses it (``image_model.enabled``)."""
    return ("image_model.",) if cfg.image_model.enabled else ()


# The train settings of the cell model alone: the whole-image model has its own epochs, batch, lr, augment.
_CELL_MODEL_ONLY = (
    "train.epochs",
    "train.batch_size",
    "train.lr",
    "train.augment",
    "train.folds",
    "train.loss",
    "train.focal_gamma",
    "train.class_weights",
    "train.sampler",
    "train.targets",
    "train.checkpoint_every",
)


# The one table of what each finished output is made from. A stage reuses an output only while its
# fingerprint (these settings and its upstream fingerprints, ``weakcell.lineage``) is the one recorded.
Output = Literal[
    "synthetic",
    "folds",
    "cache",
    "checkpoint",
    "run",
    "refine",
    "model",
    "submission",
    "image_cache",
    "image_model",
]
OUTPUT_INPUTS: dict[Output, Inputs] = {
    # data/<set>/ of ``make data`` (weakcell.synthetic.writer): what the generator draws
    "synthetic": Inputs(("synthetic.",), _RUNTIME),
    # a folds file (weakcell.folds): the split's settings, its groups (the near-duplicates file, the external
    # sets and how they are folded; ``folds.external`` covers ``folds.external_mode``), the label file (IDs,
    # labels, group column) and the grouped folds' inputs (the duplicates file's and external sets' content).
    # ``folds.file`` says where it is and ``folds.report`` where its report goes, not what it holds.
    "folds": Inputs(
        ("folds.n_splits", "folds.seed", "folds.group_column", "folds.duplicates", "folds.external"),
        upstream=("labels", "duplicates", "external"),
    ),
    # the cell-crop cache (weakcell.cache.build): each image's content, its backend's settings, the side
    # they hold at and the crop size; per image, the content hash decides whether it is cached again
    "cache": Inputs(
        (
            "data.dataset",
            "segment.backend",
            "segment.reference_size",
            "segment.postprocess.",
            "cache.crop_size",
        ),
        _RUNTIME,
        conditional=_segmenters,
        upstream=("images",),
    ),
    # a resumable ``last.pt`` of the engine (weakcell.engine): the run that wrote it, on any machine and
    # whichever folds the call that continues it trains
    "checkpoint": Inputs(("train.",), (*_RUNTIME, "train.folds")),
    # round 0 of a run, ``runs/<name>/``, and each inner model of refinement (weakcell.train); ``sources``:
    # the external sources' caches, label files and intensity settings (weakcell.sources; none without)
    "run": Inputs(
        _ROUND_ZERO,
        (*_RUNTIME, "train.folds"),
        upstream=("cache", "folds", "labels", "truth", "sources"),
    ),
    # a refinement round (weakcell.refine): the round before, the rule and what the rule reads;
    # ``refine.rounds`` only says how many rounds there are (``refine.epochs`` reaches them as train.epochs)
    "refine": Inputs(
        (*_ROUND_ZERO, "refine."),
        (*_RUNTIME, "train.folds", "refine.rounds"),
        conditional=_rule_reads,
        upstream=("previous",),
    ),
    # the networks inference builds to load a run's weights into (weakcell.infer); model.pretrained_file is
    # only where training started (the trained weights replace it), so it never makes a run unusable
    "model": Inputs(
        ("model.", "mil.mode", "mil.hidden", "mil.gated", "mil.dropout", "cache.crop_size"),
        ("model.pretrained_file",),
    ),
    # a published submission folder (weakcell.infer): the networks it loads and how it blends and scores
    # their predictions (the whole-image model's settings when it is used); upstream the cell cache, the
    # fold weights (the image model's among them), the thresholds and the sample submission.
    # ``infer.output`` only says where it goes.
    "submission": Inputs(
        ("data.dataset", "model.", "mil.", "cache.crop_size", "refine.rounds", "infer."),
        ("model.pretrained_file", "infer.output", "image_model.pretrained_file"),
        conditional=_image_model_reads,
        upstream=("cache", "models", "thresholds", "sample"),
    ),
    # one split of the downscaled whole images (weakcell.image_cache): each image's content, the side
    "image_cache": Inputs(("data.dataset", "image_model.size"), upstream=("images",)),
    # the whole-image model's folds (weakcell.image_model): its own section and the engine's optimiser and
    # precision settings (train.epochs, batch_size, lr and augment are the cell model's: it has its own),
    # and the TTA views its out-of-fold predictions average; upstream the downscaled training images, the folds file and the label file
    "image_model": Inputs(
        ("seed", "data.dataset", "image_model.", "train.", "infer.tta"),
        (*_RUNTIME, *_CELL_MODEL_ONLY, "image_model.enabled", "image_model.pretrained_file"),
        upstream=("image_cache", "folds", "labels"),
    ),
}


# Settings outputs read that were added after lineage records were first written, each with the value that
# reproduces what the outputs made before it hold. A record lacking one reads it as that value, and a lineage
# holding that value fingerprints as one without it, so those outputs stay valid, and so do the outputs made
# from them (which record their fingerprints); any other value is a change like any other. A setting added
# to an output's reads later belongs here (one only read under a new choice, e.g. a new backend's section,
# does not: no earlier output read it).
ADDED_SETTINGS: dict[str, Any] = {
    # absolute pixel sizes, as before sizes followed the image (weakcell.segment.for_image)
    "segment.reference_size": None,
    # no whole-image model (weakcell.image_model): the cell confidence and image_level.csv as before it
    "infer.image_model_rule": "none",
    "infer.image_model_power": 1.0,
    "infer.image_level": "mil",
}


def recorded_value(settings: Mapping[str, Any], key: str) -> Any:
    """``key``'s value in a record's ``settings``; an added setting the record lacks reads as the value
    that reproduces the record's output (``ADDED_SETTINGS``), any other missing key as None."""
    return settings[key] if key in settings else ADDED_SETTINGS.get(key)


def as_before(settings: Mapping[str, Any]) -> dict[str, Any]:
    """``settings`` without the added settings at their earlier value: what a record made before they
    existed holds, and what a fingerprint covers."""
    return {
        key: value
        for key, value in settings.items()
        if not (key in ADDED_SETTINGS and value == ADDED_SETTINGS[key])
    }


def reads(output: Output, cfg: Config, values: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The settings ``output`` reads under ``cfg``, flattened (``{"train.lr": 0.001, ...}``), sorted by key.
    values: a nested config dict to take them from instead (a folder's saved config, ``saved_config``)."""
    inputs = OUTPUT_INPUTS[output]
    flat = flatten(values if values is not None else cfg.model_dump(mode="json"))
    return {key: flat[key] for key in sorted(flat) if inputs.selects(key, cfg)}


# settings whose default changed after runs were saved without them: a saved config that lacks one was
# made under its first default, the behaviour before the setting existed
FIRST_DEFAULTS: dict[str, Any] = {
    # ignore since the bench's three seeds (benchmarks/leaderboard.md: +0.0016 [+0.0011, +0.0022])
    "refine.uncertain": "negative",
}


def saved_config(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The config saved in ``folder/config.yaml`` with the defaults of its time for keys it lacks, or None.

    A key the saved config lacks was added to the schema later: the run had that setting's first default
    (``FIRST_DEFAULTS`` where it has changed since, today's default otherwise: a new setting's default keeps
    the old behaviour), so finished runs stay reusable when the code grows a setting and are not mistaken
    for today's default when a default changes."""
    saved_path = Path(folder) / "config.yaml"
    if not saved_path.is_file():
        return None
    then = deep_merge(Config().model_dump(mode="json"), nested(FIRST_DEFAULTS))
    return deep_merge(then, yaml.safe_load(saved_path.read_text()) or {})


def changed_settings(folder: str | os.PathLike[str], cfg: Config, inputs: Inputs = Inputs()) -> list[str]:
    """The ``inputs`` (default: every setting) whose value in the config saved in ``folder/config.yaml``
    differs from ``cfg``, as ``key: old -> new``; empty when nothing was saved."""
    saved = saved_config(folder)
    if saved is None:
        return []
    return inputs.changed(saved, cfg.model_dump(mode="json"), cfg)
