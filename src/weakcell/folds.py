"""Multilabel-stratified K-fold at image level (``make folds``) -> ``folds/<dataset>.csv`` (``ID,fold``).

Folds are computed once and committed for real data sets, so every run, ablation and blend sees the
same split. Cells inherit their image's fold, so cells of one image never straddle folds.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd
from iterstrat.ml_stratifiers import MultilabelStratifiedKFold

from weakcell.config import Config
from weakcell.data.datasets import get_dataset
from weakcell.data.labels import read_label_file, to_multi_hot
from weakcell.errors import StageError, UnknownName

log = logging.getLogger(__name__)


def make_folds(
    labels: pd.DataFrame, n_classes: int, n_splits: int, seed: int, group_column: str | None = None
) -> pd.DataFrame:
    """Assign each image a fold in ``0..n_splits-1``, stratified over the multi-label matrix.

    labels: ``ID`` and ``labels`` (list of class indices) per image, as ``read_label_file`` returns.
    group_column: images sharing a value there land in the same fold; the groups are stratified by the
    union of their images' labels.
    Returns ``ID, fold`` in the input order.
    """
    if len(labels) < n_splits:
        raise StageError(f"{len(labels)} images cannot make {n_splits} folds")
    if group_column is None:
        units = labels["ID"].to_numpy()
        unit_of_image = np.arange(len(labels))
        targets = to_multi_hot(labels["labels"].tolist(), n_classes)
    else:
        if group_column not in labels.columns:
            raise UnknownName(
                f"group column {group_column!r} is not in the label file ({list(labels.columns)})"
            )
        codes, units = pd.factorize(labels[group_column], sort=True)
        unit_of_image = codes
        image_targets = to_multi_hot(labels["labels"].tolist(), n_classes)
        targets = np.zeros((len(units), n_classes), dtype=np.uint8)
        np.maximum.at(targets, codes, image_targets)  # a group carries every class any of its images has
        if len(units) < n_splits:
            raise StageError(f"{len(units)} groups in {group_column!r} cannot make {n_splits} folds")
    fold_of_unit = np.full(len(units), -1, dtype=np.int64)
    splitter = MultilabelStratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    for fold, (_, held_out) in enumerate(splitter.split(np.zeros((len(units), 1)), targets)):
        fold_of_unit[held_out] = fold
    return pd.DataFrame({"ID": labels["ID"].to_numpy(), "fold": fold_of_unit[unit_of_image]})


def fold_class_counts(labels: pd.DataFrame, folds: pd.DataFrame, n_classes: int) -> pd.DataFrame:
    """Per-class positive counts per fold (rows = folds, columns = classes, plus ``images``)."""
    merged = labels[["ID", "labels"]].merge(folds, on="ID", validate="one_to_one")
    hot = to_multi_hot(merged["labels"].tolist(), n_classes).astype(np.int64)
    counts = pd.DataFrame(hot, columns=[str(c) for c in range(n_classes)]).groupby(merged["fold"]).sum()
    counts.insert(0, "images", merged.groupby("fold").size())
    return counts


def read_folds(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read ``ID,fold``, checking that every ID appears once."""
    folds = pd.read_csv(path, dtype={"ID": str, "fold": int})
    if list(folds.columns) != ["ID", "fold"]:
        raise StageError(f"{path}: expected columns ID,fold, found {list(folds.columns)}")
    duplicated = folds["ID"][folds["ID"].duplicated()].tolist()
    if duplicated:
        raise StageError(f"{path}: IDs in more than one row, e.g. {duplicated[:3]}; rebuild with FORCE=1")
    return folds


def run(cfg: Config) -> pd.DataFrame:
    """Entry point: read the dataset's label file, write the folds file (once), print per-fold counts."""
    spec = get_dataset(cfg.data.dataset)
    label_path = cfg.data_dir / spec.label_file
    if not label_path.is_file():  # the first stage of a project: say where the data should be, and how
        get = "make data" if spec.has_truth else "make download, or unzip Kaggle's archive there"
        raise StageError(
            f"no {label_path}: {get}; or point data.dir at the folder that holds {spec.label_file} (in your "
            "project's config, which `make init PROJECT=<dir> ARGS=data.dir=<folder>` writes)"
        )
    labels = read_label_file(label_path, spec)
    target = cfg.folds_file
    if target.is_file() and not cfg.force:
        folds = read_folds(target)
        if set(folds["ID"]) == set(labels["ID"]):
            print(
                f"folds: {target} already covers the {len(labels)} images of {spec.label_file}; FORCE=1 redoes it"
            )
            _print_counts(labels, folds, spec.n_classes)
            return folds
        raise StageError(
            f"{target} does not match {cfg.data_dir / spec.label_file} ({len(folds)} vs {len(labels)} IDs); "
            "rebuild it with FORCE=1 (make folds FORCE=1)"
        )
    folds = make_folds(labels, spec.n_classes, cfg.folds.n_splits, cfg.folds.seed, cfg.folds.group_column)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(f"{target}.tmp")
    folds.to_csv(tmp, index=False)
    tmp.replace(target)
    _print_counts(labels, folds, spec.n_classes)
    print(f"folds: {len(folds)} images in {cfg.folds.n_splits} folds (seed {cfg.folds.seed}) -> {target}")
    return folds


def _print_counts(labels: pd.DataFrame, folds: pd.DataFrame, n_classes: int) -> None:
    counts = fold_class_counts(labels, folds, n_classes)
    with pd.option_context("display.width", 200, "display.max_columns", 40):
        print("positives per class (columns) and fold (rows):")
        print(counts.to_string())


if __name__ == "__main__":
    from weakcell.cli import stage_main

    raise SystemExit(stage_main(run))
