"""Classification metrics on image and cell level, shared by training, thresholds, evaluation and ablations.

Conventions: ``y_true`` is a ``(N, C)`` 0/1 matrix, ``scores`` a ``(N, C)`` float matrix (probabilities or
logits; only their order matters for AP). Macro averages run over the classes that have at least one
positive in ``y_true`` — a class absent from a fold says nothing about the model.
"""

from __future__ import annotations

import numpy as np


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """Probabilities from logits, in float64 (predictions come back from the engine as float32)."""
    return 1.0 / (1.0 + np.exp(-np.asarray(logits, dtype=np.float64)))


def average_precision(y_true: np.ndarray, scores: np.ndarray, n_missed: int = 0) -> float:
    """Non-interpolated AP of one class: mean precision at the rank of each positive.

    ``n_missed`` positives can never be retrieved (e.g. true cells that segmentation did not find): they
    count in the denominator, so they lower AP exactly as they lower recall in the competition metric.
    Returns NaN when there is no positive at all.
    """
    y_true = np.asarray(y_true).astype(bool).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    n_positives = int(y_true.sum()) + n_missed
    if n_positives == 0:
        return float("nan")
    order = np.argsort(-scores, kind="stable")
    hits = y_true[order]
    # ties: sklearn-style step function would group them; stable order is close enough at float scores
    precision_at_hit = np.cumsum(hits)[hits] / (np.flatnonzero(hits) + 1)
    return float(precision_at_hit.sum() / n_positives)


def per_class_ap(y_true: np.ndarray, scores: np.ndarray, n_missed: np.ndarray | None = None) -> np.ndarray:
    """``(C,)`` AP per class (NaN where a class has no positive)."""
    n_classes = y_true.shape[1]
    missed = np.zeros(n_classes, dtype=np.int64) if n_missed is None else np.asarray(n_missed)
    return np.array([average_precision(y_true[:, c], scores[:, c], int(missed[c])) for c in range(n_classes)])


def mean_average_precision(
    y_true: np.ndarray, scores: np.ndarray, n_missed: np.ndarray | None = None
) -> float:
    """mAP over the classes with at least one positive."""
    ap = per_class_ap(y_true, scores, n_missed)
    return float(np.nanmean(ap)) if np.isfinite(ap).any() else float("nan")


def predicted_classes(probs: np.ndarray, thresholds: np.ndarray | float) -> np.ndarray:
    """The kit's one threshold rule: class c is predicted when its probability is at least its threshold
    (``probs >= thresholds``), so tuning, evaluation and ``image_level.csv`` agree at the threshold itself.
    probs: (N, C); thresholds: (C,) or a scalar. Returns (N, C) bool."""
    return np.asarray(probs) >= np.asarray(thresholds)


def f1_per_class(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """``(C,)`` F1 per class from 0/1 matrices (0 where a class has neither positives nor predictions)."""
    y_true = np.asarray(y_true).astype(bool)
    y_pred = np.asarray(y_pred).astype(bool)
    tp = (y_true & y_pred).sum(0)
    fp = (~y_true & y_pred).sum(0)
    fn = (y_true & ~y_pred).sum(0)
    denominator = 2 * tp + fp + fn
    return np.divide(2 * tp, denominator, out=np.zeros(len(tp), dtype=np.float64), where=denominator > 0)


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Macro F1 over the classes with at least one positive."""
    present = np.asarray(y_true).sum(0) > 0
    return float(f1_per_class(y_true, y_pred)[present].mean()) if present.any() else float("nan")


def expected_calibration_error(y_true: np.ndarray, probs: np.ndarray, bins: int = 10) -> float:
    """Mean |share of positives - mean probability| over equal-width probability bins, weighted by the
    pairs in each bin, over every (image, class) pair: how far image probabilities are from frequencies."""
    p, y = np.asarray(probs, dtype=np.float64).ravel(), np.asarray(y_true, dtype=np.float64).ravel()
    which = np.minimum((p * bins).astype(int), bins - 1)
    error = 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            error += inside.sum() * abs(y[inside].mean() - p[inside].mean())
    return float(error / len(p))
