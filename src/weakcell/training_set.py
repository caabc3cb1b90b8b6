"""What training reads: the training split of the cell-crop cache joined with the label file and the folds
file (``TrainingSet``, with the fingerprints of what it was read from: ``training_inputs``), the targets
each cell learns from (inherited image labels, or the synthetic set's true cell labels for the oracle),
and which labelled images give training no cells (``MissingImages``).

Training (``weakcell.train``), refinement, evaluation and the ablation all start from ``load_training_set``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from weakcell.cache.store import SKIPPED_FILE, CellCache, cache_fingerprint
from weakcell.cell_truth import cell_truth_table
from weakcell.config import Config
from weakcell.constants import NEGATIVE
from weakcell.data.datasets import DatasetSpec, get_dataset
from weakcell.data.labels import read_label_file, to_multi_hot
from weakcell.data.manifest import folder_hash, table_hash
from weakcell.errors import StageError
from weakcell.folds_record import load_folds


@dataclass
class TrainingSet:
    """The training split of a cache joined with image labels and folds.

    cells: the cache's cell rows of the training split (index = row in ``cache.cells``), plus ``fold``.
    images: one row per training image (with or without cells): ``image_id, fold, labels``.
    cell_targets: (len(cache.cells), C) float32 targets of every cache row (0 for other splits).
    """

    spec: DatasetSpec
    cache: CellCache
    cells: pd.DataFrame
    images: pd.DataFrame
    cell_targets: np.ndarray
    truth: pd.DataFrame | None  # synthetic only: true cells (image_id, cell_id, labels)
    matches: pd.DataFrame | None  # synthetic only: segmented cell -> true cell
    trainable: np.ndarray | None = None  # (len(cache.cells),) bool: cells stage 1 may learn from; None = all
    missing: MissingImages | None = None  # labelled images that give training no cells, by reason
    inputs: dict[str, str | None] | None = None  # fingerprints of what it was read from (training_inputs)

    @property
    def n_classes(self) -> int:
        return self.spec.n_classes

    @property
    def image_targets(self) -> np.ndarray:
        return to_multi_hot(self.images["labels"].tolist(), self.n_classes).astype(np.float32)

    def true_targets(self) -> np.ndarray | None:
        """(len(cells), C) labels of the true cell each training cell matches (``true_cell_targets``);
        None for a set without per-cell truth."""
        if self.truth is None or self.matches is None:
            return None
        return true_cell_targets(self.cells, self.truth, self.matches, self.n_classes, self.spec.negative)

    def bags(self, image_ids: list[str]) -> list[np.ndarray]:
        """Cache rows of each image's cells (empty for an image without cells)."""
        by_image = self.cells.groupby("image_id", sort=False).indices
        positions = self.cells.index.to_numpy()
        return [positions[by_image[i]] if i in by_image else np.zeros(0, np.int64) for i in image_ids]


@dataclass(frozen=True)
class MissingImages:
    """Labelled training images (label file IDs) that give training no cell, by reason."""

    labelled: int  # images in the label file
    without_cells: list[str]  # cached, but segmentation found no cell
    failed: list[str]  # cached as skipped: unreadable or failed to segment (skipped.csv says why)
    not_cached: list[str]  # absent from the cache (not cached yet, or a cache built without them)

    @property
    def count(self) -> int:
        return len(self.without_cells) + len(self.failed) + len(self.not_cached)

    @property
    def share(self) -> float:
        return self.count / max(self.labelled, 1)

    def describe(self) -> str:
        return (
            f"{self.count} of {self.labelled} labelled training images give no cells: "
            f"{len(self.without_cells)} without cells, {len(self.failed)} failed to read or segment, "
            f"{len(self.not_cached)} not cached"
        )

    def record(self) -> dict[str, object]:
        """What ``run.json`` keeps: counts, the share and up to 5 IDs per reason."""
        reasons = {"without_cells": self.without_cells, "failed": self.failed, "not_cached": self.not_cached}
        return {
            "labelled": self.labelled,
            "missing": self.count,
            "share": round(self.share, 6),
            **{name: len(ids) for name, ids in reasons.items()},
            "examples": {name: ids[:5] for name, ids in reasons.items() if ids},
        }


def missing_images(labelled: list[str], cache_images: pd.DataFrame) -> MissingImages:
    """Which of the ``labelled`` IDs the cache's training images (``images.parquet`` rows) lack, and why."""
    rows = cache_images[cache_images["split"] == "train"].set_index("image_id")
    cached = [i for i in labelled if i in rows.index]
    status, n_cells = rows["status"].to_dict(), rows["n_cells"].to_dict()
    return MissingImages(
        labelled=len(labelled),
        without_cells=[i for i in cached if status[i] == "ok" and n_cells[i] == 0],
        failed=[i for i in cached if status[i] != "ok"],
        not_cached=[i for i in labelled if i not in rows.index],
    )


def check_missing(cfg: Config, missing: MissingImages, stage: str) -> None:
    """Print what the cache lacks; refuse above ``checks.max_missing_share`` (a silent loss otherwise)."""
    limit = cfg.checks.max_missing_share
    if missing.share > limit:
        needed = math.ceil(missing.share * 100) / 100
        raise StageError(
            f"{stage}: the cache {cfg.cache_dir} lacks too much: {missing.describe()} ({missing.share:.1%} > "
            f"checks.max_missing_share={limit:g}); cache them (make cache; {cfg.cache_dir / SKIPPED_FILE} says "
            f"why images failed), or train without them with checks.max_missing_share={needed:g}"
        )
    if missing.count:
        print(
            f"{stage}: {missing.describe()} ({missing.share:.1%}, within checks.max_missing_share={limit:g})"
        )
    else:
        print(f"{stage}: every one of the {missing.labelled} labelled training images is cached with cells")


def open_training_set(cfg: Config, stage: str) -> TrainingSet:
    """``load_training_set``, then ``check_missing`` under ``stage``'s name: what a training stage starts with."""
    data = load_training_set(cfg)
    if data.missing is not None:
        check_missing(cfg, data.missing, stage)
    return data


def training_inputs(cfg: Config) -> dict[str, str | None]:
    """Fingerprints of what a run is trained from (the upstream of its ``weakcell.lineage`` record): the
    cache (its settings and every image's content), the folds file and the label file as they are now,
    and the synthetic truth (None for real data). Cheap: hashes of small files and the cache's record."""
    spec = get_dataset(cfg.data.dataset)
    truth = None
    if spec.has_truth:  # the synthetic package is imported for synthetic sets only
        from weakcell.synthetic.truth import TRUTH

        truth = folder_hash(cfg.data_dir / TRUTH)
    return {
        "cache": cache_fingerprint(cfg.cache_dir),
        "folds": load_folds(cfg)[1],
        "labels": table_hash(cfg.data_dir / spec.label_file),
        "truth": truth,
    }


def load_training_set(cfg: Config) -> TrainingSet:
    """Join the cache, the label file and the folds file; every cached training image must have both.
    ``missing`` says which labelled images the cache lacks (``check_missing`` decides whether to go on)."""
    spec = get_dataset(cfg.data.dataset)
    inputs = training_inputs(cfg)
    labels = read_label_file(cfg.data_dir / spec.label_file, spec)
    folds, _ = load_folds(cfg)
    cache = CellCache(cfg.cache_dir)
    images = cache.images[cache.images["split"] == "train"][["image_id"]]
    images = images.merge(labels.rename(columns={"ID": "image_id"})[["image_id", "labels"]], how="left")
    images = images.merge(folds.rename(columns={"ID": "image_id"}), how="left")
    missing = images[images["labels"].isna() | images["fold"].isna()]["image_id"].tolist()
    if missing:
        raise StageError(
            f"{len(missing)} cached training images lack labels or a fold (e.g. {missing[:3]}); "
            f"rebuild the folds (make folds FORCE=1) or the cache (make cache FORCE=1)"
        )
    images = images.astype({"fold": np.int64}).reset_index(drop=True)
    cells = cache.cells[cache.cells["split"] == "train"].copy()
    cells["fold"] = cells["image_id"].map(dict(zip(images["image_id"], images["fold"])))

    truth = matches = None
    if spec.has_truth:
        from weakcell.synthetic.truth import read_truth

        truth = read_truth(cfg.data_dir, spec)
        matches = cell_truth_table(cache.masks, cfg.data_dir, images["image_id"].tolist())

    targets = np.zeros((len(cache.cells), spec.n_classes), dtype=np.float32)
    if cfg.train.targets == "inherit":
        image_hot = dict(zip(images["image_id"], to_multi_hot(images["labels"].tolist(), spec.n_classes)))
        targets[cells.index] = np.stack([image_hot[i] for i in cells["image_id"]]) if len(cells) else 0
    else:  # the oracle: each segmented cell learns its matched true cell's labels
        if truth is None or matches is None:
            raise StageError(f"train.targets=truth needs per-cell truth, which {spec.name} does not have")
        targets[cells.index] = true_cell_targets(cells, truth, matches, spec.n_classes, spec.negative)
    missing = missing_images(labels["ID"].astype(str).tolist(), cache.images)
    return TrainingSet(spec, cache, cells, images, targets, truth, matches, missing=missing, inputs=inputs)


def true_cell_targets(
    cells: pd.DataFrame,
    truth: pd.DataFrame,
    matches: pd.DataFrame,
    n_classes: int,
    negative: int | None = NEGATIVE,
) -> np.ndarray:
    """(len(cells), C) labels of the true cell each segmented cell matches; unmatched cells are Negative
    (all zero when the set has no Negative class, ``negative=None``).

    cells: ``image_id, cell_id`` rows; truth / matches: as in ``TrainingSet``."""
    own = truth.merge(matches, left_on=["image_id", "cell_id"], right_on=["image_id", "true_cell_id"])
    own = own.rename(columns={"cell_id_y": "cell_id"})[["image_id", "cell_id", "labels"]]
    position = pd.Series(
        np.arange(len(cells)), index=pd.MultiIndex.from_arrays([cells["image_id"], cells["cell_id"]])
    )
    found = position.reindex(pd.MultiIndex.from_arrays([own["image_id"], own["cell_id"]]))
    targets = np.zeros((len(cells), n_classes), dtype=np.float32)
    if negative is not None:
        targets[:, negative] = 1.0
    known = found.notna().to_numpy()
    targets[found[known].to_numpy(np.int64)] = to_multi_hot(
        [labels for labels, k in zip(own["labels"], known) if k], n_classes
    )
    return targets
