"""The 2021 competition metric as the organisers computed it: every expected value is derived by hand
(precision/recall points written out in the comments), never from the code under test. The first cases
are those of ``../shared/reference/hpa2021-metric.md``."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from weakcell.competition_metric import (
    Detections,
    TrueCells,
    bootstrap_interval,
    competition_map,
    image_true_positives,
    match_images,
    open_images_ap,
    paired_interval,
    resamples,
    score_found,
    score_submission,
    truth_by_image,
)
from weakcell.constants import EMPTY_MASK_RLE
from weakcell.rle import encode_mask, mask_pixels

C = 19


def _labels(image_id, cell_labels: dict[int, list[int]]) -> pd.DataFrame:
    return pd.DataFrame(
        {"image_id": image_id, "cell_id": list(cell_labels), "labels": list(cell_labels.values())}
    )


def _truth(masks: dict[str, np.ndarray], labels: dict[str, dict[int, list[int]]]):
    return truth_by_image(masks, pd.concat([_labels(k, v) for k, v in labels.items()]), C)


def _file(rows: dict[str, list[tuple[int, float, np.ndarray | str]]], size: tuple[int, int]) -> pd.DataFrame:
    """A cell-level submission frame: per image, ``(class, confidence, bool mask or encoded text)``."""
    strings = []
    for predictions in rows.values():
        parts = []
        for label, confidence, mask in predictions:
            text = mask if isinstance(mask, str) else encode_mask(mask)
            parts.append(f"{label} {confidence!r} {text}")
        strings.append(" ".join(parts))
    return pd.DataFrame(
        {"ID": list(rows), "ImageWidth": size[1], "ImageHeight": size[0], "PredictionString": strings}
    ).astype(str)


def _brute_ap(ranked_tp: list[bool], n_gt: int) -> float:
    """Independent Open Images AP: at each TP rank, the best precision at that rank or later, / n_gt."""
    tp = np.asarray(ranked_tp, dtype=float)
    precision = np.cumsum(tp) / np.arange(1, len(tp) + 1)
    return sum(precision[k:].max() for k in range(len(tp)) if tp[k]) / n_gt


# ---- the reference file's cases: 4x4 images, "cell" = the top-left 2x2 square, "blob" = pixel (3, 3) ---

TRUE_4 = np.zeros((4, 4), np.int32)
TRUE_4[:2, :2] = 1
CELL = TRUE_4 == 1
BLOB = np.zeros((4, 4), bool)
BLOB[3, 3] = True
EMPTY_4 = encode_mask(np.zeros((4, 4), bool))


def test_reference_empty_mask_is_dropped():
    truth = _truth({"a": TRUE_4, "b": TRUE_4}, {"a": {1: [0]}, "b": {1: [0]}})
    submission = _file({"a": [(0, 0.5, CELL)], "b": [(0, 1.0, EMPTY_4)]}, (4, 4))
    # 2 true cells of class 0; the empty mask is neither TP nor FP: ranked TP -> recall 1/2 at precision 1
    for reading in ("image", "all"):
        result = score_submission(submission, truth, C, reading)
        assert result["map"] == pytest.approx(0.5)
        assert result["ignored"]["empty"] == 1 and result["n_predictions"] == 1


def test_reference_verified_labels():
    truth = _truth({"a": TRUE_4, "b": TRUE_4}, {"a": {1: [0]}, "b": {1: [1]}})
    submission = _file({"a": [(0, 0.5, CELL)], "b": [(0, 0.9, CELL), (1, 0.9, CELL)]}, (4, 4))
    # organisers: class 0 is not judged in b (no true class-0 cell there): class 0 AP 1, class 1 AP 1
    organisers = score_submission(submission, truth, C, "image")
    assert organisers["map"] == pytest.approx(1.0) and organisers["ignored"]["unverified"] == 1
    # every class everywhere: class 0 ranks b's cell (0.9, FP) before a's (0.5, TP): precision 1/2 at
    # recall 1 -> AP 0.5; class 1 AP 1 -> mAP 0.75
    strict = score_submission(submission, truth, C, "all")
    assert strict["ap"][[0, 1]] == pytest.approx([0.5, 1.0]) and strict["map"] == pytest.approx(0.75)


def test_reference_ties_across_images_are_counted():
    truth = _truth({"a": TRUE_4, "b": TRUE_4}, {"a": {1: [0]}, "b": {1: [0]}})
    submission = _file({"a": [(0, 0.5, BLOB)], "b": [(0, 0.5, CELL)]}, (4, 4))
    # the FP (blob) and the TP (b's cell) tie: TP first -> 1/2 * 1 = 0.5, FP first -> 1/2 * 1/2 = 0.25
    result = score_submission(submission, truth, C)
    assert result["map"] in (pytest.approx(0.5), pytest.approx(0.25))
    assert result["n_ties"] == 1
    untied = score_submission(_file({"a": [(0, 0.5, BLOB)], "b": [(0, 0.6, CELL)]}, (4, 4)), truth, C)
    assert untied["map"] == pytest.approx(0.5) and untied["n_ties"] == 0


# ---- AP ---------------------------------------------------------------------------------------------------


def test_open_images_interpolation_by_hand():
    # ranked TP pattern 1 0 0 1 1 0 with 4 GT: precisions 1, 1/2, 1/3, 1/2, 3/5, 1/2; recalls .25 .25 .25 .5 .75 .75
    # monotone-from-right precision at the recall steps: 1, 3/5, 3/5 -> AP = .25 * (1 + .6 + .6) = 0.55
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    tp = np.array([1, 0, 0, 1, 1, 0], dtype=bool)
    shuffle = np.array([3, 0, 5, 1, 4, 2])  # input order must not matter, only scores
    assert open_images_ap(scores[shuffle], tp[shuffle], 4) == pytest.approx(0.55)
    assert np.isnan(open_images_ap(scores, tp, 0))
    assert open_images_ap(np.zeros(0), np.zeros(0, dtype=bool), 3) == 0.0


def test_open_images_ap_matches_brute_force_on_random_rankings():
    rng = np.random.default_rng(0)
    for _ in range(50):
        n = int(rng.integers(1, 30))
        tp = rng.random(n) < 0.4
        n_gt = int(tp.sum() + rng.integers(0, 5)) or 1
        scores = rng.random(n)
        ranked = tp[np.argsort(-scores)]
        assert open_images_ap(scores, tp, n_gt) == pytest.approx(_brute_ap(list(ranked), n_gt))


def test_argmax_rule_image_true_positives():
    # detection 0 (0.9) takes true 0; detection 1 (0.8) best-overlaps true 0 too -> FP; detection 2 below 0.6
    iou = np.array([[0.9, 0.0], [0.7, 0.1], [0.1, 0.55]])
    np.testing.assert_array_equal(image_true_positives([0.9, 0.8, 0.7], iou, 0.6), [True, False, False])
    # reversed confidences: detection 1 now takes true 0 first
    np.testing.assert_array_equal(image_true_positives([0.1, 0.8, 0.7], iou, 0.6), [False, True, False])
    assert image_true_positives([0.5], np.zeros((1, 0))).tolist() == [False]


# ---- matching on submission files ------------------------------------------------------------------------

TRUE_20 = np.zeros((20, 20), np.int32)
TRUE_20[:10, :10] = 1  # 100 px
TRUE_20[:10, 10:20] = 2  # 100 px, touching cell 1


def _square_part(n_inside: int, n_outside: int = 0) -> np.ndarray:
    """The first ``n_inside`` pixels of true cell 1 (row-major) and ``n_outside`` pixels of rows 10-19."""
    mask = np.zeros((20, 20), bool)
    mask[:10, :10].flat[:n_inside] = True
    mask[10:20, :10].flat[:n_outside] = True
    return mask


@pytest.mark.parametrize(
    ("inside", "outside", "is_tp"),
    [
        (60, 0, True),  # IoU 60 / 100 = 0.6 exactly: >= 0.6 matches
        (59, 0, False),  # 0.59
        (75, 25, True),  # 75 / (100 + 25) = 0.6 exactly, with pixels outside the cell
        (74, 25, False),  # 74 / 125 = 0.592
    ],
)
def test_iou_exactly_at_the_threshold(inside, outside, is_tp):
    truth = _truth({"x": TRUE_20}, {"x": {1: [2]}})
    result = score_submission(_file({"x": [(2, 0.9, _square_part(inside, outside))]}, (20, 20)), truth, C)
    assert result["ap"][2] == (1.0 if is_tp else 0.0) and result["n_tp"][2] == int(is_tp)


def test_second_detection_of_a_matched_cell_is_a_false_positive():
    truth = _truth({"x": TRUE_20}, {"x": {1: [4], 2: [4]}})
    cell1, cell2 = TRUE_20 == 1, TRUE_20 == 2
    # cell 1 predicted twice (0.9, 0.8), cell 2 once (0.7): ranked TP FP TP with 2 GT
    # precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1 -> AP = 1/2 * 1 + 1/2 * 2/3
    twice = _file({"x": [(4, 0.9, cell1), (4, 0.8, cell1), (4, 0.7, cell2)]}, (20, 20))
    result = score_submission(twice, truth, C)
    assert result["ap"][4] == pytest.approx(0.5 + 0.5 * 2 / 3) and result["n_tp"][4] == 2
    # the duplicate ranked after full recall costs nothing: TP TP FP -> AP 1
    late = _file({"x": [(4, 0.9, cell1), (4, 0.3, cell1), (4, 0.7, cell2)]}, (20, 20))
    assert score_submission(late, truth, C)["ap"][4] == pytest.approx(1.0)


def test_overlapping_masks_are_each_matched():
    truth = _truth({"x": TRUE_20}, {"x": {1: [0], 2: [0]}})
    wide = np.zeros((20, 20), bool)
    wide[:10, 5:20] = True  # overlaps cell 1's mask; IoU with cell 2 = 100 / 150 = 0.667, with cell 1 0.33
    result = score_submission(_file({"x": [(0, 0.9, TRUE_20 == 1), (0, 0.8, wide)]}, (20, 20)), truth, C)
    assert result["ap"][0] == pytest.approx(1.0) and result["n_tp"][0] == 2


def test_class_absent_from_the_truth_is_left_out_of_the_mean():
    truth = _truth({"x": TRUE_20}, {"x": {1: [0], 2: [3]}})
    # class 0: cell 1 at 0.9 -> AP 1. class 3: cell 1 (FP, 0.8) before cell 2 (TP, 0.4) -> AP 1/2.
    # class 7 has no true cell: its confident predictions change nothing (ignored, not in the mean)
    cell1, cell2 = TRUE_20 == 1, TRUE_20 == 2
    rows = [(0, 0.9, cell1), (3, 0.8, cell1), (3, 0.4, cell2), (7, 0.99, cell1), (7, 0.98, cell2)]
    for reading in ("image", "all"):
        result = score_submission(_file({"x": rows}, (20, 20)), truth, C, reading)
        assert result["ap"][[0, 3]] == pytest.approx([1.0, 0.5])
        assert np.isnan(result["ap"][7]) and result["map"] == pytest.approx(0.75)


def test_truth_image_without_a_row_predicts_nothing_and_extra_images_are_ignored():
    truth = _truth({"x": TRUE_20, "y": TRUE_20}, {"x": {1: [6]}, "y": {1: [6]}})
    # only x is predicted: recall stops at 1/2 with precision 1 -> AP 1/2; image z has no truth: ignored
    submission = _file(
        {"x": [(6, 0.9, TRUE_20 == 1)], "z": [(6, 1.0, TRUE_20 == 2), (6, 0.5, TRUE_20 == 1)]}, (20, 20)
    )
    result = score_submission(submission, truth, C)
    assert result["ap"][6] == pytest.approx(0.5) and result["n_gt"][6] == 2
    assert result["ignored"]["other_images"] == 2 and result["n_predictions"] == 1


def test_order_across_images_matters():
    truth = _truth({"x": TRUE_20, "y": TRUE_20}, {"x": {1: [5]}, "y": {1: [5]}})
    cell1, cell2 = TRUE_20 == 1, TRUE_20 == 2
    # y's FP (cell 2 at 0.95) ranks between the TPs: TP FP TP -> 1/2 * 1 + 1/2 * 2/3
    between = _file({"x": [(5, 0.99, cell1)], "y": [(5, 0.95, cell2), (5, 0.5, cell1)]}, (20, 20))
    assert score_submission(between, truth, C)["ap"][5] == pytest.approx(0.5 + 0.5 * 2 / 3)
    last = _file({"x": [(5, 0.99, cell1)], "y": [(5, 0.05, cell2), (5, 0.5, cell1)]}, (20, 20))
    assert score_submission(last, truth, C)["ap"][5] == pytest.approx(1.0)


def test_bad_rows_name_the_row():
    truth = _truth({"x": TRUE_20}, {"x": {1: [0]}})
    with pytest.raises(ValueError, match=r"row 0 \(ID x\).*differs from the true mask's 20x20"):
        score_submission(_file({"x": [(0, 0.9, np.ones((10, 20), bool))]}, (10, 20)), truth, C)
    with pytest.raises(ValueError, match=r"row 0 \(ID x\), prediction 0: mask does not decode"):
        score_submission(_file({"x": [(0, 0.9, "not*base64")]}, (20, 20)), truth, C)
    with pytest.raises(ValueError, match=r"row 0 \(ID x\), prediction 0: mask covers 16 pixels"):
        score_submission(_file({"x": [(0, 0.9, EMPTY_4)]}, (20, 20)), truth, C)
    with pytest.raises(ValueError, match=r"not in 0\.\.18"):
        score_submission(_file({"x": [(19, 0.9, TRUE_20 == 1)]}, (20, 20)), truth, C)
    frame = _file({"x": [(0, 0.9, TRUE_20 == 1)]}, (20, 20))
    frame.loc[0, "PredictionString"] += " 0 0.5"
    with pytest.raises(ValueError, match="not label-confidence-mask triples"):
        score_submission(frame, truth, C)


def test_sample_submission_placeholder_decodes_empty_at_2048():
    assert len(mask_pixels(EMPTY_MASK_RLE, 2048, 2048)) == 0


# ---- label images (what the pipeline holds) --------------------------------------------------------------


def _scores(image_id, cells, probs: list[dict[int, float]], missing=np.nan) -> pd.DataFrame:
    rows = []
    for cell, p in zip(cells, probs):
        row = {"image_id": image_id, "cell_id": cell, **{f"p_{c}": missing for c in range(C)}}
        row.update({f"p_{c}": v for c, v in p.items()})
        rows.append(row)
    return pd.DataFrame(rows)


def test_label_images_with_other_ids_score_as_their_regions():
    true = np.zeros((20, 30), np.int32)
    true[:10, :10], true[:10, 10:20], true[10:, :10] = 1, 2, 3
    pred = np.where(true > 0, 40 - true, 0)  # the same regions under ids 39, 38, 37
    labels = _labels("x", {1: [0], 2: [0, 3], 3: [16]})
    scores = _scores("x", [39, 38, 37], [{0: 0.9}, {0: 0.8, 3: 0.7}, {16: 0.6}], missing=0.0)
    result = competition_map({"x": pred}, scores, {"x": true}, labels, C)
    assert result["map"] == pytest.approx(1.0) and result["n_gt"][[0, 3, 16]].tolist() == [2, 1, 1]
    # organisers: 19 classes x 3 cells, only classes 0, 3 and 16 are verified in x -> 3 x 3 scored
    assert result["n_predictions"] == 9 and result["ignored"]["unverified"] == 3 * 16
    assert competition_map({"x": pred}, scores, {"x": true}, labels, C, verified="all")["n_predictions"] == 57


def test_nan_is_no_prediction_and_a_missing_cell_an_empty_mask():
    true = np.zeros((20, 30), np.int32)
    true[:10, :10], true[:10, 10:20] = 1, 2
    labels = _labels("x", {1: [0], 2: [0]})
    # cell 2's class 0 is NaN: not a detection at confidence 0 (which would be a late TP: AP 1)
    scores = _scores("x", [1, 2], [{0: 0.9}, {}])
    assert competition_map({"x": true}, scores, {"x": true}, labels, C)["ap"][0] == pytest.approx(0.5)
    # cell 5 is scored but absent from the predicted mask: an empty mask, dropped, not a FP
    scores = _scores("x", [5, 1, 2], [{0: 0.99}, {0: 0.9}, {0: 0.8}])
    result = competition_map({"x": true}, scores, {"x": true}, labels, C)
    assert result["ap"][0] == pytest.approx(1.0) and result["ignored"]["empty"] == 1


def test_bad_truth_raises():
    true = np.zeros((20, 20), np.int32)
    true[:10, :10] = 1
    with pytest.raises(ValueError, match="not in its true mask"):
        truth_by_image({"x": true}, _labels("x", {9: [0]}), C)
    with pytest.raises(ValueError, match="without true mask"):
        truth_by_image({"x": true}, _labels("z", {1: [0]}), C)
    with pytest.raises(ValueError, match="listed twice"):
        truth_by_image({"x": true}, pd.concat([_labels("x", {1: [0]}), _labels("x", {1: [2]})]), C)
    with pytest.raises(ValueError, match="out of range"):
        truth_by_image({"x": true}, _labels("x", {1: [19]}), C)


def _one_cell_image(score: float, iou: float) -> tuple[TrueCells, Detections]:
    """An image with one true cell of class 0 and one detection of class 0 overlapping it by ``iou``."""
    truth = TrueCells(mask=np.ones((2, 2), np.int32), ids=np.array([1]), classes=np.array([[True, False]]))
    found = Detections(
        classes=np.array([0]), scores=np.array([score]), iou=np.array([[iou]]), empty=np.array([False])
    )
    return truth, found


def test_resampled_images_are_scored_as_repeated_copies():
    (true_a, found_a), (true_b, found_b) = _one_cell_image(0.9, 0.8), _one_cell_image(0.8, 0.1)
    matched = match_images({"a": found_a, "b": found_b}, {"a": true_a, "b": true_b}, n_classes=2)
    # once each: a's TP ranks first (precision 1 at recall 1/2), b's FP adds no recall: AP 0.5
    assert matched.ap()[0] == pytest.approx(0.5) and np.isnan(matched.ap()[1])
    assert matched.ap(np.array([2, 0]))[0] == pytest.approx(1.0)  # two copies of a: both cells found
    assert matched.ap(np.array([0, 2]))[0] == pytest.approx(0.0)
    # a once, b twice: 3 true cells, one found at precision 1: AP 1/3
    assert matched.ap(np.array([1, 2]))[0] == pytest.approx(1 / 3)
    low, high = bootstrap_interval(matched, n_resamples=200, seed=1)
    # resamples of two images give AP 1 (a, a), 0.5 (a, b in any order) or 0 (b, b): the 95% interval
    # spans all three values' range
    assert (low, high) == (0.0, 1.0)
    same = match_images({"a": found_a, "c": found_a}, {"a": true_a, "c": true_a}, n_classes=2)
    assert bootstrap_interval(same, n_resamples=50) == (1.0, 1.0)  # every resample finds every cell


def test_paired_interval_resamples_both_submissions_alike():
    (true_a, hit_a), (true_b, hit_b) = _one_cell_image(0.9, 0.8), _one_cell_image(0.8, 0.9)
    _, miss_b = _one_cell_image(0.8, 0.1)
    truth = {"a": true_a, "b": true_b}
    both = match_images({"a": hit_a, "b": hit_b}, truth, n_classes=2)  # finds both cells: AP 1 always
    one = match_images({"a": hit_a, "b": miss_b}, truth, n_classes=2)  # AP 1 (a, a), 0.5 (a, b), 0 (b, b)
    assert paired_interval(both, both, n_resamples=50) == (0.0, 0.0)
    # paired, the difference is 1 - AP(one) on the same resample: 0, 0.5 or 1, never below 0; unpaired
    # intervals of the two ([1, 1] and [0, 1]) would say nothing about the order
    low, high = paired_interval(both, one, n_resamples=200, seed=1)
    assert (low, high) == (0.0, 1.0)
    assert paired_interval(one, both, n_resamples=200, seed=1) == (-1.0, 0.0)
    diffs = [1 - one.ap(w)[0] for w in resamples(2, 200, seed=1)]
    assert min(diffs) == 0.0 and set(np.round(diffs, 6)) <= {0.0, 0.5, 1.0}
    with pytest.raises(ValueError, match="same truth"):
        paired_interval(both, match_images({"a": hit_a}, {"a": true_a}, n_classes=2))
    # the same cells under other image IDs are other images: not paired
    renamed = match_images({"x": hit_a, "b": hit_b}, {"x": true_a, "b": true_b}, n_classes=2)
    with pytest.raises(ValueError, match="same truth"):
        paired_interval(both, renamed)


def test_score_found_keys_its_resamples_by_the_images_scored():
    (true_a, hit_a), (true_b, miss_b) = _one_cell_image(0.9, 0.8), _one_cell_image(0.8, 0.1)
    truth = {"a": true_a, "b": true_b}
    first = score_found(({"a": hit_a, "b": miss_b}, 0), truth, n_classes=2, bootstrap=40)
    second = score_found(({"a": hit_a}, 0), truth, n_classes=2, bootstrap=40)
    other = score_found(({"b": miss_b, "a": hit_a}, 0), {"b": true_b, "a": true_a}, n_classes=2, bootstrap=40)
    assert first["resamples_key"] == second["resamples_key"] != other["resamples_key"]  # truth order counts
    # the resampled maps are those of the resamples drawn: AP 1 (a, a), 0.5 (a, b), 0 (b, b) for the first;
    # the second never detects in b, so every resample scores as the first's
    expected = [{(2, 0): 1.0, (1, 1): 0.5, (0, 2): 0.0}[tuple(w)] for w in resamples(2, 40)]
    np.testing.assert_allclose(first["resampled"], expected)
    np.testing.assert_allclose(second["resampled"], expected)
    assert first["interval"] == (0.0, 1.0)
