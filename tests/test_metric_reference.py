"""``weakcell.competition_metric`` against an independent port of the organisers' evaluator on random
submissions. The port below follows the structure of ``tensorflow/models`` ``research/object_detection``
as the organisers drove it (see ``../shared/reference/hpa2021-metric.md``): full masks decoded with
pycocotools, boxes from the mask's pixels (empty mask -> zero box -> removed as invalid), the
verified-label filter, per image and class detections sorted by ``argsort(scores)[::-1]``, float32 mask
IoU, the argmax matching loop, then ``compute_precision_recall`` and ``compute_average_precision`` as
loops. It shares no code with the kit beyond reading the CSV; random confidences are distinct, so the
tie order (arbitrary in the reference) never decides.
"""

from __future__ import annotations

import base64
import json
import warnings
import zlib

import numpy as np
import pandas as pd
import pytest
from pycocotools import mask as coco_mask

from weakcell.competition_metric import score_submission, truth_by_image
from weakcell.rle import encode_mask

N_CLASSES = 5
SIZE = 16


def _decode(text: str, height: int, width: int) -> np.ndarray:
    counts = zlib.decompress(base64.b64decode(text))
    with warnings.catch_warnings():  # pycocotools under numpy 2: "__array__ ... copy keyword"
        warnings.simplefilter("ignore", DeprecationWarning)
        return coco_mask.decode({"size": [height, width], "counts": counts})


def _box(mask: np.ndarray) -> tuple[float, float, float, float]:
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        return (0.0, 0.0, 0.0, 0.0)
    return (rows.min(), cols.min(), rows.max() + 1, cols.max() + 1)


def _iou_float32(detected: list[np.ndarray], truth: list[np.ndarray]) -> np.ndarray:
    answer = np.zeros((len(detected), len(truth)), dtype=np.float32)
    for i, d in enumerate(detected):
        for j, t in enumerate(truth):
            inter = np.sum(np.minimum(d, t), dtype=np.float32)
            union = np.sum(d, dtype=np.float32) + np.sum(t, dtype=np.float32) - inter
            answer[i, j] = inter / np.maximum(union, np.float32(1e-8))
    return answer


def _precision_recall(scores, labels, num_gt):
    order = np.argsort(scores)[::-1]
    tp = labels[order].astype(float)
    fp = (tp <= 0).astype(float)
    cum_tp, cum_fp = np.cumsum(tp), np.cumsum(fp)
    return cum_tp / (cum_tp + cum_fp), cum_tp / num_gt


def _average_precision(precision, recall):
    recall = np.concatenate([[0], recall, [1]])
    precision = np.concatenate([[0], precision, [0]])
    for i in range(len(precision) - 2, -1, -1):
        precision[i] = max(precision[i], precision[i + 1])
    indices = np.where(recall[1:] != recall[:-1])[0] + 1
    return float(np.sum((recall[indices] - recall[indices - 1]) * precision[indices]))


def reference_map(frame: pd.DataFrame, masks: dict, labels: dict, verified: str) -> tuple[float, np.ndarray]:
    """The organisers' mAP: ``masks`` image -> label image, ``labels`` image -> {cell: [classes]}."""
    scores_per_class = [[] for _ in range(N_CLASSES)]
    tp_per_class = [[] for _ in range(N_CLASSES)]
    num_gt = np.zeros(N_CLASSES)
    rows = {row.ID: row for row in frame.itertuples(index=False)}
    for image_id, label_image in masks.items():  # the driver visits ground-truth images only
        gt = [
            (c, (label_image == cell).astype(np.uint8)) for cell, cs in labels[image_id].items() for c in cs
        ]
        for c, _ in gt:
            num_gt[c] += 1
        evaluatable = {c for c, _ in gt} if verified == "image" else set(range(N_CLASSES))
        row = rows.get(image_id)
        if row is None:
            continue
        tokens = row.PredictionString.split()
        detections = []
        for k in range(0, len(tokens), 3):
            c, score = int(tokens[k]), float(tokens[k + 1])
            mask = _decode(tokens[k + 2], int(row.ImageHeight), int(row.ImageWidth))
            y0, x0, y1, x1 = _box(mask)
            if c in evaluatable and y0 < y1 and x0 < x1:
                detections.append((c, score, mask))
        for c in range(N_CLASSES):
            found = [(s, m) for cls, s, m in detections if cls == c]
            if not found:
                continue
            order = np.argsort(np.array([s for s, _ in found]))[::-1]
            found = [found[i] for i in order]
            truth = [m for cls, m in gt if cls == c]
            tp = np.zeros(len(found), dtype=bool)
            if truth:
                iou = _iou_float32([m for _, m in found], truth)
                best = np.argmax(iou, axis=1)
                taken = np.zeros(len(truth), dtype=bool)
                for i in range(len(found)):
                    if iou[i, best[i]] >= 0.6 and not taken[best[i]]:
                        tp[i] = taken[best[i]] = True
            scores_per_class[c].append(np.array([s for s, _ in found]))
            tp_per_class[c].append(tp)
    ap = np.full(N_CLASSES, np.nan)
    for c in range(N_CLASSES):
        if num_gt[c] == 0:
            continue
        scores = np.concatenate(scores_per_class[c]) if scores_per_class[c] else np.array([])
        tps = np.concatenate(tp_per_class[c]) if tp_per_class[c] else np.array([], dtype=bool)
        ap[c] = _average_precision(*_precision_recall(scores, tps, num_gt[c]))
    return float(np.nanmean(ap)), ap


def _random_case(rng: np.random.Generator):
    """Truth for 3 images (random rectangles, some cells without a class) and a submission with exact,
    shifted, merged, random, empty and duplicated masks, an extra image and an image left out."""
    masks, labels = {}, {}
    for image_id in ("a", "b", "c"):
        label_image = np.zeros((SIZE, SIZE), np.int32)
        cells = {}
        for cell in range(1, int(rng.integers(2, 6)) + 1):
            y, x = rng.integers(0, SIZE - 3, 2)
            h, w = rng.integers(3, 8, 2)
            label_image[y : y + h, x : x + w] = cell
            cells[cell] = sorted(rng.choice(N_CLASSES, size=int(rng.integers(0, 3)), replace=False).tolist())
        present = set(np.unique(label_image).tolist()) - {0}
        masks[image_id] = label_image
        labels[image_id] = {cell: cs for cell, cs in cells.items() if cell in present}
    rows = []
    for image_id in ("a", "b", "c", "extra"):
        if rng.random() < 0.15:
            continue  # an image without a row predicts nothing
        label_image = masks.get(image_id, masks["a"])
        ids = np.unique(label_image)[1:]
        parts = []
        for _ in range(int(rng.integers(1, 12))):
            kind = rng.choice(["exact", "shifted", "merged", "random", "empty", "grown"])
            if kind == "exact":
                mask = label_image == rng.choice(ids)
            elif kind == "shifted":
                mask = np.roll(
                    label_image == rng.choice(ids), int(rng.integers(-2, 3)), axis=int(rng.integers(2))
                )
            elif kind == "merged":
                mask = np.isin(label_image, rng.choice(ids, size=min(2, len(ids)), replace=False))
            elif kind == "grown":
                mask = label_image == rng.choice(ids)
                mask = mask | np.roll(mask, 1, axis=0)
            elif kind == "random":
                mask = rng.random((SIZE, SIZE)) < 0.1
            else:
                mask = np.zeros((SIZE, SIZE), bool)
            text = encode_mask(mask)
            for _ in range(1 + int(rng.random() < 0.2)):  # sometimes the same mask and class twice
                parts.append(f"{int(rng.integers(N_CLASSES))} {rng.random()!r} {text}")
        rows.append(
            {"ID": image_id, "ImageWidth": SIZE, "ImageHeight": SIZE, "PredictionString": " ".join(parts)}
        )
    return masks, labels, pd.DataFrame(rows).astype(str)


@pytest.mark.parametrize("verified", ["image", "all"])
def test_kit_equals_the_reference_on_random_submissions(verified):
    rng = np.random.default_rng(2021 if verified == "image" else 2018)
    differences = []
    for case in range(150):
        masks, labels, frame = _random_case(rng)
        truth_rows = pd.DataFrame(
            [
                {"image_id": i, "cell_id": cell, "labels": cs}
                for i, cells in labels.items()
                for cell, cs in cells.items()
            ]
        )
        truth = truth_by_image(masks, truth_rows, N_CLASSES)
        kit = score_submission(frame, truth, N_CLASSES, verified)
        expected_map, expected_ap = reference_map(frame, masks, labels, verified)
        if not np.allclose(kit["ap"], expected_ap, equal_nan=True, atol=1e-12):
            differences.append((case, kit["ap"], expected_ap))
        assert kit["map"] == pytest.approx(expected_map, abs=1e-12) or np.isnan(expected_map)
    assert not differences, differences[:3]


@pytest.mark.parametrize("verified", ["image", "all"])
def test_score_cli_equals_the_reference_on_truth_folders_with_empty_images(tmp_path, verified):
    """``weakcell score`` end to end (a truth folder on disk, the CSV, ``--json``) on random cases in which
    some truth images hold no cell at all: the organisers' driver visits every ground-truth image, so under
    ``verified=all`` each detection there is a false positive."""
    import cv2

    from weakcell.score import score_main

    rng = np.random.default_rng(7 if verified == "image" else 8)
    n_empty = 0
    for case in range(40):
        masks, labels, frame = _random_case(rng)
        for image_id in ("b", "c"):
            if rng.random() < 0.3:  # a label image without any cell: it has no cells.csv row
                masks[image_id] = np.zeros((SIZE, SIZE), np.int32)
                labels[image_id] = {}
                n_empty += 1
        folder = tmp_path / f"case{case}"
        folder.mkdir()
        for image_id, label_image in masks.items():
            cv2.imwrite(str(folder / f"{image_id}_cells.png"), label_image.astype(np.uint16))
        rows = [
            {"image_id": i, "cell_id": cell, "Label": "|".join(map(str, cs))}
            for i, cells in labels.items()
            for cell, cs in cells.items()
        ]
        pd.DataFrame(rows, columns=["image_id", "cell_id", "Label"]).to_csv(folder / "cells.csv", index=False)
        frame.to_csv(folder / "submission.csv", index=False)
        out = folder / "score.json"
        argv = [str(folder / "submission.csv"), "--truth", str(folder), "--verified", verified]
        assert score_main([*argv, "--classes", str(N_CLASSES), "--json", str(out)]) == 0
        result = json.loads(out.read_text())
        with warnings.catch_warnings():  # a case without any class-bearing cell has no mean
            warnings.simplefilter("ignore", RuntimeWarning)
            expected_map, expected_ap = reference_map(frame, masks, labels, verified)
        kit_ap = np.array([np.nan if v is None else v for v in result["ap"].values()], dtype=float)
        assert np.allclose(kit_ap, expected_ap, equal_nan=True, atol=1e-12), (case, kit_ap, expected_ap)
        assert result["map"] == pytest.approx(expected_map, abs=1e-12) or np.isnan(expected_map)
        assert result["n_images"] == len(masks)
    assert n_empty >= 10  # the cases hold empty truth images
