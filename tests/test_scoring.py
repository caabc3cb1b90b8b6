"""The score formulas of ``weakcell.scoring``; expected values worked out by hand."""

from __future__ import annotations

import typing
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pandas as pd
import pytest

from weakcell.cell_truth import build_cell_truth
from weakcell.config import InferConfig
from weakcell.constants import CellScore
from weakcell.scoring import (
    CELL_SCORES,
    cell_confidence,
    cell_score_table,
    cell_scores,
    max_pool_images,
    oof_cell_scores,
    score_oof,
)
from weakcell.submission import as_submitted


def test_cell_confidence_mixes_the_image_and_its_best_cell() -> None:
    # three cells of image "b" around one of image "a", two classes; "b"'s best cells: 0.8 and 0.4
    cell = np.array([[0.8, 0.1], [0.5, 0.2], [0.2, 0.9], [0.4, 0.4]])
    image = np.array([[0.6, 0.5], [0.6, 0.5], [0.1, 0.3], [0.6, 0.5]])
    ids = np.array(["b", "b", "a", "b"])
    np.testing.assert_allclose(cell_confidence(cell, image, ids, 1.0, 0.0), cell * image)
    best = np.array([[0.8, 0.4], [0.8, 0.4], [0.2, 0.9], [0.8, 0.4]])
    np.testing.assert_allclose(cell_confidence(cell, image, ids, 1.0, 1.0), cell * best)
    mixed = cell_confidence(cell, image, ids, 3.0, 0.25)
    np.testing.assert_allclose(
        mixed[0], [0.8 * (0.75 * 0.6 + 0.25 * 0.8) ** 3, 0.1 * (0.75 * 0.5 + 0.1) ** 3]
    )
    np.testing.assert_allclose(mixed[2], [0.2 * (0.75 * 0.1 + 0.05) ** 3, 0.9 * (0.75 * 0.3 + 0.225) ** 3])
    # power 0: the cell's own probability, whatever the image says
    np.testing.assert_allclose(cell_confidence(cell, image, ids, 0.0, 0.25), cell)


def test_max_pool_images_takes_each_images_best_cell_and_zero_without_cells() -> None:
    cells = pd.DataFrame({"image_id": ["a", "b", "a"]})
    probs = np.array([[0.2, 0.7], [0.9, 0.1], [0.6, 0.3]])
    pooled = max_pool_images(cells, probs, ["b", "none", "a"])
    np.testing.assert_allclose(pooled, [[0.9, 0.1], [0.0, 0.0], [0.6, 0.7]])


def test_cell_scores_join_each_cell_to_its_images_probability() -> None:
    # one class; cells of images "a" and "b" interleaved, images listed in another order
    oof_cell = pd.DataFrame(
        {
            "image_id": ["a", "b", "a"],
            "cell_id": [1, 1, 2],
            "p_0": [0.5, 0.4, 0.2],
            "mil_p_0": [0.3, 0.6, 0.1],
            "att_0": [1.5, 0.5, 0.5],
        }
    )
    oof_image = pd.DataFrame({"image_id": ["b", "a"], "p_0": [0.25, 0.8]})
    np.testing.assert_allclose(cell_scores("stage1", oof_cell, oof_image, 1).ravel(), [0.5, 0.4, 0.2])
    np.testing.assert_allclose(cell_scores("mil_instance", oof_cell, oof_image, 1).ravel(), [0.3, 0.6, 0.1])
    # image probability x attention clipped to [0, 1]
    np.testing.assert_allclose(
        cell_scores("mil_attention", oof_cell, oof_image, 1).ravel(), [0.8, 0.125, 0.4]
    )
    np.testing.assert_allclose(
        cell_scores("stage1_x_image", oof_cell, oof_image, 1).ravel(), [0.4, 0.1, 0.16]
    )


def test_every_cell_score_a_config_may_name_has_a_formula() -> None:
    assert set(CELL_SCORES) == set(typing.get_args(CellScore))


# -- out-of-fold cell scores: the competition metric on the cache's cells ----------------------------------


def _truth_folder(folder: Path, masks: dict[str, np.ndarray], labels: dict[str, dict[int, str]]) -> Path:
    """A truth folder: ``<id>_cells.png`` (16-bit), ``cells.csv`` rows of ``labels``, ``images.csv``."""
    folder.mkdir(parents=True)
    for image_id, mask in masks.items():
        cv2.imwrite(str(folder / f"{image_id}_cells.png"), mask.astype(np.uint16))
    rows = [(i, cell, text) for i, cells in labels.items() for cell, text in cells.items()]
    pd.DataFrame(rows, columns=["image_id", "cell_id", "Label"]).assign(split="train").to_csv(
        folder / "cells.csv", index=False
    )
    pd.DataFrame({"image_id": list(masks), "split": "train"}).to_csv(folder / "images.csv", index=False)
    return folder


def _square(size: int, cells: dict[int, tuple[slice, slice]]) -> np.ndarray:
    mask = np.zeros((size, size), np.int32)
    for cell, (rows, cols) in cells.items():
        mask[rows, cols] = cell
    return mask


def _oof_tables(image_fold: dict[str, int], cells: dict[tuple[str, int], list[float]], n_classes: int):
    """OOF tables as training writes them: every cell's stage-1 probabilities ``cells[(image, cell)]``
    (MIL instance and attention copies of them), every image's probability 0.5."""
    keys = list(cells)
    probs = np.array([cells[key] for key in keys])
    columns = {f"{prefix}{c}": probs[:, c] for prefix in ("p_", "mil_p_", "att_") for c in range(n_classes)}
    oof_cell = pd.DataFrame({"image_id": [k[0] for k in keys], "cell_id": [k[1] for k in keys], **columns})
    oof_image = pd.DataFrame({"image_id": list(image_fold), "fold": list(image_fold.values())}).assign(
        **{f"p_{c}": 0.5 for c in range(n_classes)}
    )
    return oof_image, oof_cell


def test_oof_cell_map_is_the_competition_metric_not_the_iou_half_proxy(tmp_path) -> None:
    # image x, 20x20: true cells 1 (rows 0-9 x cols 0-9) and 2 (rows 10-19 x cols 10-19), both class 0.
    # Segmented cell 1 holds 55 of true cell 1's 100 pixels (IoU 0.55), segmented cell 2 is true cell 2.
    true = _square(20, {1: (slice(0, 10), slice(0, 10)), 2: (slice(10, 20), slice(10, 20))})
    truth = _truth_folder(tmp_path / "truth", {"x": true}, {"x": {1: "0", 2: "0"}})
    oof_image, oof_cell = _oof_tables({"x": 0}, {("x", 1): [0.9, 0.0], ("x", 2): [0.5, 0.0]}, 2)
    images = pd.DataFrame({"image_id": ["x"], "labels": [[0]]})
    for pixels, expected in ((55, 0.25), (61, 1.0)):
        segmented = true.copy()
        inside = np.zeros((10, 10), bool)
        inside.T.flat[:pixels] = True
        segmented[:10, :10] = np.where(inside, 1, 0)
        cell_truth = build_cell_truth(truth, 2, {"x": segmented}.get, {"x": 0})
        data = SimpleNamespace(n_classes=2, images=images, cell_truth=cell_truth)
        for verified in ("image", "all"):
            metrics = score_oof(data, oof_image, oof_cell, verified=verified)
            # IoU 0.55 < 0.6: cell 1's 0.9 is a false positive ranked first, cell 2's 0.5 finds one of
            # the 2 true cells: recall 1/2 at precision 1/2 -> AP 0.25 (class 1 has no true cell: left
            # out). Matching one-to-one at IoU 0.5 (the old proxy) scored both as hits: 1.0. At IoU 0.61
            # both are hits under the competition metric too.
            assert metrics["cell_map_stage1"] == pytest.approx(expected)
            assert metrics["cell_map_confidence"] == pytest.approx(expected)  # image_power 0: the cell alone


def test_oof_cell_scores_under_both_readings_and_folds(tmp_path) -> None:
    # x: cell 1 is class 0, cell 2 class 1; y: one class-1 cell; z (another fold): one class-0 cell.
    # Every segmented cell is exactly its true cell.
    x = _square(10, {1: (slice(0, 5), slice(0, 5)), 2: (slice(5, 10), slice(5, 10))})
    y = _square(10, {1: (slice(0, 5), slice(0, 5))})
    masks = {"x": x, "y": y, "z": y}
    truth = _truth_folder(tmp_path / "truth", masks, {"x": {1: "0", 2: "1"}, "y": {1: "1"}, "z": {1: "0"}})
    cell_truth = build_cell_truth(truth, 2, masks.get, {"x": 0, "y": 0, "z": 1})
    assert list(cell_truth.images) == ["x", "y", "z"] and cell_truth.images["z"].fold == 1
    scores = pd.DataFrame(
        {"image_id": ["x", "x", "y"], "cell_id": [1, 2, 1], "p_0": [0.5, 0.1, 0.9], "p_1": [0.2, 0.8, 0.7]}
    )
    result = oof_cell_scores({"s": scores}, cell_truth, ("image", "all"), folds={0})
    # organisers: class 0 judged in x only (0.5 TP, 0.1 FP): AP 1; class 1 in x and y: 0.8 TP, 0.7 TP,
    # 0.2 FP -> AP 1
    assert result["image"]["s"]["ap"].tolist() == pytest.approx([1.0, 1.0])
    # every class everywhere: class 0 ranks y's cell (0.9, FP) first: precision 1/2 at the hit
    assert result["all"]["s"]["ap"].tolist() == pytest.approx([0.5, 1.0])
    # with fold 1, image z's class-0 cell is a truth cell nothing predicts: class 0 recall stops at 1/2
    everything = cell_truth.score(scores, "image")
    assert everything["ap"].tolist() == pytest.approx([0.5, 1.0]) and everything["n_images"] == 3


def test_the_submitted_confidence_is_scored_as_its_file_carries_it() -> None:
    np.testing.assert_array_equal(
        as_submitted(np.array([0.2, 0.5, 1.2, -0.1]), 0.3), [np.nan, 0.5, 1.0, np.nan]
    )
    np.testing.assert_array_equal(as_submitted(np.array([0.0, 1.5])), [0.0, 1.0])  # min_score 0 keeps all
    oof_image, oof_cell = _oof_tables({"a": 0}, {("a", 1): [0.2, 0.6]}, 2)
    infer = InferConfig(min_score=0.5)
    table = cell_score_table("confidence", oof_cell, oof_image, 2, infer)
    assert table[["p_0", "p_1"]].to_numpy().tolist()[0][1] == 0.6 and np.isnan(table["p_0"][0])
    assert cell_score_table("stage1", oof_cell, oof_image, 2, infer)["p_0"][0] == 0.2  # not submitted
