"""The 2021 competition metric: expectations are derived by hand from PR points, never from the code."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import weakcell.competition_metric as cm
from weakcell.cell_truth import label_iou
from weakcell.competition_metric import (
    class_ap,
    competition_map,
    image_true_positives,
    iou_table,
    open_images_ap,
)

C = 19


def _grid_mask(n_cells: int, size: int = 40, cell: int = 10) -> np.ndarray:
    """Label image with ``n_cells`` disjoint ``cell x cell`` squares, ids 1..n_cells."""
    mask = np.zeros((size, size), dtype=np.int32)
    per_row = size // cell
    for k in range(n_cells):
        r, c = divmod(k, per_row)
        mask[r * cell : (r + 1) * cell, c * cell : (c + 1) * cell] = k + 1
    return mask


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def _scores(image_id, cells, probs: dict[int, float] | list[dict[int, float]]) -> pd.DataFrame:
    """Rows ``image_id, cell_id, p_0..p_18``; probs: per cell ``{class: p}`` (others 0)."""
    rows = []
    for cell, p in zip(cells, probs):
        row = {"image_id": image_id, "cell_id": cell, **{f"p_{c}": 0.0 for c in range(C)}}
        row.update({f"p_{c}": v for c, v in p.items()})
        rows.append(row)
    return pd.DataFrame(rows)


def _labels(image_id, cell_labels: dict[int, list[int]]) -> pd.DataFrame:
    return pd.DataFrame(
        {"image_id": image_id, "cell_id": list(cell_labels), "labels": list(cell_labels.values())}
    )


def _brute_ap(ranked_tp: list[bool], n_gt: int) -> float:
    """Independent Open Images AP: at each TP rank, the best precision at that rank or later, / n_gt."""
    tp = np.asarray(ranked_tp, dtype=float)
    precision = np.cumsum(tp) / np.arange(1, len(tp) + 1)
    return sum(precision[k:].max() for k in range(len(tp)) if tp[k]) / n_gt


# ---- AP interpolation ------------------------------------------------------------------------------


def test_open_images_interpolation_by_hand():
    # ranked TP pattern 1 0 0 1 1 0 with 4 GT: precisions 1, 1/2, 1/3, 1/2, 3/5, 1/2; recalls .25 .25 .25 .5 .75 .75
    # monotone-from-right precision at the recall steps: 1, 3/5, 3/5 -> AP = .25 * (1 + .6 + .6) = 0.55
    # (non-interpolated mean precision at hits would be (1 + .5 + .6) / 4 = 0.525)
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


# ---- matching ---------------------------------------------------------------------------------------


def test_perfect_predictions_score_one():
    true_a, true_b = _grid_mask(5), _grid_mask(3)
    # predicted ids differ from true ids (reversed); wrong classes get probability 0
    pred_a = np.where(true_a > 0, 6 - true_a, 0)
    pred_b = np.where(true_b > 0, true_b + 10, 0)
    truth_a = {1: [0], 2: [0, 3], 3: [16], 4: [3], 5: [0, 16]}
    truth_b = {1: [18], 2: [0], 3: [5]}
    scores = pd.concat(
        [
            _scores("a", [6 - k for k in truth_a], [dict.fromkeys(v, 0.9) for v in truth_a.values()]),
            _scores("b", [k + 10 for k in truth_b], [dict.fromkeys(v, 0.8) for v in truth_b.values()]),
        ]
    )
    labels = pd.concat([_labels("a", truth_a), _labels("b", truth_b)])
    result = competition_map({"a": pred_a, "b": pred_b}, scores, {"a": true_a, "b": true_b}, labels)
    present = [0, 3, 5, 16, 18]
    assert result["map"] == pytest.approx(1.0)
    np.testing.assert_allclose(result["ap"][present], 1.0)
    assert np.isnan(np.delete(result["ap"], present)).all()
    assert result["n_gt"][[0, 3, 5, 16, 18]].tolist() == [4, 2, 1, 2, 1]
    np.testing.assert_array_equal(result["n_tp"], result["n_gt"])


@pytest.mark.parametrize(
    ("n_inside", "expected_iou", "is_tp"), [(59, 0.59, False), (60, 0.60, True), (61, 0.61, True)]
)
def test_iou_threshold_boundary(n_inside, expected_iou, is_tp):
    true = np.zeros((20, 20), dtype=np.int32)
    true[0:10, 0:10] = 1  # 100 px
    pred = np.zeros_like(true)
    pred.reshape(-1)[np.flatnonzero(true.ravel() == 1)[:n_inside]] = 7  # n_inside px of the true cell
    assert _iou(pred == 7, true == 1) == pytest.approx(expected_iou)
    ap = class_ap({"x": ([(0.9, 7)], pred)}, {"x": ({1}, true)})
    assert ap == (1.0 if is_tp else 0.0)
    result = competition_map({"x": pred}, _scores("x", [7], [{2: 0.9}]), {"x": true}, _labels("x", {1: [2]}))
    assert result["ap"][2] == (1.0 if is_tp else 0.0)
    assert result["n_tp"][2] == int(is_tp)


def test_iou_above_threshold_with_extra_pixels_outside():
    true = np.zeros((20, 20), dtype=np.int32)
    true[0:10, 0:10] = 1
    pred = np.zeros_like(true)
    pred[0:10, 0:10] = 3
    pred[10:14, 0:10] = 3  # 40 px outside: IoU 100/140 = 0.714
    assert _iou(pred == 3, true == 1) == pytest.approx(100 / 140)
    assert class_ap({"x": ([(0.5, 3)], pred)}, {"x": ({1}, true)}) == 1.0
    pred[10:20, 0:10] = 3  # 100 px outside: IoU 0.5
    assert class_ap({"x": ([(0.5, 3)], pred)}, {"x": ({1}, true)}) == 0.0


def test_duplicate_prediction_is_false_positive():
    true = _grid_mask(2)
    pred = np.where(true > 0, true + 20, 0)  # same cells, other ids
    # cell 1 predicted twice (0.9 and 0.8), cell 2 once (0.7): ranked TP FP TP, 2 GT
    # precision 1, 1/2, 2/3; recall 1/2, 1/2, 1 -> monotone precision at steps: 1, 2/3 -> AP = 1/2 + 1/3
    expected = 0.5 * 1.0 + 0.5 * (2 / 3)
    with_dup = class_ap({"x": ([(0.9, 21), (0.8, 21), (0.7, 22)], pred)}, {"x": ({1, 2}, true)})
    assert with_dup == pytest.approx(expected)
    assert class_ap({"x": ([(0.9, 21), (0.7, 22)], pred)}, {"x": ({1, 2}, true)}) == pytest.approx(1.0)
    # the same through competition_map: duplicated rows of pred_scores
    scores = _scores("x", [21, 21, 22], [{4: 0.9}, {4: 0.8}, {4: 0.7}])
    result = competition_map({"x": pred}, scores, {"x": true}, _labels("x", {1: [4], 2: [4]}))
    assert result["ap"][4] == pytest.approx(expected)
    assert result["n_tp"][4] == 2


def test_false_positive_after_full_recall_is_free_before_it_is_not():
    true = np.zeros((20, 20), dtype=np.int32)
    true[0:10, 0:10] = 1
    # one GT, ranked TP then duplicate FP: the FP comes after recall 1 -> AP 1
    assert class_ap({"x": ([(0.9, 1), (0.8, 1)], true)}, {"x": ({1}, true)}) == 1.0
    # first the low-IoU prediction is invalid: FP at 0.9, then TP at 0.8 -> AP 1/2
    pred = np.zeros_like(true)
    pred[0:10, 0:10] = 2
    pred[0:2, 0:10] = 5  # cell 5 covers 20 px (IoU .2), cell 2 covers 80 px (IoU .8)
    assert class_ap({"x": ([(0.9, 5), (0.8, 2)], pred)}, {"x": ({1}, true)}) == pytest.approx(0.5)


def test_classes_missing_from_truth_are_ignored():
    true = _grid_mask(4)
    truth = {1: [0], 2: [3], 3: [3], 4: []}
    # class 0: cell 1 perfect -> AP 1. class 3: cells 2, 3 are GT; ranked 4 (FP, 0.9), 2 (TP, 0.8), 3 (TP, 0.1)
    # precision 0, 1/2, 2/3 at recall 0, 1/2, 1 -> monotone: 2/3, 2/3 -> AP 2/3
    # classes 7 and 11 have no GT: confident garbage there must not change the mean
    probs = [{0: 0.9, 7: 0.99}, {3: 0.8, 11: 0.5}, {3: 0.1}, {3: 0.9, 7: 0.2, 11: 0.9}]
    result = competition_map({"x": true}, _scores("x", [1, 2, 3, 4], probs), {"x": true}, _labels("x", truth))
    assert result["ap"][0] == pytest.approx(1.0)
    assert result["ap"][3] == pytest.approx(2 / 3)
    assert np.isnan(result["ap"][[7, 11]]).all()
    assert result["map"] == pytest.approx((1.0 + 2 / 3) / 2)


def test_confidence_ordering_matters():
    true = _grid_mask(2)
    truth = ({1}, true)  # only cell 1 is of the class; predicting cell 2 is a FP
    fp_first = class_ap({"x": ([(0.9, 2), (0.8, 1)], true)}, {"x": truth})
    tp_first = class_ap({"x": ([(0.8, 2), (0.9, 1)], true)}, {"x": truth})
    assert fp_first == pytest.approx(0.5)  # TP at rank 2: precision 1/2, recall 1
    assert tp_first == pytest.approx(1.0)


def test_order_across_images_matters():
    true = _grid_mask(2)
    truths = {"x": ({1}, true), "y": ({1}, true)}
    # FP in y (cell 2 at 0.95) ranks between the TPs: TP FP TP -> 1/2 * 1 + 1/2 * 2/3
    preds = {"x": ([(0.99, 1)], true), "y": ([(0.95, 2), (0.5, 1)], true)}
    assert class_ap(preds, truths) == pytest.approx(0.5 + 0.5 * 2 / 3)
    preds = {"x": ([(0.99, 1)], true), "y": ([(0.05, 2), (0.5, 1)], true)}
    assert class_ap(preds, truths) == pytest.approx(1.0)


def test_image_without_predictions_lowers_recall():
    true = _grid_mask(1)
    truths = {"x": ({1}, true), "y": ({1}, true)}
    # only x predicted: recall stops at 1/2 with precision 1 -> AP 1/2
    assert class_ap({"x": ([(0.9, 1)], true)}, truths) == pytest.approx(0.5)
    assert class_ap({"x": ([(0.9, 1)], true), "y": ([], true)}, truths) == pytest.approx(0.5)
    labels = pd.concat([_labels("x", {1: [6]}), _labels("y", {1: [6]})])
    scores = _scores("x", [1], [{6: 0.9}])
    result = competition_map({"x": true}, scores, {"x": true, "y": true}, labels)
    assert result["ap"][6] == pytest.approx(0.5)
    assert result["n_gt"][6] == 2
    assert result["map"] == pytest.approx(0.5)


def test_argmax_rule_image_true_positives():
    # prediction 0 (0.9) takes true 0; prediction 1 (0.8) best-overlaps true 0 too -> FP; prediction 2 below 0.6
    iou = np.array([[0.9, 0.0], [0.7, 0.1], [0.1, 0.55]])
    np.testing.assert_array_equal(image_true_positives([0.9, 0.8, 0.7], iou, 0.6), [True, False, False])
    # reversed confidences: prediction 1 now takes true 0 first
    np.testing.assert_array_equal(image_true_positives([0.1, 0.8, 0.7], iou, 0.6), [False, True, False])
    assert image_true_positives([0.5], np.zeros((1, 0))).tolist() == [False]


@pytest.mark.parametrize("scale", [1, 100_000])  # small ids: bincount path; huge ids: label_iou fallback
def test_iou_table_matches_label_iou_and_pixel_counts(scale):
    rng = np.random.default_rng(2)
    pred = (rng.integers(0, 6, (30, 30)) * scale).astype(np.int64)
    true = rng.integers(0, 5, (30, 30)).astype(np.uint16)
    true[true == 3] = 0  # a missing id must not appear
    pred_ids, true_ids, iou = iou_table(pred, true)
    ref = label_iou(pred, true)
    np.testing.assert_array_equal(pred_ids, ref[0])
    np.testing.assert_array_equal(true_ids, ref[1])
    np.testing.assert_allclose(iou, ref[2])
    assert 3 not in true_ids.tolist()
    i, j = 1, 2
    assert iou[i, j] == pytest.approx(_iou(pred == pred_ids[i], true == true_ids[j]))


def test_iou_table_computed_once_per_image(monkeypatch):
    calls = []
    real = cm.iou_table

    def counting(pred, true):
        calls.append(1)
        return real(pred, true)

    monkeypatch.setattr(cm, "iou_table", counting)
    masks = {k: _grid_mask(4) for k in "abc"}
    scores = pd.concat([_scores(k, [1, 2, 3, 4], [{c: 0.5 for c in range(C)}] * 4) for k in "abc"])
    labels = pd.concat([_labels(k, {1: [0], 2: [5, 6]}) for k in "abc"])
    competition_map(masks, scores, masks, labels)
    assert len(calls) == 3


def test_competition_map_agrees_with_class_ap_on_random_data():
    rng = np.random.default_rng(1)
    true_masks, pred_masks, score_tables, label_tables = {}, {}, [], []
    for i in range(6):
        true = _grid_mask(12, size=40)
        pred = np.roll(true, int(rng.integers(0, 4)), axis=1)  # shifts of 0-3 px: IoU 1 .. 0.54
        true_masks[i], pred_masks[i] = true, pred
        cells = np.unique(pred[pred > 0])
        score_tables.append(_scores(i, cells, [{c: float(rng.random()) for c in range(C)} for _ in cells]))
        label_tables.append(
            _labels(
                i,
                {
                    k: sorted(rng.choice(4, size=int(rng.integers(0, 3)), replace=False).tolist())
                    for k in range(1, 13)
                },
            )
        )
    scores, labels = pd.concat(score_tables), pd.concat(label_tables)
    result = competition_map(pred_masks, scores, true_masks, labels)
    for c in range(4):
        preds = {i: (list(zip(t[f"p_{c}"], t["cell_id"])), pred_masks[i]) for i, t in enumerate(score_tables)}
        truths = {
            i: ({k for k, v in zip(t["cell_id"], t["labels"]) if c in v}, true_masks[i])
            for i, t in enumerate(label_tables)
        }
        assert result["ap"][c] == pytest.approx(class_ap(preds, truths))
    assert np.isnan(result["ap"][4:]).all()
    assert 0.0 < result["map"] < 1.0


def test_bad_inputs_raise():
    true = _grid_mask(2)
    with pytest.raises(ValueError, match="without truth"):
        class_ap({"z": ([(0.9, 1)], true)}, {"x": ({1}, true)})
    with pytest.raises(ValueError, match="not in its true mask"):
        class_ap({}, {"x": ({9}, true)})
    with pytest.raises(ValueError, match="without true mask"):
        competition_map({"z": true}, _scores("z", [1], [{0: 1.0}]), {"x": true}, _labels("x", {1: [0]}))
    with pytest.raises(ValueError, match="not in its true mask"):
        competition_map({"x": true}, _scores("x", [1], [{0: 1.0}]), {"x": true}, _labels("x", {9: [0]}))
