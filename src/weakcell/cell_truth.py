"""Cell-level quality on the synthetic set, where every true cell has its own labels.

Segmented cells (the cache's) are matched one-to-one to true cells (``truth/{ID}_cells.png``) at
IoU >= 0.5; a matched cell is scored against its true cell's labels, an unmatched segmented cell is a
negative for every class, and a true cell that no segmented cell matches is a positive that can never be
retrieved (it lowers AP as it lowers recall in the competition metric).
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from scipy.optimize import linear_sum_assignment

from weakcell.constants import Verified
from weakcell.data.ids import inside
from weakcell.data.labels import to_multi_hot
from weakcell.metrics import per_class_ap

MATCH_IOU = 0.5


def label_iou(pred: np.ndarray, true: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """IoU of every present pred label with every present true label: ``(pred_ids, true_ids, iou)``
    with ``iou`` of shape ``(len(pred_ids), len(true_ids))``, background (0) left out.

    One ``bincount`` over ``pred * (max_true + 1) + true`` when the ids are small non-negative ints (label
    images always are); otherwise the ids are made dense with ``np.unique`` first (sorts the pixels: slow)."""
    pred, true = np.asarray(pred), np.asarray(true)
    if pred.shape != true.shape:
        raise ValueError(f"masks differ in shape: {pred.shape} vs {true.shape}")
    small = (
        pred.size
        and min(pred.min(), true.min()) >= 0
        and (int(pred.max()) + 1) * (int(true.max()) + 1) <= 4 * pred.size
    )
    if small:
        pred_dense, true_dense = pred.ravel().astype(np.int64), true.ravel().astype(np.int64)
        pred_ids, true_ids = np.arange(int(pred.max()) + 1), np.arange(int(true.max()) + 1)
    else:
        pred_ids, pred_dense = np.unique(pred.ravel(), return_inverse=True)
        true_ids, true_dense = np.unique(true.ravel(), return_inverse=True)
    counts = np.bincount(pred_dense * len(true_ids) + true_dense, minlength=len(pred_ids) * len(true_ids))
    counts = counts.reshape(len(pred_ids), len(true_ids))
    pred_area, true_area = counts.sum(1), counts.sum(0)
    keep_pred = (pred_ids != 0) & (pred_area > 0)  # present labels only, background dropped
    keep_true = (true_ids != 0) & (true_area > 0)
    inter = counts[np.ix_(keep_pred, keep_true)]
    union = pred_area[keep_pred][:, None] + true_area[keep_true][None, :] - inter
    return pred_ids[keep_pred], true_ids[keep_true], inter / np.maximum(union, 1)


def match_cells(pred: np.ndarray, true: np.ndarray, min_iou: float = MATCH_IOU) -> pd.DataFrame:
    """One-to-one matches ``cell_id, true_cell_id, iou`` (pred cells without a match are left out)."""
    pred_ids, true_ids, iou = label_iou(pred, true)
    if not (len(pred_ids) and len(true_ids)):
        return pd.DataFrame({"cell_id": [], "true_cell_id": [], "iou": []})
    rows, cols = linear_sum_assignment(np.where(iou >= min_iou, iou, 0.0), maximize=True)
    keep = iou[rows, cols] >= min_iou
    return pd.DataFrame(
        {
            "cell_id": pred_ids[rows[keep]],
            "true_cell_id": true_ids[cols[keep]],
            "iou": iou[rows[keep], cols[keep]],
        }
    )


def read_true_mask(data_dir: str | os.PathLike[str], image_id: str) -> np.ndarray:
    path = inside(Path(data_dir) / "truth", f"{image_id}_cells.png")
    mask = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if mask is None:
        raise FileNotFoundError(f"true mask {path} is missing or unreadable; regenerate with `make data`")
    return mask.astype(np.int32)


def cell_truth_table(cache_masks, data_dir: str | os.PathLike[str], image_ids: list[str]) -> pd.DataFrame:
    """Matches of every listed image: ``image_id, cell_id, true_cell_id, iou``.

    cache_masks: ``image_id -> Segmentation`` (``CellCache.masks``)."""
    tables = [
        match_cells(cache_masks(image_id).cells, read_true_mask(data_dir, image_id)).assign(image_id=image_id)
        for image_id in image_ids
    ]
    if not tables:
        return pd.DataFrame(columns=["image_id", "cell_id", "true_cell_id", "iou"])
    table = pd.concat(tables, ignore_index=True)
    return table[["image_id", "cell_id", "true_cell_id", "iou"]].astype(
        {"cell_id": np.int64, "true_cell_id": np.int64}
    )


def cell_level_ap(
    predictions: pd.DataFrame,
    score_columns: list[str],
    matches: pd.DataFrame,
    truth: pd.DataFrame,
    verified: Verified = "image",
) -> np.ndarray:
    """Per-class AP of cell scores against the true cells of the images in ``predictions``.

    predictions: ``image_id, cell_id`` + one score column per class (in class order).
    matches: ``cell_truth_table`` rows; truth: ``image_id, cell_id, labels`` of the true cells.
    verified: the competition metric's reading (``weakcell.competition_metric``): with "image" class c
    ranks only the cells of images that have a true cell of class c, as the organisers judge it; with
    "all" every cell counts for every class.
    """
    n_classes = len(score_columns)
    images = set(predictions["image_id"])
    true_cells = truth[truth["image_id"].isin(images)]
    true_hot = to_multi_hot(true_cells["labels"].tolist(), n_classes)
    true_key = pd.MultiIndex.from_arrays([true_cells["image_id"], true_cells["cell_id"].astype(np.int64)])
    scored = predictions.merge(matches, on=["image_id", "cell_id"], how="left")
    y_true = np.zeros((len(scored), n_classes), dtype=np.uint8)
    matched = scored["true_cell_id"].notna().to_numpy()
    keys = pd.MultiIndex.from_arrays(
        [scored["image_id"][matched], scored["true_cell_id"][matched].astype(np.int64)]
    )
    y_true[matched] = true_hot[true_key.get_indexer(keys)]
    found = np.zeros(len(true_cells), dtype=bool)
    found[true_key.get_indexer(keys)] = True
    n_missed = true_hot[~found].sum(0)
    scores = scored[score_columns].to_numpy(np.float64)
    if verified == "image":
        # (N, C): does the cell's image have a true cell of the class (every positive, missed ones too, is
        # in such an image). A cell of an image not judged for c ranks below every positive, where it
        # changes no precision at a hit: left out of c's AP, as the organisers leave it out.
        has = pd.DataFrame(true_hot, index=true_cells["image_id"].to_numpy()).groupby(level=0).max()
        judged = has.reindex(scored["image_id"].to_numpy()).fillna(0).to_numpy().astype(bool)
        scores = np.where(judged, scores, -np.inf)
    return per_class_ap(y_true, scores, n_missed)
