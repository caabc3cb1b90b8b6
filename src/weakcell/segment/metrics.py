"""Instance-segmentation quality: one-to-one matching of predicted and true instances by IoU.

The HPA 2021 metric counts a predicted cell as a true positive when its mask overlaps a ground-truth cell
with IoU >= 0.6; segmentation benchmarks also report F1 at IoU >= 0.5 (the DSB 2018 / StarDist habit).
Both come from one IoU table (``competition_metric.label_iou``), computed once per image pair.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from scipy.optimize import linear_sum_assignment

from weakcell.competition_metric import label_iou


def iou_table(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """IoU of every present predicted instance (rows) with every present true instance (columns).

    ``pred`` and ``true`` are label images of one shape, 0 = background. Returns a float64 array
    ``(n_pred, n_true)`` over the labels that occur: the kit's one IoU routine,
    ``competition_metric.label_iou``.
    """
    if pred.size and (pred.min() < 0 or true.min() < 0):
        raise ValueError("instance labels must be non-negative (0 = background)")
    return label_iou(pred, true)[2]


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
