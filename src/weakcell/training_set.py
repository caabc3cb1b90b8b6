"""What training reads: the training split of the cell-crop cache joined with the label file and the folds
file (``TrainingSet``, with the fingerprints of what it was read from: ``training_inputs``), the targets
each cell learns from (inherited image labels, or the synthetic set's true cell labels for the oracle),
and which labelled images give training no cells (``weakcell.cache.coverage.MissingImages``, refused
above ``checks.max_missing_share`` before any per-cell table is built). With ``data.sources`` the caches
and label files of every source are read as one (``weakcell.sources``): ``images`` and ``cells`` say each
row's ``source``, and only the competition's images have truth and are scored.

Training (``weakcell.train``), refinement, evaluation and the ablation all start from ``load_training_set``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from weakcell.cache.coverage import MissingImages, missing_images
from weakcell.cache.store import SKIPPED_FILE, CellCache, cache_fingerprint
from weakcell.cell_truth import CellTruth, build_cell_truth
from weakcell.config import Config
from weakcell.constants import NEGATIVE
from weakcell.data.datasets import DatasetSpec, get_dataset
from weakcell.data.labels import to_multi_hot
from weakcell.data.manifest import folder_hash, table_hash
from weakcell.errors import StageError
from weakcell.folds_record import load_folds
from weakcell.sources import (
    COMPETITION,
    SourceSummary,
    data_sources,
    open_caches,
    source_labels,
    sources_fingerprint,
)


@dataclass
class TrainingSet:
    """The training split of a cache joined with image labels and folds.

    cells: the cache's cell rows of the training split (index = row in ``cache.cells``), plus ``fold`` and
    ``source``.
    images: one row per training image (with or without cells): ``image_id, labels, source, fold``
    (fold -1: an external image trained on in every fold, never validated).
    cell_targets: (len(cache.cells), C) float32 targets of every cache row (0 for other splits).
    """

    spec: DatasetSpec
    cache: CellCache
    cells: pd.DataFrame
    images: pd.DataFrame
    cell_targets: np.ndarray
    cell_truth: CellTruth | None  # synthetic only: true cells and their IoU with the segmented ones
    trainable: np.ndarray | None = None  # (len(cache.cells),) bool: cells stage 1 may learn from; None = all
    missing: MissingImages | None = None  # labelled images that give training no cells, by reason
    inputs: dict[str, str | None] | None = None  # fingerprints of what it was read from (training_inputs)
    sources: list[SourceSummary] | None = None  # what each source gave (one entry without data.sources)

    @property
    def n_classes(self) -> int:
        return self.spec.n_classes

    @property
    def validation_folds(self) -> list[int]:
        """The folds a round holds out, one model each (fold -1, train-only images, is never held out)."""
        return sorted(fold for fold in self.images["fold"].unique().tolist() if fold >= 0)

    @property
    def image_targets(self) -> np.ndarray:
        return to_multi_hot(self.images["labels"].tolist(), self.n_classes).astype(np.float32)

    def true_targets(self) -> np.ndarray | None:
        """(len(cells), C) labels of the true cell each training cell matches (``true_cell_targets``);
        None for a set without per-cell truth. Only the competition's cells have truth: see ``has_truth``."""
        if self.cell_truth is None:
            return None
        return true_cell_targets(self.cells, self.cell_truth, self.spec.negative)

    @property
    def has_truth(self) -> np.ndarray:
        """(len(cells),) bool: the cells whose image has per-cell truth (the competition's, synthetic)."""
        if self.cell_truth is None:
            return np.zeros(len(self.cells), dtype=bool)
        if "source" not in self.cells.columns:
            return np.ones(len(self.cells), dtype=bool)
        return self.cells["source"].eq(COMPETITION).to_numpy()

    def bags(self, image_ids: list[str]) -> list[np.ndarray]:
        """Cache rows of each image's cells (empty for an image without cells)."""
        by_image = self.cells.groupby("image_id", sort=False).indices
        positions = self.cells.index.to_numpy()
        return [positions[by_image[i]] if i in by_image else np.zeros(0, np.int64) for i in image_ids]


def check_missing(cfg: Config, missing: MissingImages, stage: str) -> None:
    """Print what the cache lacks; refuse above ``checks.max_missing_share`` (a silent loss otherwise)."""
    limit = cfg.checks.max_missing_share
    if missing.share > limit:
        needed = math.ceil(missing.share * 100) / 100
        caches = [source.cache_dir for source in data_sources(cfg)]
        where = f"the cache {caches[0]}" if len(caches) == 1 else f"the caches {', '.join(map(str, caches))}"
        skipped = " or ".join(str(folder / SKIPPED_FILE) for folder in caches)
        raise StageError(
            f"{stage}: {where} lack{'s' if len(caches) == 1 else ''} too much: {missing.describe()} "
            f"({missing.share:.1%} > checks.max_missing_share={limit:g}), e.g. {missing.example()}; fix or "
            f"cache them (make cache; {skipped} says why images failed), or train without them with "
            f"checks.max_missing_share={needed:g}"
        )
    if missing.count:
        print(
            f"{stage}: {missing.describe()} ({missing.share:.1%}, within checks.max_missing_share={limit:g})"
        )
    else:
        print(f"{stage}: every one of the {missing.labelled} labelled training images is cached with cells")


def open_training_set(cfg: Config, stage: str) -> TrainingSet:
    """``load_training_set`` with ``check_missing`` under ``stage``'s name, before any per-cell table is
    built: what a training stage starts with."""
    return load_training_set(cfg, check=stage)


def training_inputs(cfg: Config) -> dict[str, str | None]:
    """Fingerprints of what a run is trained from (the upstream of its ``weakcell.lineage`` record): the
    cache (its settings and every image's content), the folds file and the label file as they are now,
    the synthetic truth (None for real data) and the external sources (None without ``data.sources``).
    Cheap: hashes of small files and the caches' records."""
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
        "sources": sources_fingerprint(cfg, spec),
    }


def load_training_set(cfg: Config, check: str | None = None) -> TrainingSet:
    """Join the caches, label files and the folds file of every source; every cached training image must
    have a label and a fold. ``missing`` says which labelled images the caches lack; with ``check`` (the
    stage's name) they are counted and refused above ``checks.max_missing_share`` (``check_missing``)
    before any per-cell table is built, so the count and its advice come first."""
    spec = get_dataset(cfg.data.dataset)
    inputs = training_inputs(cfg)
    sources = data_sources(cfg)
    labels = source_labels(cfg, spec)
    folds, _ = load_folds(cfg)
    cache, summaries = open_caches(cfg, sources)
    missing = missing_images(labels["ID"].astype(str).tolist(), cache.images)
    if check is not None:
        check_missing(cfg, missing, check)
        if len(summaries) > 1:
            print(f"{check}: sources: " + "; ".join(summary.line() for summary in summaries))
    images = cache.images[cache.images["split"] == "train"][["image_id"]]
    images = images.merge(labels.rename(columns={"ID": "image_id"}), how="left")
    images = images.merge(folds.rename(columns={"ID": "image_id"}), how="left")
    unlabelled = images.loc[images["labels"].isna(), "image_id"].tolist()
    if unlabelled:  # the cache was built from another label file
        raise StageError(
            f"{len(unlabelled)} cached training images are not in {spec.label_file} (e.g. {unlabelled[:3]}): "
            f"the cache {cfg.cache_dir} was built from another label file; rebuild it (make cache FORCE=1)"
        )
    without_fold = images.loc[images["fold"].isna(), "image_id"].tolist()
    if without_fold:  # the folds were made from another label file, or without a source
        raise StageError(
            f"{len(without_fold)} labelled training images have no fold in {cfg.folds_file} (e.g. "
            f"{without_fold[:3]}): it was made from another label file or other sources; rebuild it "
            "(make folds FORCE=1)"
        )
    images = images.astype({"fold": np.int64}).reset_index(drop=True)
    cells = cache.cells[cache.cells["split"] == "train"].copy()
    cells["fold"] = cells["image_id"].map(dict(zip(images["image_id"], images["fold"])))
    cells["source"] = cells["image_id"].map(dict(zip(images["image_id"], images["source"])))

    cell_truth = None
    if spec.has_truth:  # each image's IoU table, once: every epoch's and round's OOF score reads it
        from weakcell.synthetic.truth import TRUTH

        # a skipped image has no masks: its true cells are there, found by no cell (``missing`` counts it);
        # external sources have no truth (truth/ holds the competition's images alone)
        segmented = set(cache.images.loc[cache.images["status"] == "ok", "image_id"])
        cell_truth = build_cell_truth(
            cfg.data_dir / TRUTH,
            spec.n_classes,
            lambda image_id: cache.masks(image_id).cells if image_id in segmented else None,
            dict(zip(folds["ID"].astype(str), folds["fold"].astype(int))),
        )

    targets = np.zeros((len(cache.cells), spec.n_classes), dtype=np.float32)
    if cfg.train.targets == "inherit":
        image_hot = dict(zip(images["image_id"], to_multi_hot(images["labels"].tolist(), spec.n_classes)))
        targets[cells.index] = np.stack([image_hot[i] for i in cells["image_id"]]) if len(cells) else 0
    else:  # the oracle: each segmented cell learns its matched true cell's labels
        if cell_truth is None:
            raise StageError(f"train.targets=truth needs per-cell truth, which {spec.name} does not have")
        if len(sources) > 1:
            raise StageError(
                "train.targets=truth needs per-cell truth, which the external sources do not have; train "
                "the oracle on the competition's images alone (data.sources=[])"
            )
        targets[cells.index] = true_cell_targets(cells, cell_truth, spec.negative)
    return TrainingSet(
        spec, cache, cells, images, targets, cell_truth, missing=missing, inputs=inputs, sources=summaries
    )


def true_cell_targets(cells: pd.DataFrame, truth: CellTruth, negative: int | None = NEGATIVE) -> np.ndarray:
    """(len(cells), C) labels of the true cell each segmented cell overlaps at IoU > 0.5
    (``CellTruth.assigned``); cells without one are Negative (all zero when the set has no Negative
    class, ``negative=None``). cells: ``image_id, cell_id`` rows."""
    classes, found = truth.assigned(cells)
    targets = classes.astype(np.float32)
    if negative is not None:
        targets[~found, negative] = 1.0
    return targets
