"""Instance-segmentation quality: one-to-one matching of predicted and true instances by IoU.

The HPA 2021 metric counts a predicted cell as a true positive when its mask overlaps a ground-truth cell
with IoU >= 0.6; segmentation benchmarks also report F1 at IoU >= 0.5 (the DSB 2018 / StarDist habit).
Both come from one contingency table, computed once per image pair with ``np.bincount``.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from scipy.optimize import linear_sum_assignment

# Above this many (pred label x true label) cells the dense table would be too big: labels are compacted
# first with np.unique (a sort of every pixel, slower but bounded by the number of present labels).
_MAX_DENSE_TABLE = 20_000_000


def _compact(labels: np.ndarray) -> np.ndarray:
    """Relabel so that present labels become 1..n (0 stays background); returns a flat int64 array."""
    values, inverse = np.unique(labels.ravel(), return_inverse=True)
    if values[0] != 0:  # no background pixel: shift so that label 0 stays unused
        inverse = inverse + 1
    return inverse.astype(np.int64)


def iou_table(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """IoU of every present predicted instance (rows) with every present true instance (columns).

    ``pred`` and ``true`` are label images of one shape, 0 = background. Returns a float64 array
    ``(n_pred, n_true)`` over the labels that occur (empty rows / columns of absent labels are dropped).
    """
    if pred.shape != true.shape:
        raise ValueError(f"pred and true masks differ in shape: {pred.shape} vs {true.shape}")
    if pred.size and (pred.min() < 0 or true.min() < 0):
        raise ValueError("instance labels must be non-negative (0 = background)")
    flat_pred = pred.ravel().astype(np.int64)
    flat_true = true.ravel().astype(np.int64)
    n_pred = int(flat_pred.max(initial=0)) + 1
    n_true = int(flat_true.max(initial=0)) + 1
    if n_pred * n_true > _MAX_DENSE_TABLE:
        flat_pred, flat_true = _compact(flat_pred), _compact(flat_true)
        n_pred, n_true = int(flat_pred.max(initial=0)) + 1, int(flat_true.max(initial=0)) + 1
    # (n_pred, n_true) pixel counts of every (pred label, true label) pair, background row/column included.
    counts = np.bincount(flat_pred * n_true + flat_true, minlength=n_pred * n_true).reshape(n_pred, n_true)
    area_pred = counts.sum(axis=1)[1:]
    area_true = counts.sum(axis=0)[1:]
    intersection = counts[1:, 1:].astype(np.float64)
    union = area_pred[:, None] + area_true[None, :] - intersection
    iou = np.divide(intersection, union, out=np.zeros_like(intersection), where=union > 0)
    return iou[area_pred > 0][:, area_true > 0]


def _match_table(iou: np.ndarray, iou_threshold: float) -> dict[str, float]:
    """Score one IoU table at one threshold (one-to-one matching that maximises the summed IoU)."""
    n_pred, n_true = iou.shape
    if n_pred and n_true:
        # Hungarian assignment on the pairs that qualify; at thresholds > 0.5 it equals the unique matching,
        # below 0.5 it resolves the ties a greedy matching would get wrong.
        eligible = np.where(iou >= iou_threshold, iou, 0.0)
        rows, cols = linear_sum_assignment(eligible, maximize=True)
        matched = eligible[rows, cols]
        matched = matched[matched > 0]
    else:
        matched = np.zeros(0)
    tp = int(matched.size)
    fp, fn = n_pred - tp, n_true - tp
    if n_pred == 0 and n_true == 0:
        precision = recall = f1 = 1.0  # nothing to find and nothing found: perfect, not undefined
    else:
        precision = tp / n_pred if n_pred else 0.0
        recall = tp / n_true if n_true else 0.0
        f1 = 2 * tp / (2 * tp + fp + fn)
    return {
        "iou_threshold": float(iou_threshold),
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "mean_iou": float(matched.mean()) if tp else float("nan"),
        "n_pred": n_pred,
        "n_true": n_true,
    }


def match_instances(pred: np.ndarray, true: np.ndarray, iou_threshold: float = 0.5) -> dict[str, float]:
    """Match predicted to true instances one-to-one at ``IoU >= iou_threshold``.

    Returns ``tp, fp, fn, precision, recall, f1, mean_iou`` (mean IoU of the matched pairs; NaN when none
    match), plus ``n_pred, n_true`` and the threshold. Two empty masks score F1 = 1.
    """
    return _match_table(iou_table(pred, true), iou_threshold)


def match_at_thresholds(
    pred: np.ndarray, true: np.ndarray, thresholds: Iterable[float] = (0.5, 0.6, 0.7, 0.8, 0.9)
) -> list[dict[str, float]]:
    """``match_instances`` at several IoU thresholds, computing the contingency table once."""
    iou = iou_table(pred, true)
    return [_match_table(iou, threshold) for threshold in thresholds]
