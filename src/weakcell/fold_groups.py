"""What grouped folds are made from and how leaky a split is (``make folds`` with ``folds.duplicates`` or
``folds.external``): the images of the competition's label file and of external sets, their antibodies,
the near-duplicate pairs of ``weakcell duplicates``, the groups these join, and the folds report.

Pure functions and tables; ``weakcell.folds`` stratifies and writes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from weakcell.config import Config
from weakcell.data.datasets import DatasetSpec
from weakcell.data.ids import check_ids
from weakcell.data.images import list_image_ids
from weakcell.data.labels import read_label_file
from weakcell.errors import StageError

COMPETITION = "competition"  # the ``source`` of the data set's own images


@dataclass
class FoldInputs:
    """Every image to fold (``ID, labels, source, antibody``; competition images first, then each external
    set's, ``source`` its folder), the near-duplicate pairs (``a, b, distance``), the test split's IDs, and
    how each external set is folded (``modes``: its folder -> ``train_only`` or ``folded``)."""

    images: pd.DataFrame
    pairs: pd.DataFrame
    test_ids: frozenset[str]
    modes: dict[str, str]
    duplicates_file: str | None

    @property
    def external(self) -> np.ndarray:
        return self.images["source"].ne(COMPETITION).to_numpy()

    @property
    def train_only(self) -> np.ndarray:
        """External images that get fold -1 unless their group holds a competition image."""
        return self.images["source"].map(self.modes).eq("train_only").to_numpy()


def read_duplicates(path: Path) -> pd.DataFrame:
    """The pairs of a ``weakcell duplicates`` JSON as ``a, b, distance``; StageError for another file."""
    if not path.is_file():
        raise StageError(
            f"folds.duplicates={path} does not exist; make it with `weakcell duplicates DIR ... --json`"
        )
    try:
        payload = json.loads(path.read_text())
        pairs = pd.DataFrame(payload["pairs"], columns=["a", "b", "distance"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise StageError(f"{path}: not a duplicates file of `weakcell duplicates` ({err})") from err
    return pairs.astype({"a": str, "b": str})


def read_external_set(folder: Path, spec: DatasetSpec) -> pd.DataFrame:
    """An external set's stored images: ``ID, labels`` from its label file, ``antibody`` from sources.csv."""
    sources_path = folder / "sources.csv"
    if not sources_path.is_file():
        raise StageError(f"folds.external: {folder} has no sources.csv; make it with `make external`")
    labels = read_label_file(folder / spec.label_file, spec)
    sources = pd.read_csv(sources_path, dtype=str, keep_default_na=False, usecols=["ID", "antibody"])
    check_ids(sources["ID"], str(sources_path))
    images = labels[["ID", "labels"]].merge(sources, on="ID", how="left", validate="one_to_one")
    unknown = images["antibody"].isna()
    if unknown.any():
        raise StageError(
            f"{folder}: {int(unknown.sum())} labelled images are not in sources.csv, e.g. "
            f"{images['ID'][unknown].iloc[0]}; rerun `make external`"
        )
    return images.assign(source=str(folder))


def fold_inputs(cfg: Config, spec: DatasetSpec, labels: pd.DataFrame) -> FoldInputs | None:
    """The inputs of grouped folds, or None when neither ``folds.duplicates`` nor ``folds.external`` is
    set (then the folds are plain multilabel stratification, as before groups existed)."""
    settings = cfg.folds
    if settings.duplicates is None and not settings.external:
        return None
    parts = [labels[["ID", "labels"]].assign(source=COMPETITION, antibody=None)]
    parts += [read_external_set(cfg.path(folder), spec) for folder in settings.external]
    images = pd.concat(parts, ignore_index=True)
    repeated = images["ID"][images["ID"].duplicated()]
    if len(repeated):
        raise StageError(
            f"image {repeated.iloc[0]} is in more than one of the label file and folds.external; "
            "IDs must be unique over them"
        )
    pairs = (
        read_duplicates(cfg.path(settings.duplicates))
        if settings.duplicates
        else pd.DataFrame({"a": [], "b": [], "distance": []})
    )
    modes = {str(cfg.path(folder)): settings.mode_of(folder) for folder in settings.external}
    return FoldInputs(images, pairs, frozenset(_test_ids(cfg, spec)), modes, settings.duplicates)


def _test_ids(cfg: Config, spec: DatasetSpec) -> set[str]:
    """The competition's test IDs: its sample submission's and its test folder's, where they exist."""
    ids: set[str] = set()
    sample = cfg.data_dir / spec.sample_submission
    if sample.is_file():
        ids.update(pd.read_csv(sample, dtype=str, usecols=[0]).iloc[:, 0])
    test_dir = cfg.data_dir / spec.test_dir
    if test_dir.is_dir():
        ids.update(list_image_ids(test_dir))
    return ids


def group_codes(ids: pd.Series, antibodies: pd.Series, pairs: pd.DataFrame) -> np.ndarray:
    """Per image, the index of the first image of its group: images of one antibody (None = none) and
    both images of every pair (pairs naming other images are ignored) share a group. Codes increase with
    first appearance, so all-singleton groups keep the images' order."""
    n = len(ids)
    index = pd.Series(np.arange(n), index=ids.to_numpy())
    edges = [np.zeros((0, 2), dtype=np.int64)]
    known = pairs[pairs["a"].isin(index.index) & pairs["b"].isin(index.index)]
    edges.append(np.stack([index.loc[known["a"]].to_numpy(), index.loc[known["b"]].to_numpy()], axis=1))
    with_antibody = antibodies.notna().to_numpy() & antibodies.astype(str).ne("").to_numpy()
    first = (
        pd.Series(np.arange(n)[with_antibody]).groupby(antibodies[with_antibody].to_numpy()).transform("min")
    )
    edges.append(np.stack([first.to_numpy(), np.arange(n)[with_antibody]], axis=1))
    both = np.concatenate(edges).astype(np.int64)
    graph = coo_matrix((np.ones(len(both), dtype=np.int8), (both[:, 0], both[:, 1])), shape=(n, n))
    _, component = connected_components(graph, directed=False)
    return pd.Series(np.arange(n)).groupby(component).transform("min").to_numpy()


def straddling(fold_of: pd.Series, pairs: pd.DataFrame) -> tuple[int, int]:
    """(pairs whose two images are in different folds, pairs with both images in ``fold_of``). Fold -1 (a
    train-only image) differs from every validation fold: its twin is validated on what it trained."""
    known = pairs[pairs["a"].isin(fold_of.index) & pairs["b"].isin(fold_of.index)]
    split = fold_of.loc[known["a"]].to_numpy() != fold_of.loc[known["b"]].to_numpy()
    return int(split.sum()), len(known)


def split_antibodies(images: pd.DataFrame, fold_of: pd.Series) -> int:
    """Antibodies whose images lie in more than one fold."""
    tagged = images[images["antibody"].notna() & images["antibody"].astype(str).ne("")]
    folds = fold_of.loc[tagged["ID"]].to_numpy()
    return int((pd.Series(folds).groupby(tagged["antibody"].to_numpy()).nunique() > 1).sum())


def twins_in_test(pairs: pd.DataFrame, train_ids: set[str], test_ids: frozenset[str]) -> pd.DataFrame:
    """Near-duplicate pairs joining a test image to a training image: ``test, train, distance``."""
    a_test = pairs["a"].isin(test_ids) & pairs["b"].isin(train_ids)
    b_test = pairs["b"].isin(test_ids) & pairs["a"].isin(train_ids)
    twins = pd.concat(
        [
            pairs[a_test].rename(columns={"a": "test", "b": "train"}),
            pairs[b_test].rename(columns={"b": "test", "a": "train"}),
        ]
    )
    return (
        twins[["test", "train", "distance"]].sort_values(["distance", "test", "train"]).reset_index(drop=True)
    )


@dataclass
class FoldsReport:
    """How leaky the kit's folds and plain stratification are on the same images."""

    n_splits: int
    seed: int
    duplicates_file: str | None
    pairs_in_folds: int
    pairs_elsewhere: int
    plain_straddling: int
    kit_straddling: int
    plain_split_antibodies: int
    kit_split_antibodies: int
    images: int
    groups: int
    largest_group: int
    external: int
    train_only: int
    test_twins: pd.DataFrame

    def _share(self, count: int) -> str:
        return f"{count / self.pairs_in_folds:.0%}" if self.pairs_in_folds else "-"

    def lines(self) -> list[str]:
        """The report as printed lines."""
        lines = [
            f"folds: {self.pairs_in_folds} near-duplicate pairs among the folded images "
            f"({self.pairs_elsewhere} more name other images); straddling folds: "
            f"{self.plain_straddling} ({self._share(self.plain_straddling)}) with plain multilabel "
            f"stratification, {self.kit_straddling} ({self._share(self.kit_straddling)}) with the kit's grouped folds",
            f"folds: {self.images} images in {self.groups} groups (largest {self.largest_group}); "
            f"{self.external} external images, {self.train_only} of them train-only (fold -1); antibodies split "
            f"across folds: {self.plain_split_antibodies} plain, {self.kit_split_antibodies} grouped",
        ]
        if len(self.test_twins):
            shown = ", ".join(
                f"{t.test} ~ {t.train} (d={t.distance})" for t in self.test_twins.head(10).itertuples()
            )
            more = (
                f", and {len(self.test_twins) - 10} more (see the report)"
                if len(self.test_twins) > 10
                else ""
            )
            lines.append(
                f"warning: {self.test_twins['test'].nunique()} test image(s) are near-duplicates of training "
                f"images: {shown}{more}"
            )
        return lines

    def markdown(self, dataset: str) -> str:
        """The report as a markdown page."""
        rows = [
            "| folds | pairs straddling folds | share | antibodies split across folds |",
            "|---|---:|---:|---:|",
            f"| plain multilabel stratification | {self.plain_straddling} | {self._share(self.plain_straddling)} "
            f"| {self.plain_split_antibodies} |",
            f"| kit: grouped by antibody and near-duplicate cluster | {self.kit_straddling} | "
            f"{self._share(self.kit_straddling)} | {self.kit_split_antibodies} |",
        ]
        twins = ["", "No test image is a near-duplicate of a training image."]
        if len(self.test_twins):
            twins = [
                "",
                "## Test images that are near-duplicates of training images",
                "",
                "| test | train | distance |",
                "|---|---|---:|",
            ]
            twins += [f"| {t.test} | {t.train} | {t.distance} |" for t in self.test_twins.itertuples()]
        return "\n".join(
            [
                f"# Folds of {dataset}: near-duplicates and antibodies across folds",
                "",
                f"{self.n_splits} folds, seed {self.seed}; near-duplicates from `{self.duplicates_file}`: "
                f"{self.pairs_in_folds} pairs among the folded images ({self.pairs_elsewhere} more name other "
                f"images). {self.images} images in {self.groups} groups (largest {self.largest_group}); "
                f"{self.external} external images, {self.train_only} train-only (fold -1). A pair straddles "
                "folds when its images are in different folds, fold -1 included (the train-only twin is "
                "trained on while the other is validated). Goal: 0.",
                "",
                *rows,
                *twins,
            ]
        )
