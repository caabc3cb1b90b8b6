"""The per-cell truth: reading a truth folder, and the training split's truth prepared for out-of-fold
scoring by the competition engine (``weakcell.competition_metric``).

A truth folder (``data/<set>/truth/``, what ``make data`` writes; any folder ``weakcell score`` reads):

- ``<image_id>_cells.png``: an instance label image (8- or 16-bit PNG, 0 = background). These files are
  the truth's images: an image whose label image holds no cell is still one (under
  ``verified="all"`` every detection in it is a false positive);
- ``cells.csv``: at least ``image_id,cell_id,Label`` (``Label``: class indices separated by ``|`` or a
  space; empty = a cell of no class); a cell of a label image without a row belongs to no class;
- ``images.csv`` (``image_id,split``): each image's split. Folders written before it existed take an
  image's split from its ``cells.csv`` rows (``split`` column); an image without rows then has no known
  split, and selecting a split refuses until ``images.csv`` names it.

``read_true_mask`` is the one reader of a label image, ``read_truth_folder`` of a folder. ``CellTruth``
holds, per training image, its true cells (classes, no label image) and the IoU of every segmented cell of
the cache with every true cell, computed once per training set (``build_cell_truth``): out-of-fold
scoring of any score table then only picks rows of those tables (``CellTruth.score``), and the oracle's
targets come from the same tables (``CellTruth.assigned``).
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
from tqdm import tqdm

from weakcell.competition_metric import (
    IOU_THRESHOLD,
    Detections,
    Found,
    TrueCells,
    label_iou,
    score_found,
    table_detections,
    true_cells,
)
from weakcell.constants import Verified, prob_columns
from weakcell.data.ids import check_ids, inside
from weakcell.data.labels import LabelError, parse_labels
from weakcell.errors import StageError

MASK_SUFFIX = "_cells.png"
CELLS_FILE = "cells.csv"
IMAGES_FILE = "images.csv"
TRUTH_COLUMNS = ("image_id", "cell_id", "Label")
# A segmented cell is assigned the true cell it overlaps at IoU > 0.5: at most one per cell and one per
# true cell whenever both label images are non-overlapping (a cell covering more than half of the union
# with one true cell covers less than half of any other), so no assignment problem is left to solve.
ASSIGN_IOU = 0.5


# -- reading a truth folder ---------------------------------------------------------------------------


def read_true_mask(path: str | os.PathLike[str]) -> np.ndarray:
    """An instance label image (8- or 16-bit single-channel PNG) as read (uint8 or uint16: a truth folder's
    masks are held in memory while it is scored); one-line errors otherwise."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"true mask {path} is missing: the truth folder needs <image_id>{MASK_SUFFIX}"
        )
    mask = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if mask is None:
        raise StageError(f"true mask {path} is not a readable image")
    if mask.ndim != 2 or mask.dtype not in (np.uint8, np.uint16):
        raise StageError(
            f"true mask {path} is {mask.dtype} with shape {mask.shape}: expected an 8- or 16-bit "
            "single-channel label image (0 = background, one value per cell)"
        )
    return mask


def read_cell_labels(folder: str | os.PathLike[str], n_classes: int) -> pd.DataFrame:
    """``folder/cells.csv`` as ``image_id, cell_id, labels`` (sorted class lists) plus ``split`` when the
    file has one."""
    path = Path(folder) / CELLS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {path}: a truth folder holds {CELLS_FILE} and <image_id>{MASK_SUFFIX}")
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [c for c in TRUTH_COLUMNS if c not in table.columns]
    if missing:
        raise StageError(f"{path}: missing column(s) {missing}; found {list(table.columns)}")
    try:
        cell_ids = [int(v) for v in table["cell_id"]]
    except ValueError:
        raise StageError(f"{path}: cell_id holds a value that is not an integer") from None
    labels = []
    for row, text in enumerate(table["Label"], start=1):
        # "|" (the 2021 layout) or " " (2018): class indices are integers, so either reads unambiguously
        joined = re.sub(r"[|\s]+", "|", text.strip())
        try:
            labels.append(parse_labels(joined, "|", n_classes, f"{path} row {row}") if joined else [])
        except LabelError as err:
            raise StageError(str(err)) from None
    check_ids(table["image_id"], str(path))
    rows = pd.DataFrame({"image_id": table["image_id"].to_numpy(), "cell_id": cell_ids, "labels": labels})
    if "split" in table.columns:
        rows["split"] = table["split"].to_numpy()
    return rows


def mask_image_ids(folder: str | os.PathLike[str]) -> list[str]:
    """The truth's images: one per ``<image_id>_cells.png``, sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no truth folder {folder}")
    return sorted(path.name[: -len(MASK_SUFFIX)] for path in folder.glob(f"*{MASK_SUFFIX}"))


def image_splits(folder: str | os.PathLike[str], image_ids: list[str]) -> dict[str, str]:
    """The split of each of ``image_ids``: ``images.csv``, else the split of the image's ``cells.csv``
    rows (a folder written before ``images.csv``); refuses an image whose split neither names."""
    folder = Path(folder)
    table_path, cells_path = folder / IMAGES_FILE, folder / CELLS_FILE
    if table_path.is_file():
        table, source = pd.read_csv(table_path, dtype=str, keep_default_na=False), str(table_path)
        if not {"image_id", "split"} <= set(table.columns):
            raise StageError(f"{table_path}: expected columns image_id,split; found {list(table.columns)}")
    else:
        table = pd.read_csv(cells_path, dtype=str, keep_default_na=False) if cells_path.is_file() else None
        source = f"the split column of {cells_path}"
        if table is None or "split" not in table.columns:
            raise StageError(
                f"{cells_path} has no split column and {table_path} does not exist, so no split can be "
                f"selected; write {table_path} (image_id,split)"
            )
    check_ids(table["image_id"], source)
    splits = dict(zip(table["image_id"], table["split"]))
    unknown = [image_id for image_id in image_ids if image_id not in splits]
    if unknown:
        raise StageError(
            f"{len(unknown)} label image(s) of {folder} have no split in {source}, e.g. "
            f"{unknown[0]}{MASK_SUFFIX}; list every image with its split in {table_path} (image_id,split)"
        )
    return {image_id: splits[image_id] for image_id in image_ids}


def truth_image_ids(folder: str | os.PathLike[str], split: str | None = None) -> list[str]:
    """``mask_image_ids``, those of ``split`` (``image_splits``) when given."""
    ids = mask_image_ids(folder)
    if split is None:
        return ids
    splits = image_splits(folder, ids)
    chosen = [image_id for image_id in ids if splits[image_id] == split]
    if not chosen:
        raise StageError(f"{folder} holds no label image of split {split!r}")
    return chosen


def _labels_by_image(
    folder: Path, labels: pd.DataFrame, image_ids: list[str], split: str | None
) -> dict[str, pd.DataFrame | None]:
    """Each image's ``cells.csv`` rows; refuses rows (of ``split``, when the table says) of an image
    without a label image."""
    listed = labels if split is None or "split" not in labels.columns else labels[labels["split"] == split]
    orphans = sorted(set(listed["image_id"]) - set(mask_image_ids(folder)))
    if orphans:
        raise FileNotFoundError(
            f"true mask {folder / (orphans[0] + MASK_SUFFIX)} is missing: {folder / CELLS_FILE} lists cells "
            f"of {len(orphans)} image(s) without <image_id>{MASK_SUFFIX}"
        )
    by_image = dict(tuple(labels[labels["image_id"].isin(image_ids)].groupby("image_id", sort=False)))
    return {image_id: by_image.get(image_id) for image_id in image_ids}


def read_truth_folder(
    folder: str | os.PathLike[str], n_classes: int, split: str | None = None
) -> dict[str, TrueCells]:
    """``TrueCells`` of every image of the truth folder (of ``split`` when given), sorted by image id."""
    folder = Path(folder)
    labels = read_cell_labels(folder, n_classes)
    image_ids = truth_image_ids(folder, split)
    return {
        image_id: true_cells(
            read_true_mask(inside(folder, f"{image_id}{MASK_SUFFIX}")),
            rows,
            n_classes,
            f"{image_id} ({folder})",
        )
        for image_id, rows in _labels_by_image(folder, labels, image_ids, split).items()
    }


# -- the training split's truth for out-of-fold scoring ---------------------------------------------------


@dataclass(frozen=True)
class ImageTruth:
    """One training image's true cells (no label image) and its segmented cells' overlaps with them:
    ``cell_ids`` ``(n,)`` the cells of the cache's label image (sorted; none when the image is not cached),
    ``iou`` ``(n, g)`` with ``cells.ids``; ``fold`` its fold (None: not in the folds file)."""

    cells: TrueCells
    cell_ids: np.ndarray
    iou: np.ndarray
    fold: int | None


@dataclass(frozen=True)
class CellTruth:
    """Every training image of a synthetic set's truth (its ``split``), in image id order."""

    images: dict[str, ImageTruth]
    n_classes: int

    def truth(self, folds: Collection[int] | None = None) -> dict[str, TrueCells]:
        """The true cells of the images of ``folds`` (default every image), as the engine takes them."""
        return {i: t.cells for i, t in self.images.items() if folds is None or t.fold in folds}

    def found(self, scores: pd.DataFrame, folds: Collection[int] | None = None) -> Found:
        """Detections of a score table (``image_id, cell_id, p_0..p_{C-1}``; NaN = not predicted) on the
        images of ``folds``, and how many predictions other images hold (``competition_metric.Found``)."""
        columns = prob_columns(self.n_classes)
        missing = [c for c in ["image_id", "cell_id", *columns] if c not in scores.columns]
        if missing:
            raise ValueError(f"cell scores lack columns {missing}")
        probs = scores[columns].to_numpy(np.float64)  # one conversion: per-image pandas slicing is slow
        cell_ids = scores["cell_id"].to_numpy(np.int64)
        detections: dict[Any, Detections] = {}
        other = 0
        for image_id, rows in scores.groupby("image_id", sort=False).indices.items():
            image = self.images.get(str(image_id))
            if image is None or (folds is not None and image.fold not in folds):
                other += int(np.isfinite(probs[rows]).sum())
                continue
            detections[str(image_id)] = table_detections(
                image.cell_ids, image.iou, cell_ids[rows], probs[rows]
            )
        return detections, other

    def score(
        self,
        scores: pd.DataFrame,
        verified: Verified = "image",
        folds: Collection[int] | None = None,
        bootstrap: int = 0,
    ) -> dict:
        """The competition metric (``score_found``'s dict) of a score table against the true cells of
        the images of ``folds`` (default every training image; a truth image without scores predicts
        nothing)."""
        return score_found(
            self.found(scores, folds), self.truth(folds), self.n_classes, verified, IOU_THRESHOLD, bootstrap
        )

    def assigned(self, cells: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """For each segmented cell (``image_id, cell_id`` rows): the classes ``(N, C)`` bool of the true
        cell it overlaps at IoU > ``ASSIGN_IOU`` and whether it has one ``(N,)``."""
        classes = np.zeros((len(cells), self.n_classes), dtype=bool)
        found = np.zeros(len(cells), dtype=bool)
        cell_ids = cells["cell_id"].to_numpy(np.int64)
        for image_id, rows in cells.groupby("image_id", sort=False).indices.items():
            image = self.images.get(str(image_id))
            if image is None or not image.iou.size:  # not in the truth, no segmented or no true cell
                continue
            best = image.iou.argmax(1)  # each segmented cell's best true cell
            assigned = image.iou[np.arange(len(image.cell_ids)), best] > ASSIGN_IOU
            where = np.minimum(np.searchsorted(image.cell_ids, cell_ids[rows]), len(image.cell_ids) - 1)
            hit = (image.cell_ids[where] == cell_ids[rows]) & assigned[where]
            classes[rows[hit]] = image.cells.classes[best[where[hit]]]
            found[rows[hit]] = True
        return classes, found


def build_cell_truth(
    truth_dir: str | os.PathLike[str],
    n_classes: int,
    masks_of: Callable[[str], np.ndarray | None],
    folds: Mapping[str, int],
    split: str = "train",
) -> CellTruth:
    """``CellTruth`` of every image of ``split`` in ``truth_dir``: each true label image is read once and
    overlapped with the segmented one (``masks_of(image_id)``: the cache's label image, None when the
    image is not cached), then dropped. ``folds``: image id -> fold."""
    truth_dir = Path(truth_dir)
    labels = read_cell_labels(truth_dir, n_classes)
    image_ids = truth_image_ids(truth_dir, split)
    images: dict[str, ImageTruth] = {}
    for image_id, rows in tqdm(
        _labels_by_image(truth_dir, labels, image_ids, split).items(),
        desc="cell truth",
        unit="img",
        leave=False,
        disable=not sys.stderr.isatty(),  # a log or a test reads stderr: only errors go there
    ):
        true_mask = read_true_mask(inside(truth_dir, f"{image_id}{MASK_SUFFIX}"))
        cells = true_cells(true_mask, rows, n_classes, f"{image_id} ({truth_dir})")
        segmented = masks_of(image_id)
        if segmented is None:
            cell_ids, iou = np.zeros(0, np.int64), np.zeros((0, len(cells.ids)))
        else:
            if np.shape(segmented) != true_mask.shape:
                raise StageError(
                    f"the cache's label image of {image_id} is {np.shape(segmented)}, its true mask "
                    f"{truth_dir / (image_id + MASK_SUFFIX)} {true_mask.shape}: rebuild the cache (make cache "
                    "FORCE=1) for this data set"
                )
            cell_ids, _, iou = label_iou(segmented, true_mask)
        images[image_id] = ImageTruth(
            cells.without_mask(), cell_ids.astype(np.int64), iou, folds.get(image_id)
        )
    return CellTruth(images, n_classes)
