"""Multilabel-stratified K-fold at image level (``make folds``) -> ``folds/<dataset>.csv`` (``ID,fold``).

Folds are computed once and committed for real data sets, so every run, ablation and blend sees the
same split. Cells inherit their image's fold, so cells of one image never straddle folds.

Each setting has its own file (``Config.folds_file``: ``folds/<dataset>.csv`` at the default settings,
``folds/<dataset>-<n>x<seed>.csv`` otherwise), and beside it ``<file stem>.lineage.json`` records the
settings and the label file it was made from (``weakcell.lineage``). An existing file is reused only for
the settings it records; a file of other settings (``folds.file`` pointing at it) stops the stage with one
line, and a file git tracks (the committed folds) is never overwritten, ``FORCE=1`` included. A run
records the content hash of the folds file it read, not the fold settings.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from iterstrat.ml_stratifiers import MultilabelStratifiedKFold

from weakcell.config import Config
from weakcell.data.datasets import get_dataset
from weakcell.data.labels import read_label_file, to_multi_hot
from weakcell.data.manifest import file_hash
from weakcell.errors import StageError, UnknownName
from weakcell.lineage import Lineage
from weakcell.outputs import atomic_csv, atomic_write_json, writing

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


# -- the folds file and its record -------------------------------------------------------------------


def record_path(folds_file: Path) -> Path:
    """``folds/x.csv`` -> ``folds/x.lineage.json``: the settings and label file the folds were made from."""
    return folds_file.with_name(f"{folds_file.stem}.lineage.json")


@dataclass(frozen=True)
class FoldsRecord:
    """What ``<stem>.lineage.json`` says of a folds file: its lineage and the content hash it had when
    written (a file edited since is no longer what the record describes)."""

    lineage: Lineage
    content: str

    @classmethod
    def read(cls, folds_file: Path) -> FoldsRecord | None:
        path = record_path(folds_file)
        if not path.is_file():
            return None
        try:
            record = json.loads(path.read_text())
            lineage = Lineage("folds", dict(record["settings"]), dict(record["upstream"]))
            return cls(lineage, str(record["content"]))
        except (ValueError, KeyError, TypeError) as err:
            raise StageError(
                f"{path} is damaged ({type(err).__name__}); delete it and rerun make folds"
            ) from err

    def write(self, folds_file: Path) -> None:
        atomic_write_json(record_path(folds_file), {**self.lineage.record(), "content": self.content})

    def describe(self) -> str:
        """``3 folds, seed 42`` (plus the group column) as recorded."""
        settings = self.lineage.settings
        if not settings:
            return "folds of your own"
        group = settings.get("folds.group_column")
        by = f", grouped by {group}" if group else ""
        return f"{settings.get('folds.n_splits')} folds, seed {settings.get('folds.seed')}{by}"


def is_tracked(path: Path) -> bool:
    """Whether git tracks ``path`` (a committed folds file); False outside a repository or without git."""
    try:
        found = subprocess.run(
            ["git", "ls-files", "--error-unmatch", path.name],
            cwd=path.parent,
            capture_output=True,
            check=False,
        )
    except OSError:
        return False
    return found.returncode == 0


def made_by(labels: pd.DataFrame, folds: pd.DataFrame, cfg: Config, n_classes: int) -> bool:
    """Whether the fold settings of ``cfg`` make exactly ``folds`` from ``labels`` (a file written before
    folds recorded their settings is adopted only then)."""
    if set(folds["ID"]) != set(labels["ID"]):
        return False
    made = make_folds(labels, n_classes, cfg.folds.n_splits, cfg.folds.seed, cfg.folds.group_column)
    return made.set_index("ID")["fold"].equals(folds.set_index("ID")["fold"].reindex(made["ID"]))


def judge_existing(
    cfg: Config, target: Path, wanted: Lineage, labels: pd.DataFrame, n_classes: int
) -> FoldsRecord | None:
    """Whether the existing ``target`` serves ``cfg``'s settings: its record (reuse), None (build it), or
    a one-line ``StageError`` (it is another settings' file, or a tracked file that would be overwritten)."""
    tracked = is_tracked(target)
    keep = "git tracks it, so it is never overwritten" if tracked else "rebuild it with FORCE=1"
    if cfg.force:
        if tracked:
            raise StageError(
                f"{target} is tracked by git and is never overwritten; set folds.file to a file of your own "
                "to rebuild folds (or git rm it first to regenerate the committed file)"
            )
        return None
    record, content = FoldsRecord.read(target), file_hash(target)
    folds = read_folds(target)
    if record is None or record.content != content:  # written by hand, or before records existed
        if made_by(labels, folds, cfg, n_classes):
            return FoldsRecord(wanted, content)  # adopted: these settings make exactly this file
        if cfg.folds.file and set(folds["ID"]) == set(labels["ID"]):
            return FoldsRecord(Lineage("folds", {}, {}), content)  # the user's own folds, used as they are
        raise StageError(
            f"{target} is not what these settings make (folds.n_splits={cfg.folds.n_splits}, "
            f"folds.seed={cfg.folds.seed}; it has {folds['fold'].nunique()} folds and no record of its own): "
            f"use it as it is with folds.file={target}, or {keep}"
        )
    differ = wanted.setting_changes(record.lineage)
    if differ:
        raise StageError(
            f"{target} holds folds of other settings ({', '.join(differ)}); leave folds.file unset to use "
            f"these settings' own file, point folds.file at another file, or {keep}"
        )
    if record.lineage.upstream != wanted.upstream and set(folds["ID"]) != set(labels["ID"]):
        if tracked:
            raise StageError(
                f"{target} does not match {cfg.data_dir} ({len(folds)} vs {len(labels)} IDs) and {keep}; "
                "set folds.file to a file of your own for this label file"
            )
        return None  # the kit's own file of these settings, for a label file that has changed: rebuilt
    return record


def load_folds(cfg: Config) -> tuple[pd.DataFrame, str]:
    """The folds file a run reads (``Config.folds_file``) and its content hash, which the run records. A
    file whose record names other fold settings (``folds.file`` pointing at it) stops with one line."""
    target = cfg.folds_file
    if not target.is_file():
        raise FileNotFoundError(f"no folds file {target}; run `make folds` first")
    record = FoldsRecord.read(target)
    content = file_hash(target)
    if record is not None and record.content == content and record.lineage.settings:
        differ = Lineage.of("folds", cfg, labels=None).setting_changes(record.lineage)
        if differ:
            raise StageError(
                f"{target} holds folds of other settings ({', '.join(differ)}); run make folds with these "
                "settings (their own file), or point folds.file at the file you mean"
            )
    return read_folds(target), content


def describe_folds(folds_file: Path) -> str:
    """``synthetic-3x42.csv: 3 folds, seed 42`` from the file's record (what the leaderboard prints)."""
    record = FoldsRecord.read(folds_file)
    if record is None:
        return f"{folds_file.name}: folds of your own"
    return f"{folds_file.name}: {record.describe()}"


def run(cfg: Config) -> pd.DataFrame:
    """Entry point: read the dataset's label file, write the folds file of these settings (once, with its
    record), print per-fold counts."""
    spec = get_dataset(cfg.data.dataset)
    label_file = cfg.data_dir / spec.label_file
    labels = read_label_file(label_file, spec)
    target = cfg.folds_file
    wanted = Lineage.of("folds", cfg, labels=file_hash(label_file))
    record = judge_existing(cfg, target, wanted, labels, spec.n_classes) if target.is_file() else None
    if record is not None:
        if record.lineage.settings and FoldsRecord.read(target) != record:
            with writing(record_path(target)):
                record.write(target)  # adopted: written before records existed, by these settings
        folds = read_folds(target)
        print(
            f"folds: {target} ({record.describe()}) serves the {len(labels)} images of {label_file}; reused"
        )
        _print_counts(labels, folds, spec.n_classes)
        return folds
    folds = make_folds(labels, spec.n_classes, cfg.folds.n_splits, cfg.folds.seed, cfg.folds.group_column)
    with writing(target):
        target.parent.mkdir(parents=True, exist_ok=True)
    atomic_csv(target, folds)
    FoldsRecord(wanted, file_hash(target)).write(target)
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
