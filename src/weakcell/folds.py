"""Multilabel-stratified K-fold at image level (``make folds``) -> ``folds/<dataset>.csv`` (``ID,fold``).

Folds are computed once and committed for real data sets, so every run, ablation and blend sees the
same split. Cells inherit their image's fold, so cells of one image never straddle folds. Each setting
has its own file with a record beside it (``weakcell.folds_record``: what the file was made from; a
committed file is never overwritten), which runs read through ``load_folds``.

Grouped folds (``folds.duplicates``, ``folds.external``): images of one near-duplicate cluster (the JSON of
``weakcell duplicates``) and external images of one antibody (``sources.csv`` of ``make external``) form one
group, and groups are stratified over the union of their labels, so no near-duplicate pair straddles
folds. External images join the folds file: fold -1 (trained on in every fold, never validated) when their
set's mode (``folds.external_mode``, or its own in ``folds.external_modes``: ``data.sources`` fill both) is
``train_only`` and nothing ties them to a competition image, else their group's fold.
The folds report (``folds.report``) counts the pairs that straddle folds beside plain multilabel
stratification of the same images, and lists test images that are near-duplicates of training images.
Without ``folds.duplicates`` and ``folds.external`` the folds are exactly those of plain stratification."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
from iterstrat.ml_stratifiers import MultilabelStratifiedKFold

from weakcell.config import Config
from weakcell.data.datasets import DatasetSpec, get_dataset
from weakcell.data.labels import read_label_file, to_multi_hot
from weakcell.data.manifest import file_hash
from weakcell.errors import StageError, UnknownName
from weakcell.fold_groups import (
    FoldInputs,
    FoldsReport,
    fold_inputs,
    group_codes,
    split_antibodies,
    straddling,
    twins_in_test,
)
from weakcell.folds_record import FoldsRecord, folds_upstream, judge_existing, read_folds, record_path
from weakcell.lineage import Lineage
from weakcell.outputs import atomic_csv, atomic_write_text, folder_lock, writing

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


def grouped_folds(inputs: FoldInputs, n_classes: int, n_splits: int, seed: int) -> pd.DataFrame:
    """The kit's folds: groups (near-duplicate clusters, external antibodies) stratified over the union of
    their labels; train-only external images whose group holds no competition image get fold -1.
    Returns ``ID, fold`` in ``inputs.images`` order."""
    images = inputs.images
    groups = group_codes(images["ID"], images["antibody"], inputs.pairs)
    tied = np.isin(groups, groups[~inputs.external])  # the group holds a competition image
    folded = ~inputs.train_only | tied
    # group codes grow with first appearance: singletons alone give plain stratification's order and folds
    table = images[folded].assign(group=groups[folded])
    fold = np.full(len(images), -1, dtype=np.int64)
    fold[folded] = make_folds(table, n_classes, n_splits, seed, group_column="group")["fold"].to_numpy()
    return pd.DataFrame({"ID": images["ID"].to_numpy(), "fold": fold})


def plain_folds(inputs: FoldInputs, n_classes: int, n_splits: int, seed: int) -> pd.DataFrame:
    """What the teams did, on the same images: plain multilabel stratification of the images that are
    folded, every train-only external image at fold -1."""
    images = inputs.images
    folded = ~inputs.train_only
    fold = np.full(len(images), -1, dtype=np.int64)
    fold[folded] = make_folds(images[folded], n_classes, n_splits, seed)["fold"].to_numpy()
    return pd.DataFrame({"ID": images["ID"].to_numpy(), "fold": fold})


def folds_report(
    inputs: FoldInputs, folds: pd.DataFrame, n_classes: int, n_splits: int, seed: int
) -> FoldsReport:
    """Pairs straddling ``folds`` beside plain stratification's, antibodies split, test-set twins."""
    images = inputs.images
    kit = folds.set_index("ID")["fold"].reindex(images["ID"])
    plain = plain_folds(inputs, n_classes, n_splits, seed).set_index("ID")["fold"]
    kit_split, in_folds = straddling(kit, inputs.pairs)
    plain_split, _ = straddling(plain, inputs.pairs)
    groups = pd.Series(group_codes(images["ID"], images["antibody"], inputs.pairs)).value_counts()
    return FoldsReport(
        n_splits=n_splits,
        seed=seed,
        duplicates_file=inputs.duplicates_file,
        pairs_in_folds=in_folds,
        pairs_elsewhere=len(inputs.pairs) - in_folds,
        plain_straddling=plain_split,
        kit_straddling=kit_split,
        plain_split_antibodies=split_antibodies(images, plain),
        kit_split_antibodies=split_antibodies(images, kit),
        images=len(images),
        groups=len(groups),
        largest_group=int(groups.max()) if len(groups) else 0,
        external=int(inputs.external.sum()),
        train_only=int((kit.to_numpy() == -1).sum()),
        test_twins=twins_in_test(inputs.pairs, set(images["ID"]), inputs.test_ids),
    )


def run(cfg: Config) -> pd.DataFrame:
    """Entry point: read the label files, write the folds file of these settings (once, with its record),
    print per-fold counts; with groups configured (``folds.duplicates``, ``folds.external``), print and
    write the folds report too. Holds the lock of the folds file's folder."""
    with folder_lock(cfg.folds_file.parent, "folds", cfg.checks.lock_wait_s):
        return _write_folds(cfg)


def _write_folds(cfg: Config) -> pd.DataFrame:
    spec = get_dataset(cfg.data.dataset)
    label_file = cfg.data_dir / spec.label_file
    if not label_file.is_file():  # the first stage of a project: say where the data should be, and how
        get = "make data" if spec.has_truth else "make download, or unzip Kaggle's archive there"
        raise StageError(
            f"no {label_file}: {get}; or point data.dir at the folder that holds {spec.label_file} (in your "
            "project's config, which `make init PROJECT=<dir> ARGS=data.dir=<folder>` writes)"
        )
    labels = read_label_file(label_file, spec)
    inputs = fold_inputs(cfg, spec, labels)
    images = labels if inputs is None else inputs.images
    target = cfg.folds_file
    wanted = Lineage.of("folds", cfg, **folds_upstream(cfg, label_file, spec.label_file))

    def made_by(folds: pd.DataFrame) -> bool:
        made = these_folds(cfg, spec, labels, inputs).set_index("ID")["fold"]
        return made.equals(folds.set_index("ID")["fold"].reindex(made.index))

    ids = set(images["ID"])
    record = judge_existing(cfg, target, wanted, ids, made_by) if target.is_file() else None
    if record is not None:
        if record.lineage.settings and FoldsRecord.read(target) != record:
            with writing(record_path(target)):
                record.write(target)  # adopted: written before records existed, by these settings
        folds = read_folds(target)
        print(f"folds: {target} ({record.describe()}) serves the {len(images)} images; reused")
        _print_counts(images, folds, spec.n_classes)
    else:
        folds = these_folds(cfg, spec, labels, inputs)
        with writing(target):
            target.parent.mkdir(parents=True, exist_ok=True)
        atomic_csv(target, folds)
        FoldsRecord(wanted, file_hash(target)).write(target)
        _print_counts(images, folds, spec.n_classes)
        print(f"folds: {len(folds)} images in {cfg.folds.n_splits} folds (seed {cfg.folds.seed}) -> {target}")
    if inputs is not None:
        _report(cfg, spec, inputs, folds, target)
    return folds


def these_folds(
    cfg: Config, spec: DatasetSpec, labels: pd.DataFrame, inputs: FoldInputs | None
) -> pd.DataFrame:
    """The folds ``cfg``'s settings make: plain stratification of ``labels`` (by ``folds.group_column``),
    or grouped folds of ``inputs``."""
    settings = cfg.folds
    if inputs is None:
        return make_folds(labels, spec.n_classes, settings.n_splits, settings.seed, settings.group_column)
    return grouped_folds(inputs, spec.n_classes, settings.n_splits, settings.seed)


def _report(cfg: Config, spec: DatasetSpec, inputs: FoldInputs, folds: pd.DataFrame, target: Path) -> None:
    """Print and write the folds report; refuse a folds file that splits a near-duplicate pair."""
    settings = cfg.folds
    report = folds_report(inputs, folds, spec.n_classes, settings.n_splits, settings.seed)
    report_path = cfg.path(settings.report or Path(cfg.paths.reports) / f"folds-{cfg.data.dataset}.md")
    report_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(report_path, report.markdown(spec.name) + "\n")
    print("\n".join(report.lines()))
    print(f"folds: report -> {report_path}")
    if report.kit_straddling:
        raise StageError(
            f"{target} splits {report.kit_straddling} near-duplicate pair(s) across folds (it was made "
            "without these groups); rebuild it with FORCE=1 (make folds FORCE=1)"
        )


def _print_counts(labels: pd.DataFrame, folds: pd.DataFrame, n_classes: int) -> None:
    counts = fold_class_counts(labels, folds, n_classes)
    with pd.option_context("display.width", 200, "display.max_columns", 40):
        print("positives per class (columns) and fold (rows):")
        print(counts.to_string())


if __name__ == "__main__":
    from weakcell.cli import stage_main

    raise SystemExit(stage_main(run))
