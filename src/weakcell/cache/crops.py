"""Cut one square crop per cell out of a segmented image: pure numpy/cv2, no files.

A crop is the cell's bounding box with everything outside the cell's own mask zeroed (background and
neighbouring cells alike), resized with ``cv2.INTER_AREA`` so that its longer side is ``size`` and centred
in a zero ``size`` x ``size`` square: the aspect ratio is kept. Channel order stays R, G, B, Y.

Boxes and areas come from one run-length pass over each label image (label maps are long constant runs,
~20k runs in a 2048² image), not from ``find_objects`` or one full-image mask per cell; each cell's own
mask is then compared inside its box only.
"""

from __future__ import annotations

import cv2
import numpy as np
import pandas as pd

# Columns of the per-cell table that ``cut_crops`` returns, in order; bboxes are half-open pixel
# ranges at full resolution: the cell lies in [y0, y1) x [x0, x1).
CELL_COLUMNS: tuple[str, ...] = ("cell_id", "x0", "y0", "x1", "y1", "area", "nucleus_area", "touches_border")


def label_runs(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Horizontal runs of equal nonzero labels in an ``(H, W)`` label image: ``(label, row, x0, x1)``
    int64 arrays, each run covering ``[x0, x1)`` of its row. One compare and one ``flatnonzero`` over the
    image (~1.5 ms at 2048²); everything after works on the runs."""
    height, width = labels.shape
    starts_here = np.empty((height, width), dtype=bool)
    starts_here[:, 0] = True  # every row starts a run, whatever the previous row ended with
    np.not_equal(labels[:, 1:], labels[:, :-1], out=starts_here[:, 1:])
    starts = np.flatnonzero(starts_here)
    run_labels = labels.reshape(-1)[starts].astype(np.int64)
    ends = np.empty_like(starts)
    ends[:-1] = starts[1:]
    ends[-1] = starts_here.size
    rows = starts // width
    ends = np.minimum(ends, (rows + 1) * width)  # a run ends at the latest where its row does
    keep = run_labels > 0
    rows = rows[keep]
    x0 = starts[keep] - rows * width
    return run_labels[keep], rows, x0, ends[keep] - rows * width


def label_boxes(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(ids, boxes, areas)`` of the labels present in ``labels`` (increasing ids): boxes ``(n, 4)`` int64
    as x0, y0, x1, y1 (half-open), areas in pixels."""
    run_labels, rows, x0, x1 = label_runs(labels)
    if not run_labels.size:
        return np.zeros(0, np.int64), np.zeros((0, 4), np.int64), np.zeros(0, np.int64)
    order = np.argsort(run_labels, kind="stable")  # runs come in row order, so rows stay sorted per label
    run_labels, rows, x0, x1 = run_labels[order], rows[order], x0[order], x1[order]
    first = np.flatnonzero(np.r_[True, run_labels[1:] != run_labels[:-1]])
    last = np.r_[first[1:], run_labels.size] - 1
    boxes = np.stack(
        [np.minimum.reduceat(x0, first), rows[first], np.maximum.reduceat(x1, first), rows[last] + 1], axis=1
    )
    areas = np.add.reduceat(x1 - x0, first)
    return run_labels[first], boxes, areas


def _nucleus_areas(nuclei: np.ndarray, cell_ids: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Pixels labelled k in ``nuclei`` inside the box of cell k (the nucleus of cell k lies in cell k),
    per cell in ``cell_ids`` order."""
    run_labels, rows, x0, x1 = label_runs(nuclei)
    index = np.searchsorted(cell_ids, run_labels)
    index = np.minimum(index, max(cell_ids.size - 1, 0))
    valid = cell_ids[index] == run_labels
    index, rows, x0, x1 = index[valid], rows[valid], x0[valid], x1[valid]
    box = boxes[index]
    inside = (rows >= box[:, 1]) & (rows < box[:, 3])
    lengths = np.clip(np.minimum(x1, box[:, 2]) - np.maximum(x0, box[:, 0]), 0, None) * inside
    return np.bincount(index, weights=lengths, minlength=cell_ids.size).astype(np.int64)


def cut_crops(
    image: np.ndarray, cells: np.ndarray, nuclei: np.ndarray, size: int
) -> tuple[np.ndarray, pd.DataFrame]:
    """Cut every cell of ``cells`` out of ``image``.

    image:  (4, H, W) uint8, R, G, B, Y.
    cells:  (H, W) int instance labels, 0 = background; labels need not be contiguous.
    nuclei: (H, W) int, the nucleus of cell k labelled k.
    Returns crops (n, 4, size, size) uint8 and a table with ``CELL_COLUMNS``, one row per cell in
    increasing ``cell_id`` order (row i describes crops[i]).
    """
    if image.ndim != 3 or image.shape[0] != 4:
        raise ValueError(f"expected a (4, H, W) image, got {image.shape}")
    if cells.shape != image.shape[1:] or nuclei.shape != cells.shape:
        raise ValueError(f"mask shapes {cells.shape}, {nuclei.shape} differ from image {image.shape[1:]}")
    height, width = cells.shape
    cell_ids, boxes, areas = label_boxes(cells)
    crops = np.zeros((len(cell_ids), 4, size, size), dtype=np.uint8)
    if not len(cell_ids):
        return crops, pd.DataFrame({c: pd.Series(dtype="int64") for c in CELL_COLUMNS}).astype(
            {"touches_border": bool}
        )

    nucleus_areas = _nucleus_areas(nuclei, cell_ids, boxes)
    for i, (cell_id, (x0, y0, x1, y1)) in enumerate(zip(cell_ids.tolist(), boxes.tolist())):
        own = (cells[y0:y1, x0:x1] == cell_id).view(np.uint8)  # (h, w) 0/1
        # cv2.copyTo zeroes everything outside the mask (background and neighbours) per (h, w) plane,
        # several times faster than a numpy masked multiply over a (h, w, 4) block.
        cell = cv2.merge([cv2.copyTo(image[channel, y0:y1, x0:x1], own) for channel in range(4)])  # (h, w, 4)
        # Resize the box so its longer side becomes ``size``, then centre it in the zero square: the same
        # as padding to a square first, without resizing the padding.
        box_h, box_w = own.shape
        side = max(box_h, box_w)
        new_h, new_w = max(1, round(box_h * size / side)), max(1, round(box_w * size / side))
        small = cv2.resize(cell, (new_w, new_h), interpolation=cv2.INTER_AREA).reshape(new_h, new_w, 4)
        top, left = (size - new_h) // 2, (size - new_w) // 2
        crops[i, :, top : top + new_h, left : left + new_w] = small.transpose(2, 0, 1)

    x0, y0, x1, y1 = boxes.T
    table = pd.DataFrame(
        {
            "cell_id": cell_ids,
            "x0": x0,
            "y0": y0,
            "x1": x1,
            "y1": y1,
            "area": areas,
            "nucleus_area": nucleus_areas,
            "touches_border": (x0 == 0) | (y0 == 0) | (x1 == width) | (y1 == height),
        }
    )
    return crops, table
