"""Which settings invalidate which finished output: ``OUTPUT_INPUTS``, the one table of them, and
``changed_settings``, which compares a folder's saved ``config.yaml`` with the current config."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from weakcell.config.loading import deep_merge
from weakcell.config.schema import Config


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


@dataclass(frozen=True)
class Inputs:
    """The settings a finished output is computed from: dotted keys starting with one of ``include`` and
    none of ``exclude`` (settings that change where or how fast it is made, not what it holds)."""

    include: tuple[str, ...] = ("",)
    exclude: tuple[str, ...] = ()

    def changed(self, saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
        """``key: old -> new`` for each of these settings whose value differs between two nested config
        dicts (``Config.model_dump(mode="json")`` shape), sorted by key."""
        old, new = _flatten(saved), _flatten(current)
        keys = sorted(
            key
            for key in set(old) | set(new)
            if key.startswith(self.include)
            and not key.startswith(self.exclude)
            and old.get(key) != new.get(key)
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
    "train.device",
    "train.workers",
    "train.prefetch",
    "train.validate_every",  # what the epoch log shows, never what is trained
    "train.compile",
)
# What a run's folds are computed from; later stages' sections (thresholds, infer, ...) are not, and
# ``train.folds`` only says which folds this call trains.
_ROUND_ZERO = (
    "seed",
    "data.",
    "synthetic.",
    "folds.",
    "segment.",
    "cache.crop_size",
    "model.",
    "mil.",
    "train.",
)

# The one table of which settings invalidate which finished output. A stage reuses an output only while
# none of its inputs changed (``changed_settings``), else it refuses and names FORCE=1 or another name.
Output = Literal["synthetic", "cache", "checkpoint", "run", "refine", "model"]
OUTPUT_INPUTS: dict[Output, Inputs] = {
    # data/<set>/ of ``make data`` (weakcell.synthetic.writer): what the generator draws
    "synthetic": Inputs(("synthetic.",), _RUNTIME),
    # the cell-crop cache (weakcell.cache.build): which images, their masks and the crop size
    "cache": Inputs(("data.", "segment.", "cache.crop_size"), _RUNTIME),
    # a resumable ``last.pt`` of the engine (weakcell.engine): the run that wrote it, on any machine
    "checkpoint": Inputs(("train.",), _RUNTIME),
    # round 0 of a run, ``runs/<name>/`` (weakcell.train)
    "run": Inputs(_ROUND_ZERO, (*_RUNTIME, "train.folds")),
    # a refinement round (weakcell.refine): round 0's inputs plus the rule and the thresholds it reads;
    # ``refine.rounds`` only says how many rounds there are (``refine.epochs`` reaches them as train.epochs)
    "refine": Inputs((*_ROUND_ZERO, "refine.", "thresholds."), (*_RUNTIME, "train.folds", "refine.rounds")),
    # the networks inference builds to load a run's weights into (weakcell.infer); model.pretrained_file is
    # only where training started (the trained weights replace it), so it never makes a run unusable
    "model": Inputs(
        ("model.", "mil.mode", "mil.hidden", "mil.gated", "mil.dropout", "cache.crop_size"),
        ("model.pretrained_file",),
    ),
}


def changed_settings(folder: str | os.PathLike[str], cfg: Config, inputs: Inputs = Inputs()) -> list[str]:
    """The ``inputs`` (default: every setting) whose value in the config saved in ``folder/config.yaml``
    differs from ``cfg``, as ``key: old -> new``; empty when nothing was saved.

    A key the saved config lacks was added to the schema later: the run had its default (a new setting's
    default keeps the old behaviour), so finished runs stay reusable when the code grows a setting."""
    saved_path = Path(folder) / "config.yaml"
    if not saved_path.is_file():
        return []
    saved = deep_merge(Config().model_dump(mode="json"), yaml.safe_load(saved_path.read_text()) or {})
    return inputs.changed(saved, cfg.model_dump(mode="json"))
