"""The HPA Single Cell Classification (2021) metric, as its organisers computed it.

The organisers scored submissions with the Open Images Challenge instance-segmentation evaluation of
``tensorflow/models`` ``research/object_detection`` at IoU >= 0.6 (sources, semantics and hand-derived
cases: ``../shared/reference/hpa2021-metric.md``). This module is that evaluation, nothing more:

- **verified labels** (``verified="image"``, the default): class c is judged only in images that have a
  true cell of class c (the organisers' ground truth makes an image's verified labels exactly the classes
  of its cells); a prediction of c elsewhere is ignored, neither true nor false positive.
  ``verified="all"`` judges every class in every image, the stricter reading kept for comparison;
- **empty masks are dropped** before matching (an empty mask's box is invalid, and the evaluator removes
  invalid boxes), so the sample submission's placeholder ``0 1 <empty mask>`` costs nothing;
- **matching**, per image and class: detections in descending confidence; each takes the true cell of
  that class it overlaps most (argmax IoU) when IoU >= 0.6 and that cell is not taken yet, otherwise it is
  a false positive (a second detection of a matched cell is one). IoU is computed in float64 here
  (the reference uses float32; the two agree on ``>= 0.6`` for any union under 8 million pixels);
- **AP** per class over all images' detections ranked by confidence: precision made non-increasing from
  the right, summed over the recall steps (``open_images_ap``); true cells never matched lower recall;
  a class with no true cell anywhere is left out of the mean;
- **images**: truth images without predictions predict nothing; predictions for images absent from the
  truth are ignored, as the organisers' driver only visits ground-truth images;
- **ties**: the reference ranks equal confidences in numpy's (arbitrary) argsort order; here ties keep
  input order. A submission should carry no ties it does not mean: ``n_ties`` counts them.

The engine (``score_images``) takes, per image, the true cells (``TrueCells``) and the detections
(``Detections``: class, confidence and IoU with every true cell, per detection; a submission file's as
sparse rows holding only the cells each mask overlaps, so memory follows the overlaps, not detections x
true cells). Every IoU is ``overlap_iou`` of pixel counts. Two adapters build detections:
``label_image_detections`` (a label image + one probability per cell and class, what the pipeline holds;
``table_detections`` when the label image's IoU table is computed already, as out-of-fold scoring keeps it
between epochs) and ``file_detections`` (the rows of a ``cell_level.csv``, any file Kaggle accepts:
overlapping masks, a mask predicted twice for one class, extra images). ``competition_map`` and
``score_submission`` are the two entry points; every cell-level score the kit prints or records comes
through ``match_images``.

Over 400 lines on purpose: this file is meant to be read side by side with the reference evaluator (its
matching, AP and verified-label rules) and the two adapters that feed it; the engine and its adapters share
the ``TrueCells`` / ``Detections`` contract, and splitting them would hide that contract across files.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import sparse

from weakcell.constants import READINGS, Verified, prob_columns
from weakcell.errors import StageError

IOU_THRESHOLD = 0.6


# -- overlaps -------------------------------------------------------------------------------------------


def overlap_iou(inter: np.ndarray, area_a: np.ndarray | int, area_b: np.ndarray | int) -> np.ndarray:
    """IoU from pixel counts (broadcast): ``inter / (area_a + area_b - inter)``, 0 where the union is empty.
    The one IoU of the kit: label images (``label_iou``) and decoded file masks (``mask_overlaps``) both
    only count the pixels they share."""
    return inter / np.maximum(area_a + area_b - inter, 1)


def label_iou(pred: np.ndarray, true: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """IoU of every present pred label with every present true label: ``(pred_ids, true_ids, iou)``
    with ``iou`` of shape ``(len(pred_ids), len(true_ids))``, background (0) left out; ids sorted.

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
    iou = overlap_iou(inter, pred_area[keep_pred][:, None], true_area[keep_true][None, :])
    return pred_ids[keep_pred], true_ids[keep_true], iou


# -- the evaluator ------------------------------------------------------------------------------------


def image_true_positives(
    scores: np.ndarray, iou: np.ndarray, iou_threshold: float = IOU_THRESHOLD
) -> np.ndarray:
    """TP flags (in input order) of one image's detections of one class.

    scores: ``(n,)`` confidences; iou: ``(n, g)`` IoU of each detection with each true cell of the class
    in this image, an array or a sparse matrix (absent entries: no overlap). Greedy in descending
    confidence with the argmax rule (module doc).
    """
    scores = np.asarray(scores, dtype=np.float64).ravel()
    n = len(scores)
    tp = np.zeros(n, dtype=bool)
    if not sparse.issparse(iou):
        iou = np.asarray(iou, dtype=np.float64).reshape(n, -1)
    if n == 0 or iou.shape[1] == 0:
        return tp
    best, overlap = best_true_cells(iou)
    order = np.argsort(-scores, kind="stable")
    # a valid detection takes its best true cell unless an earlier-ranked valid detection took it
    ranks = np.flatnonzero(overlap[order] >= iou_threshold)
    _, first = np.unique(best[order][ranks], return_index=True)
    tp[order[ranks[first]]] = True
    return tp


def best_true_cells(iou: np.ndarray | sparse.sparray) -> tuple[np.ndarray, np.ndarray]:
    """Per detection (row of ``iou`` ``(n, g)``, g > 0): the column of its largest IoU, the first on ties as
    ``argmax`` takes it, and that IoU. A sparse row without entries overlaps nothing: column 0, IoU 0, as
    ``argmax`` of a row of zeros."""
    if not sparse.issparse(iou):
        best = iou.argmax(1)
        return best, iou[np.arange(len(iou)), best]
    entries = sparse.coo_array(iou)
    rows, columns, values = entries.row, entries.col, entries.data
    order = np.lexsort((columns, -values, rows))  # per row: the largest IoU, then the lowest column
    present, first = np.unique(rows[order], return_index=True)
    best = np.zeros(iou.shape[0], dtype=np.int64)
    overlap = np.zeros(iou.shape[0], dtype=np.float64)
    best[present], overlap[present] = columns[order][first], values[order][first]
    return best, overlap


def open_images_ap(scores: np.ndarray, tp: np.ndarray, n_gt: int) -> float:
    """AP of one class from all its detections (any image order) and the number of true cells.

    NaN when ``n_gt == 0``; 0 when there are true cells but no detection.
    """
    scores = np.asarray(scores, dtype=np.float64).ravel()
    tp = np.asarray(tp, dtype=bool).ravel()
    return ranked_ap(tp[np.argsort(-scores, kind="stable")], n_gt)


def ranked_ap(hits: np.ndarray, n_gt: int) -> float:
    """``open_images_ap`` of detections already in ranking order (descending confidence, ties in input
    order): ``hits`` their TP flags."""
    if n_gt <= 0:
        return float("nan")
    if len(hits) == 0:
        return 0.0
    cum_tp = np.cumsum(hits)
    precision = cum_tp / np.arange(1, len(hits) + 1)
    recall = cum_tp / n_gt
    recall = np.concatenate([[0.0], recall, [1.0]])
    precision = np.concatenate([[0.0], precision, [0.0]])
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    steps = np.flatnonzero(recall[1:] != recall[:-1]) + 1
    return float(np.sum((recall[steps] - recall[steps - 1]) * precision[steps]))


@dataclass(frozen=True)
class TrueCells:
    """One image's truth: the label image, its present cell ids ``(g,)`` (sorted) and their classes
    ``(g, C)`` bool. Columns of every IoU table of the image follow ``ids``. ``mask`` is None once the
    IoU tables that need it are computed (``without_mask``: out-of-fold scoring keeps no label image)."""

    mask: np.ndarray | None
    ids: np.ndarray
    classes: np.ndarray

    def without_mask(self) -> TrueCells:
        """The same truth without its label image (matching needs only ``ids`` and ``classes``)."""
        return TrueCells(mask=None, ids=self.ids, classes=self.classes)

    @property
    def label_image(self) -> np.ndarray:
        """``mask``; raises when it was dropped."""
        if self.mask is None:
            raise ValueError("this truth kept no label image (TrueCells.without_mask)")
        return self.mask

    @property
    def verified(self) -> np.ndarray:
        """``(C,)`` the classes judged in this image under the organisers' reading: those of its cells."""
        return np.asarray(self.classes.any(0))


@dataclass(frozen=True)
class Detections:
    """One image's detections, one entry each: ``classes`` ``(k,)`` int, ``scores`` ``(k,)`` float,
    ``iou`` ``(k, g)`` with the image's true cells (an array, or a sparse CSR matrix of the overlaps alone),
    ``empty`` ``(k,)`` True where the mask has no pixel."""

    classes: np.ndarray
    scores: np.ndarray
    iou: np.ndarray | sparse.csr_array
    empty: np.ndarray

    @staticmethod
    def of_masks(
        classes: np.ndarray,
        scores: np.ndarray,
        mask_index: np.ndarray,
        mask_iou: np.ndarray,
        mask_empty: np.ndarray,
    ) -> Detections:
        """Detections that refer to distinct masks: ``mask_index`` ``(k,)`` picks rows of ``mask_iou``
        ``(m, g)`` (an array or a sparse CSR matrix) and of ``mask_empty`` ``(m,)``."""
        mask_index = np.asarray(mask_index, dtype=np.int64)
        iou = (
            sparse.csr_array(mask_iou)[mask_index]
            if sparse.issparse(mask_iou)
            else np.asarray(mask_iou, dtype=np.float64)[mask_index]
        )
        return Detections(
            classes=np.asarray(classes, dtype=np.int64),
            scores=np.asarray(scores, dtype=np.float64),
            iou=iou,
            empty=np.asarray(mask_empty, dtype=bool)[mask_index],
        )


@dataclass(frozen=True)
class Matched:
    """Every judged detection of a set of images, matched per image: per class, the detections'
    ``scores``, TP ``hits`` and ``image`` (position in the truth's order), and ``n_gt`` ``(images, C)``
    true cells per image and class; ``image_ids`` the truth's images in that order. Matching is per image,
    so any multiset of the images (a bootstrap resample) is scored from this without matching again."""

    scores: list[np.ndarray]
    hits: list[np.ndarray]
    image: list[np.ndarray]
    n_gt: np.ndarray
    ignored: dict[str, int]
    image_ids: tuple[Any, ...] = ()

    @cached_property
    def ranked(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per class, the detections' TP flags and images in ranking order (descending confidence, ties
        in input order): sorted once, every resample reuses it."""
        ranked = []
        for scores, hits, image in zip(self.scores, self.hits, self.image):
            order = np.argsort(-scores, kind="stable")
            ranked.append((hits[order], image[order]))
        return ranked

    def ap(self, weights: np.ndarray | None = None) -> np.ndarray:
        """``(C,)`` AP per class (NaN: no true cell), each image counted ``weights[i]`` times (default
        once; a resample's counts). Copies of a detection have equal scores and sit side by side in the
        ranking, as the reference ranks the detections of repeated images."""
        n_classes = self.n_gt.shape[1]
        if weights is None:
            n_gt = self.n_gt.sum(0)
            return np.array(
                [open_images_ap(self.scores[c], self.hits[c], int(n_gt[c])) for c in range(n_classes)]
            )
        n_gt = weights @ self.n_gt
        ap = np.full(n_classes, np.nan)
        for c in range(n_classes):
            hits, image = self.ranked[c]
            ap[c] = ranked_ap(np.repeat(hits, weights[image]), int(n_gt[c]))
        return ap


def match_images(
    detections: Mapping[Any, Detections],
    truth: Mapping[Any, TrueCells],
    n_classes: int,
    verified: Verified = "image",
    iou_threshold: float = IOU_THRESHOLD,
) -> Matched:
    """The detections of every truth image matched to its true cells under the ``verified`` reading."""
    if verified not in READINGS:
        raise ValueError(f"verified must be one of {READINGS}, got {verified!r}")
    scores: list[list[np.ndarray]] = [[] for _ in range(n_classes)]
    hits: list[list[np.ndarray]] = [[] for _ in range(n_classes)]
    images: list[list[np.ndarray]] = [[] for _ in range(n_classes)]
    n_gt = np.zeros((len(truth), n_classes), dtype=np.int64)
    ignored = {"empty": 0, "unverified": 0, "other_images": 0}
    for position, (image_id, cells) in enumerate(truth.items()):
        n_gt[position] = cells.classes.sum(0)
        found = detections.get(image_id)
        if found is None or len(found.classes) == 0:
            continue
        if found.classes.min() < 0 or found.classes.max() >= n_classes:
            raise ValueError(f"image {image_id}: a detection's class is not in 0..{n_classes - 1}")
        judged = cells.verified[found.classes] if verified == "image" else np.ones(len(found.classes), bool)
        ignored["empty"] += int(found.empty.sum())
        ignored["unverified"] += int((~found.empty & ~judged).sum())
        keep = judged & ~found.empty
        for c in np.unique(found.classes[keep]):
            rows = keep & (found.classes == c)
            scores[c].append(found.scores[rows])
            hits[c].append(
                image_true_positives(
                    found.scores[rows], found.iou[rows][:, cells.classes[:, c]], iou_threshold
                )
            )
            images[c].append(np.full(int(rows.sum()), position))
    for image_id in set(detections) - set(truth):
        ignored["other_images"] += len(detections[image_id].classes)

    def joined(parts: list[np.ndarray], dtype: type) -> np.ndarray:
        return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)

    return Matched(
        scores=[joined(p, np.float64) for p in scores],
        hits=[joined(p, bool) for p in hits],
        image=[joined(p, np.int64) for p in images],
        n_gt=n_gt,
        ignored=ignored,
        image_ids=tuple(truth),
    )


def score_images(
    detections: Mapping[Any, Detections],
    truth: Mapping[Any, TrueCells],
    n_classes: int,
    verified: Verified = "image",
    iou_threshold: float = IOU_THRESHOLD,
) -> dict:
    """The competition mAP of ``detections`` against ``truth`` (both keyed by image id).

    Returns ``map`` (mean over classes with a true cell), ``ap`` ``(C,)`` (NaN where no true cell),
    ``n_gt`` and ``n_tp`` ``(C,)``, ``n_predictions`` (detections scored), ``ignored`` (detections left
    out: ``empty`` masks, ``unverified`` classes, ``other_images`` absent from the truth), ``n_ties``
    (scored detections whose class and confidence equal an earlier one's), ``n_images`` and ``verified``.
    """
    return summarise(match_images(detections, truth, n_classes, verified, iou_threshold), verified)


def summarise(matched: Matched, verified: Verified) -> dict:
    """``score_images``'s dict of matched detections."""
    ap = matched.ap()
    return {
        "map": mean_ap(ap),
        "ap": ap,
        "n_gt": matched.n_gt.sum(0),
        "n_tp": np.array([int(h.sum()) for h in matched.hits], dtype=np.int64),
        "n_predictions": sum(len(s) for s in matched.scores),
        "ignored": matched.ignored,
        "n_ties": sum(len(s) - len(np.unique(s)) for s in matched.scores),
        "n_images": len(matched.n_gt),
        "verified": verified,
    }


def mean_ap(ap: np.ndarray) -> float:
    """The mean over classes with a true cell (NaN when none has one)."""
    return float(np.nanmean(ap)) if np.isfinite(ap).any() else float("nan")


def resamples(n_images: int, n_resamples: int, seed: int = 0) -> Iterator[np.ndarray]:
    """``n_resamples`` bootstrap resamples of ``n_images`` images, each as ``(n_images,)`` counts (how
    often each image is drawn); the same seed draws the same resamples."""
    rng = np.random.default_rng(seed)
    for _ in range(n_resamples):
        yield np.bincount(rng.integers(0, n_images, n_images), minlength=n_images)


def _percentiles(values: list[float], level: float) -> tuple[float, float]:
    tail = (1 - level) / 2
    low, high = np.nanquantile(values, [tail, 1 - tail])
    return float(low), float(high)


def bootstrap_maps(matched: Matched, n_resamples: int = 500, seed: int = 0) -> np.ndarray:
    """``(n_resamples,)`` mAP of each resample of the images (``resamples``): the bootstrap distribution.
    Two submissions for the same test images (matched against the same truth, in the same image order) get
    the same resamples from the same seed, so their distributions subtract element by element into the
    distribution of their difference (``paired_interval``, ``weakcell.ablate``'s paired rows)."""
    counts = resamples(len(matched.n_gt), n_resamples, seed)
    return np.array([mean_ap(matched.ap(weights)) for weights in counts], dtype=np.float64)


def percentile_interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The central ``level`` percentile interval of a bootstrap distribution."""
    return _percentiles(list(values), level)


def bootstrap_interval(
    matched: Matched, n_resamples: int = 500, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile interval of the mAP over ``n_resamples`` resamples of the images with replacement:
    how far the score of a test split this size moves with the images drawn."""
    return percentile_interval(bootstrap_maps(matched, n_resamples, seed), level)


def paired_interval(
    first: Matched, second: Matched, n_resamples: int = 500, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile interval of mAP(``first``) - mAP(``second``) over resamples of the images, both scored
    on the same resample each time: two submissions for the same test images (matched against the same
    truth, in the same image order), so what the images drawn do to both cancels out of the difference."""
    if first.image_ids != second.image_ids or not np.array_equal(first.n_gt, second.n_gt):
        raise ValueError("paired_interval needs two submissions matched against the same truth images")
    difference = bootstrap_maps(first, n_resamples, seed) - bootstrap_maps(second, n_resamples, seed)
    return percentile_interval(difference, level)


# -- truth ---------------------------------------------------------------------------------------------


def _present_ids(mask: np.ndarray) -> np.ndarray:
    """Sorted non-zero labels of a label image."""
    mask = np.asarray(mask)
    if mask.size and mask.min() >= 0 and mask.max() <= 4 * mask.size:
        return np.flatnonzero(np.bincount(mask.ravel().astype(np.int64))[1:]) + 1
    ids = np.unique(mask)
    return ids[ids != 0]


def true_cells(mask: np.ndarray, labels: pd.DataFrame | None, n_classes: int, image_id: Any) -> TrueCells:
    """``TrueCells`` of one image from its label image and its rows ``cell_id, labels`` (class int lists;
    cells of the mask without a row belong to no class). Raises when a row names a cell absent from the
    mask, a class out of range, or a cell twice."""
    mask = np.asarray(mask)
    ids = _present_ids(mask)
    hot = np.zeros((len(ids), n_classes), dtype=bool)
    if labels is not None and len(labels):
        cells = labels["cell_id"].to_numpy(np.int64)
        twice = pd.Index(cells)[pd.Index(cells).duplicated()]
        if len(twice):
            raise StageError(f"image {image_id}: true cells {sorted(set(twice.tolist()))} are listed twice")
        where = np.searchsorted(ids, cells)
        ok = (
            (where < len(ids)) & (ids[np.minimum(where, max(len(ids) - 1, 0))] == cells)
            if len(ids)
            else ~np.ones(len(cells), bool)
        )
        if not ok.all():
            raise StageError(
                f"image {image_id}: labelled true cells {cells[~ok].tolist()} are not in its true mask"
            )
        for row, cell_labels in zip(where, labels["labels"]):
            classes = np.asarray(list(cell_labels), dtype=np.int64)
            if classes.size and (classes.min() < 0 or classes.max() >= n_classes):
                raise StageError(
                    f"image {image_id}: class out of range 0..{n_classes - 1} in {list(cell_labels)}"
                )
            hot[row, classes] = True
    return TrueCells(mask=mask, ids=ids, classes=hot)


def truth_by_image(
    true_masks: Mapping[Any, np.ndarray], true_labels: pd.DataFrame, n_classes: int
) -> dict[Any, TrueCells]:
    """``TrueCells`` of every image of ``true_masks``; ``true_labels``: ``image_id, cell_id, labels``."""
    by_image = dict(tuple(true_labels.groupby("image_id", sort=False)))
    unknown = set(by_image) - set(true_masks)
    if unknown:
        raise StageError(f"true labels for images without true mask: {sorted(map(str, unknown))[:5]}")
    return {
        image_id: true_cells(mask, by_image.get(image_id), n_classes, image_id)
        for image_id, mask in true_masks.items()
    }


# -- detections from a label image ---------------------------------------------------------------------


def label_image_detections(
    pred_mask: np.ndarray, cell_ids: np.ndarray, probs: np.ndarray, cells: TrueCells
) -> Detections:
    """Every (cell, class) pair with a finite probability in ``probs`` ``(n, C)`` (rows: ``cell_ids``;
    NaN = not predicted) as a detection of that cell's region of ``pred_mask``; a cell absent from the
    mask is an empty mask."""
    pred_ids, _, iou = label_iou(pred_mask, cells.label_image)  # columns: the present labels = cells.ids
    return table_detections(pred_ids, iou, cell_ids, probs)


def table_detections(
    pred_ids: np.ndarray, iou: np.ndarray, cell_ids: np.ndarray, probs: np.ndarray
) -> Detections:
    """``label_image_detections`` from the label image's IoU table: ``pred_ids`` ``(m,)`` its present
    cells (sorted), ``iou`` ``(m, g)`` with the image's true cells."""
    cell_ids = np.asarray(cell_ids, dtype=np.int64)
    iou = np.asarray(iou, dtype=np.float64).reshape(len(pred_ids), -1)
    where = np.searchsorted(pred_ids, cell_ids)
    present = (where < len(pred_ids)) & (pred_ids[np.minimum(where, max(len(pred_ids) - 1, 0))] == cell_ids)
    rows = np.zeros((len(cell_ids), iou.shape[1]))
    rows[present] = iou[where[present]]
    cell_of, class_of = np.nonzero(np.isfinite(probs))
    return Detections.of_masks(class_of, probs[cell_of, class_of], cell_of, rows, ~present)


Found = tuple[dict[Any, Detections], int]  # detections per truth image, predictions of other images


def label_detections(
    pred_masks: Mapping[Any, np.ndarray],
    pred_scores: pd.DataFrame,
    truth: Mapping[Any, TrueCells],
    n_classes: int,
) -> Found:
    """``label_image_detections`` of every image of ``pred_scores`` (``image_id, cell_id,
    p_0..p_{C-1}``) that is in ``truth``, and how many (cell, class) predictions other images hold."""
    columns = prob_columns(n_classes)
    missing = [c for c in ["image_id", "cell_id", *columns] if c not in pred_scores.columns]
    if missing:
        raise ValueError(f"pred_scores lacks columns {missing}")
    unknown = set(pred_scores["image_id"]) - set(pred_masks)
    if unknown:
        raise ValueError(f"predictions for images without predicted mask: {sorted(map(str, unknown))[:5]}")
    probs = pred_scores[columns].to_numpy(np.float64)  # one conversion: per-image pandas slicing is slow
    cell_ids = pred_scores["cell_id"].to_numpy(np.int64)
    detections = {
        image_id: label_image_detections(pred_masks[image_id], cell_ids[rows], probs[rows], truth[image_id])
        for image_id, rows in pred_scores.groupby("image_id", sort=False).indices.items()
        if image_id in truth
    }
    elsewhere = pred_scores[~pred_scores["image_id"].isin(list(truth))]
    return detections, int(np.isfinite(elsewhere[columns].to_numpy(np.float64)).sum())


def score_found(
    found: Found,
    truth: Mapping[Any, TrueCells],
    n_classes: int,
    verified: Verified = "image",
    iou_threshold: float = IOU_THRESHOLD,
    bootstrap: int = 0,
) -> dict:
    """``score_images`` of ``label_detections`` or ``submission_detections`` output, the predictions of
    images absent from the truth counted as ignored. Detections are built once and scored under any
    number of readings. ``bootstrap`` > 0 adds ``resampled``, the mAP of that many resamples of the images
    (``bootstrap_maps``: the same resamples for any submission of the same images), ``interval``, its
    95% percentile interval, and ``resamples_key`` (``resamples_key``)."""
    detections, other = found
    matched = match_images(detections, truth, n_classes, verified, iou_threshold)
    result = summarise(matched, verified)
    result["ignored"]["other_images"] += other
    if bootstrap:
        result["resampled"] = bootstrap_maps(matched, bootstrap)
        result["interval"] = percentile_interval(result["resampled"])
        result["resamples_key"] = resamples_key(matched.image_ids, bootstrap)
    return result


def resamples_key(image_ids: tuple[Any, ...], n_resamples: int, seed: int = 0) -> str:
    """What a set of bootstrap resamples is drawn for (the images in order, their number, the seed): equal
    keys, equal resamples (``resamples`` is a function of these alone), so two results' ``resampled``
    subtract into their paired difference only when their keys are equal."""
    text = "\n".join(map(str, image_ids)) + f"\n{n_resamples}\n{seed}"
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def competition_map(
    pred_masks: Mapping[Any, np.ndarray],
    pred_scores: pd.DataFrame,
    true_masks: Mapping[Any, np.ndarray],
    true_labels: pd.DataFrame,
    n_classes: int,
    iou_threshold: float = IOU_THRESHOLD,
    verified: Verified = "image",
) -> dict:
    """The competition mAP of cell predictions held as label images and a probability table.

    pred_masks / true_masks: ``image_id -> (H, W)`` int label image (0 = background);
    pred_scores: ``image_id, cell_id, p_0..p_{C-1}``, one row per predicted cell, each (cell, class)
    with a finite probability a detection (NaN: no prediction, as a file written with a minimum score);
    true_labels: ``image_id, cell_id, labels`` (class int lists). Returns ``score_images``'s dict.
    """
    truth = truth_by_image(true_masks, true_labels, n_classes)
    found = label_detections(pred_masks, pred_scores, truth, n_classes)
    return score_found(found, truth, n_classes, verified, iou_threshold)


# -- detections from a submission file -----------------------------------------------------------------


def mask_overlaps(pixels: np.ndarray, labels_f: np.ndarray, areas: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """IoU ``(len(ids),)`` of one mask, given as column-major pixel indices, with the cells ``ids`` of a
    label image raveled column-major (``labels_f``) whose pixel counts per label are ``areas``."""
    inter = np.bincount(labels_f[pixels], minlength=len(areas))[ids]
    return overlap_iou(inter, len(pixels), areas[ids])


def sparse_overlaps(
    pixels: np.ndarray, labels_f: np.ndarray, areas: np.ndarray, ids: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """``mask_overlaps`` as ``(columns, iou)``: the positions in ``ids`` (sorted) of the cells the mask
    overlaps, and their IoU; the other cells' IoU is 0. Work and memory grow with the mask's pixels."""
    labels, inter = np.unique(labels_f[pixels], return_counts=True)
    inside = labels != 0
    labels, inter = labels[inside], inter[inside]
    columns = np.searchsorted(ids, labels)  # every non-zero label of a truth mask is one of its ids
    return columns, overlap_iou(inter, len(pixels), areas[labels])


def file_detections(
    predictions: Iterable[tuple[str, str, str]], height: int, width: int, cells: TrueCells, where: str
) -> Detections:
    """Detections of one submission row: ``predictions`` are its ``(label, confidence, mask)`` token
    triples; each distinct mask is decoded once (``rle.mask_pixels``) and overlapped with the true
    cells, keeping only the cells it touches (sparse rows). ``where`` names the row in errors."""
    from weakcell.rle import mask_pixels

    mask = cells.label_image
    if mask.shape != (height, width):
        raise ValueError(
            f"{where}: ImageHeight x ImageWidth {height}x{width} differs from the true mask's "
            f"{mask.shape[0]}x{mask.shape[1]}"
        )
    labels_f = mask.ravel(order="F").astype(np.int64)
    areas = np.bincount(labels_f)
    masks: dict[str, int] = {}
    classes, scores, mask_index, mask_empty = [], [], [], []
    columns, overlaps = [], []  # per distinct mask: the true cells it overlaps (positions in ids), IoU
    for k, (label, confidence, text) in enumerate(predictions):
        try:
            classes.append(int(label))
            scores.append(float(confidence))
        except ValueError:
            raise ValueError(
                f"{where}, prediction {k}: {label!r} {confidence!r} is not a class and a confidence"
            ) from None
        if not np.isfinite(scores[-1]):
            raise ValueError(f"{where}, prediction {k}: confidence {confidence!r} is not finite")
        if text not in masks:
            try:
                pixels = mask_pixels(text, height, width)
            except ValueError as err:
                raise ValueError(f"{where}, prediction {k}: {err}") from None
            masks[text] = len(masks)
            touched, iou = sparse_overlaps(pixels, labels_f, areas, cells.ids)
            columns.append(touched)
            overlaps.append(iou)
            mask_empty.append(len(pixels) == 0)
        mask_index.append(masks[text])
    indptr = np.concatenate(([0], np.cumsum([len(c) for c in columns], dtype=np.int64)))
    mask_iou = sparse.csr_array(
        (
            np.concatenate(overlaps) if overlaps else np.zeros(0),
            np.concatenate(columns) if columns else np.zeros(0, np.int64),
            indptr,
        ),
        shape=(len(columns), len(cells.ids)),
    )
    return Detections.of_masks(
        np.asarray(classes, dtype=np.int64),
        np.asarray(scores, dtype=np.float64),
        np.asarray(mask_index, dtype=np.int64),
        mask_iou,
        np.asarray(mask_empty, dtype=bool),
    )


def read_submission(path_or_frame: str | os.PathLike[str] | pd.DataFrame) -> pd.DataFrame:
    """A ``cell_level.csv`` as strings, its columns checked."""
    from weakcell.submission import CELL_COLUMNS

    if isinstance(path_or_frame, pd.DataFrame):
        frame, name = path_or_frame.astype(str), "submission"
    else:
        frame, name = pd.read_csv(path_or_frame, dtype=str, keep_default_na=False), str(path_or_frame)
    if list(frame.columns) != CELL_COLUMNS:
        raise ValueError(f"{name}: columns are {list(frame.columns)}, expected {CELL_COLUMNS}")
    return frame


def submission_detections(
    path_or_frame: str | os.PathLike[str] | pd.DataFrame, truth: Mapping[Any, TrueCells]
) -> Found:
    """Detections of every row of a cell-level submission whose image is in ``truth``, and the number of
    predictions in rows of other images (ignored). Several rows of one image add up."""
    frame = read_submission(path_or_frame)
    name = "submission" if isinstance(path_or_frame, pd.DataFrame) else Path(path_or_frame).name
    parts: dict[Any, list[Detections]] = {}
    other = 0
    for i, (image_id, width, height, text) in enumerate(frame.itertuples(index=False)):
        tokens = text.split()
        where = f"{name} row {i} (ID {image_id})"
        if len(tokens) % 3:
            raise ValueError(f"{where}: {len(tokens)} tokens, not label-confidence-mask triples")
        if image_id not in truth:
            other += len(tokens) // 3
            continue
        try:
            size = int(height), int(width)
        except ValueError:
            raise ValueError(f"{where}: size {width!r}x{height!r} is not two integers") from None
        triples = zip(tokens[0::3], tokens[1::3], tokens[2::3])
        parts.setdefault(image_id, []).append(file_detections(triples, *size, truth[image_id], where))
    detections = {
        image_id: Detections(
            classes=np.concatenate([d.classes for d in found]),
            scores=np.concatenate([d.scores for d in found]),
            iou=found[0].iou if len(found) == 1 else sparse.vstack([d.iou for d in found], format="csr"),
            empty=np.concatenate([d.empty for d in found]),
        )
        for image_id, found in parts.items()
    }
    return detections, other


def score_submission(
    path_or_frame: str | os.PathLike[str] | pd.DataFrame,
    truth: Mapping[Any, TrueCells],
    n_classes: int,
    verified: Verified = "image",
    iou_threshold: float = IOU_THRESHOLD,
) -> dict:
    """The competition mAP of a cell-level submission file against ``truth`` (``truth_by_image``)."""
    found = submission_detections(path_or_frame, truth)
    return score_found(found, truth, n_classes, verified, iou_threshold)
