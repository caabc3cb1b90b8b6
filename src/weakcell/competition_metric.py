"""The Kaggle HPA Single Cell Classification (2021) metric: instance-level mAP, Open Images style.

For each class ``c`` every predicted ``(image, cell mask, confidence)`` of class ``c`` over all images is
ranked by confidence. Inside one image, predictions are visited in descending confidence; a prediction
is a true positive when its best-overlapping ground-truth cell of class ``c`` (argmax IoU over that
image's true cells of class ``c``) has IoU >= ``iou_threshold`` and was not already taken by an earlier
prediction; otherwise (already taken, or too little overlap) it is a false positive. This is the rule of
the Open Images / TF object-detection evaluator (``per_image_evaluation``). Because true cells of one
label image are disjoint, a mask can overlap at most one of them at IoU > 0.5, so at the competition's
0.6 it is the same as "matches any not-yet-matched true cell"; below 0.5 the argmax rule can differ.

AP (``open_images_ap``) is the TF ``metrics.compute_average_precision`` rule: with ``tp``/``fp`` cumulated
over the globally ranked predictions, ``recall = TP / n_gt`` and ``precision = TP / (TP + FP)``, pad
``recall`` with 0 in front and 1 at the end and ``precision`` with 0 at both ends, make precision
non-increasing from the right (``p[i] = max(p[i], p[i + 1])``), and sum ``(r[i] - r[i-1]) * p[i]`` over
the indices where recall changes. The trailing padding contributes 0, so recall never reached (missed
cells, cells of images without predictions) costs AP exactly as in the competition.

Choices (documented, checked by tests):
- a class with no true instance anywhere has AP NaN and is left out of the mean (``np.nanmean``), as the
  TF evaluator skips classes with ``num_gt_instances == 0``; its predictions are then ignored;
- every predicted cell predicts every class with its probability (how submissions work);
- confidence ties keep input order (stable sort); the reference's tie order is an implementation detail;
- a row of ``pred_scores`` whose cell id is absent from its predicted mask is an empty mask (a FP);
- true cells present in the mask without a row in ``true_labels`` belong to no class; a ``true_labels``
  row for a cell absent from its true mask, or predictions for an image without ``true_masks``, raise;
- Open Images also ignores detections of classes outside an image's verified image-level labels and has
  group-of boxes; neither is modelled here (every class counts as verified in every image).
"""

from __future__ import annotations

from collections.abc import Collection, Hashable, Mapping, Sequence

import numpy as np
import pandas as pd

from weakcell.cell_truth import label_iou

IOU_THRESHOLD = 0.6
N_CLASSES = 19


def image_true_positives(
    scores: np.ndarray, iou: np.ndarray, iou_threshold: float = IOU_THRESHOLD
) -> np.ndarray:
    """TP flags (in input order) of one image's predictions of one class.

    scores: ``(n,)`` confidences; iou: ``(n, g)`` IoU of each prediction with each true instance of the
    class in this image. Greedy in descending confidence with the Open Images argmax rule (module doc).
    """
    scores = np.asarray(scores, dtype=np.float64).ravel()
    n = len(scores)
    tp = np.zeros(n, dtype=bool)
    iou = np.asarray(iou, dtype=np.float64).reshape(n, -1)
    if n == 0 or iou.shape[1] == 0:
        return tp
    order = np.argsort(-scores, kind="stable")
    ranked = iou[order]
    best = ranked.argmax(1)
    valid = ranked[np.arange(n), best] >= iou_threshold
    # a valid prediction takes its best true cell unless an earlier-ranked valid prediction took it
    ranks = np.flatnonzero(valid)
    _, first = np.unique(best[ranks], return_index=True)
    tp[order[ranks[first]]] = True
    return tp


def open_images_ap(scores: np.ndarray, tp: np.ndarray, n_gt: int) -> float:
    """AP of one class from all its predictions (any image order) and the number of true instances.

    NaN when ``n_gt == 0``; 0 when there are true instances but no prediction.
    """
    if n_gt <= 0:
        return float("nan")
    scores = np.asarray(scores, dtype=np.float64).ravel()
    tp = np.asarray(tp, dtype=bool).ravel()
    if len(scores) == 0:
        return 0.0
    hits = tp[np.argsort(-scores, kind="stable")]
    cum_tp = np.cumsum(hits)
    precision = cum_tp / np.arange(1, len(hits) + 1)
    recall = cum_tp / n_gt
    recall = np.concatenate([[0.0], recall, [1.0]])
    precision = np.concatenate([[0.0], precision, [0.0]])
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    steps = np.flatnonzero(recall[1:] != recall[:-1]) + 1
    return float(np.sum((recall[steps] - recall[steps - 1]) * precision[steps]))


def _present_ids(mask: np.ndarray) -> np.ndarray:
    """Sorted non-zero labels of a label image."""
    mask = np.asarray(mask)
    if mask.size and mask.min() >= 0 and mask.max() <= 4 * mask.size:
        return np.flatnonzero(np.bincount(mask.ravel().astype(np.int64))[1:]) + 1
    ids = np.unique(mask)
    return ids[ids != 0]


def iou_table(pred: np.ndarray, true: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``pred_ids, true_ids, iou`` of the present non-zero labels (``weakcell.cell_truth.label_iou``)."""
    return label_iou(pred, true)


def _iou_rows(pred_mask: np.ndarray, true_mask: np.ndarray, pred_cells: np.ndarray):
    """IoU table ``(len(pred_cells), n_true)`` (zero rows for cells absent from the mask) and true ids."""
    pred_ids, true_ids, iou = iou_table(pred_mask, true_mask)
    rows = np.zeros((len(pred_cells), len(true_ids)), dtype=np.float64)
    if len(pred_ids):
        where = np.searchsorted(pred_ids, pred_cells)
        where = np.minimum(where, len(pred_ids) - 1)
        present = pred_ids[where] == pred_cells
        rows[present] = iou[where[present]]
    return rows, true_ids


def class_ap(
    predictions: Mapping[Hashable, tuple[Sequence[tuple[float, int]], np.ndarray]],
    truths: Mapping[Hashable, tuple[Collection[int], np.ndarray]],
    iou_threshold: float = IOU_THRESHOLD,
) -> float:
    """AP of one class.

    predictions: ``image_id -> ([(confidence, pred cell id), ...], pred label mask)``;
    truths: ``image_id -> (true cell ids of this class, true label mask)``. Images only in ``truths`` have
    no prediction (their instances lower recall); images only in ``predictions`` raise ValueError.
    """
    unknown = set(predictions) - set(truths)
    if unknown:
        raise ValueError(f"predictions for images without truth: {sorted(map(str, unknown))[:5]}")
    all_scores, all_tp, n_gt = [], [], 0
    for image_id, (ids, true_mask) in truths.items():
        true_mask = np.asarray(true_mask)
        gt = np.unique(np.asarray(list(ids), dtype=np.int64))
        present = np.isin(gt, _present_ids(true_mask))
        if not present.all():
            raise ValueError(f"image {image_id}: true ids {gt[~present].tolist()} are not in its true mask")
        n_gt += len(gt)
        if image_id not in predictions:
            continue
        pairs, pred_mask = predictions[image_id]
        if len(pairs) == 0:
            continue
        scores = np.array([float(s) for s, _ in pairs])
        cells = np.array([int(c) for _, c in pairs], dtype=np.int64)
        rows, true_ids = _iou_rows(pred_mask, true_mask, cells)
        all_scores.append(scores)
        all_tp.append(image_true_positives(scores, rows[:, np.isin(true_ids, gt)], iou_threshold))
    if not all_scores:
        return open_images_ap(np.zeros(0), np.zeros(0, dtype=bool), n_gt)
    return open_images_ap(np.concatenate(all_scores), np.concatenate(all_tp), n_gt)


def _true_classes(true_ids: np.ndarray, labels: pd.DataFrame, n_classes: int, image_id) -> np.ndarray:
    """``(len(true_ids), n_classes)`` bool: the classes of each true cell of the mask."""
    hot = np.zeros((len(true_ids), n_classes), dtype=bool)
    if labels is None or len(labels) == 0:
        return hot
    cells = labels["cell_id"].to_numpy(np.int64)
    where = np.searchsorted(true_ids, cells)
    ok = (where < len(true_ids)) & (true_ids[np.minimum(where, max(len(true_ids) - 1, 0))] == cells)
    if len(true_ids) == 0 or not ok.all():
        missing = cells[~ok] if len(true_ids) else cells
        raise ValueError(f"image {image_id}: labelled true cells {missing.tolist()} are not in its true mask")
    for row, cell_labels in zip(where, labels["labels"]):
        classes = np.asarray(list(cell_labels), dtype=np.int64)
        if classes.size and (classes.min() < 0 or classes.max() >= n_classes):
            raise ValueError(
                f"image {image_id}: class out of range 0..{n_classes - 1} in {list(cell_labels)}"
            )
        hot[row, classes] = True
    return hot


def competition_map(
    pred_masks: Mapping[Hashable, np.ndarray],
    pred_scores: pd.DataFrame,
    true_masks: Mapping[Hashable, np.ndarray],
    true_labels: pd.DataFrame,
    n_classes: int = N_CLASSES,
    iou_threshold: float = IOU_THRESHOLD,
) -> dict:
    """The competition mAP of cell predictions against true cells.

    pred_masks / true_masks: ``image_id -> (H, W)`` int label image (0 = background);
    pred_scores: ``image_id, cell_id, p_0 .. p_{C-1}`` (one row per predicted cell; every row predicts
    every class with its probability); true_labels: ``image_id, cell_id, labels`` (list of class ints).
    Each image's IoU table (``iou_table``, one bincount) is computed once and reused for every class.

    Returns ``map`` (mean over classes with a true instance), ``ap`` ``(C,)`` (NaN where no true
    instance), ``n_gt``, ``n_tp`` ``(C,)``, ``n_predictions`` (cells predicted, each for every class),
    ``n_images``.
    """
    score_columns = [f"p_{c}" for c in range(n_classes)]
    missing = [c for c in ["image_id", "cell_id", *score_columns] if c not in pred_scores.columns]
    if missing:
        raise ValueError(f"pred_scores lacks columns {missing}")
    unknown = set(pred_scores["image_id"]) - set(true_masks)
    if unknown:
        raise ValueError(f"predictions for images without true mask: {sorted(map(str, unknown))[:5]}")
    unknown = set(pred_scores["image_id"]) - set(pred_masks)
    if unknown:
        raise ValueError(f"predictions for images without predicted mask: {sorted(map(str, unknown))[:5]}")
    scores_by_image = dict(tuple(pred_scores.groupby("image_id", sort=False)))
    labels_by_image = dict(tuple(true_labels.groupby("image_id", sort=False)))
    unknown = set(labels_by_image) - set(true_masks)
    if unknown:
        raise ValueError(f"true labels for images without true mask: {sorted(map(str, unknown))[:5]}")

    per_class_scores: list[list[np.ndarray]] = [[] for _ in range(n_classes)]
    per_class_tp: list[list[np.ndarray]] = [[] for _ in range(n_classes)]
    n_gt = np.zeros(n_classes, dtype=np.int64)
    for image_id, true_mask in true_masks.items():
        true_mask = np.asarray(true_mask)
        true_ids = _present_ids(true_mask)
        truth = _true_classes(true_ids, labels_by_image.get(image_id), n_classes, image_id)
        n_gt += truth.sum(0)
        rows = scores_by_image.get(image_id)
        if rows is None or len(rows) == 0:
            continue
        cells = rows["cell_id"].to_numpy(np.int64)
        probs = rows[score_columns].to_numpy(np.float64)
        iou, _ = _iou_rows(pred_masks[image_id], true_mask, cells)  # once per image, columns = true_ids
        for c in range(n_classes):
            per_class_scores[c].append(probs[:, c])
            per_class_tp[c].append(image_true_positives(probs[:, c], iou[:, truth[:, c]], iou_threshold))

    ap = np.full(n_classes, np.nan)
    n_tp = np.zeros(n_classes, dtype=np.int64)
    for c in range(n_classes):
        scores = np.concatenate(per_class_scores[c]) if per_class_scores[c] else np.zeros(0)
        tp = np.concatenate(per_class_tp[c]) if per_class_tp[c] else np.zeros(0, dtype=bool)
        n_tp[c] = int(tp.sum())
        ap[c] = open_images_ap(scores, tp, int(n_gt[c]))
    return {
        "map": float(np.nanmean(ap)) if np.isfinite(ap).any() else float("nan"),
        "ap": ap,
        "n_gt": n_gt,
        "n_tp": n_tp,
        "n_predictions": len(pred_scores),
        "n_images": len(true_masks),
    }
