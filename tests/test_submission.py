"""Submission encoding, writers and validators (fast, synthetic masks; the real sample when present)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tests.conftest import shared_path
from weakcell.constants import EMPTY_MASK_RLE
from weakcell.rle import decode_mask, encode_crop, encode_mask, placeholder
from weakcell.submission import (
    PLACEHOLDER,
    SubmissionError,
    cell_prediction_string,
    validate_cell_level,
    validate_image_level,
    validate_main,
    write_cell_level,
    write_image_level,
)

C = 19


def test_round_trip_random_masks():
    rng = np.random.default_rng(0)
    for _ in range(50):
        h, w = rng.integers(1, 60, 2)
        mask = rng.random((h, w)) < rng.random()
        text = encode_mask(mask)
        back = decode_mask(text, h, w)
        assert back.dtype == bool and back.shape == (h, w)
        np.testing.assert_array_equal(back, mask)


def test_encode_crop_matches_full_encoding():
    rng = np.random.default_rng(1)
    for _ in range(200):
        h, w = (int(v) for v in rng.integers(1, 30, 2))
        y0, x0 = int(rng.integers(0, h)), int(rng.integers(0, w))
        y1, x1 = int(rng.integers(y0, h)) + 1, int(rng.integers(x0, w)) + 1
        full = np.zeros((h, w), bool)
        full[y0:y1, x0:x1] = rng.random((y1 - y0, x1 - x0)) < rng.random()
        assert encode_crop(full[y0:y1, x0:x1], y0, x0, h, w) == encode_mask(full)
    # Runs that wrap from the bottom of one column into the top of the next must merge.
    full = np.ones((4, 3), bool)
    assert encode_crop(full, 0, 0, 4, 3) == encode_mask(full)


def test_decode_rejects_wrong_size():
    text = encode_mask(np.ones((4, 5), bool))
    with pytest.raises(ValueError, match="pixels"):
        decode_mask(text, 5, 5)


def test_placeholder_is_the_empty_2048_mask():
    assert encode_mask(np.zeros((2048, 2048), bool)) == EMPTY_MASK_RLE
    assert PLACEHOLDER == "0 1 eNoLCAgIMAEABJkBdQ==" == placeholder(2048, 2048)
    assert not decode_mask(EMPTY_MASK_RLE, 2048, 2048).any()
    assert encode_mask(np.zeros((1, 1), bool)) != EMPTY_MASK_RLE


def test_sample_submission_placeholders_and_validity():
    path = shared_path("hpa2021", "sample_submission.csv")
    sample = pd.read_csv(path)
    expected = [placeholder(h, w) for w, h in zip(sample["ImageWidth"], sample["ImageHeight"])]
    assert list(sample["PredictionString"]) == expected
    stats = validate_cell_level(path, sample)
    assert stats["rows"] == 559 and stats["placeholders"] == 559


def _label_image(h=40, w=30):
    labels = np.zeros((h, w), np.int32)
    labels[2:10, 3:12] = 1
    labels[15:40, 0:30] = 2  # touches the bottom: its runs wrap between columns
    labels[12:14, 20:25] = 5
    return labels


def test_cell_prediction_string_label_image_and_dict_agree():
    labels = _label_image()
    rng = np.random.default_rng(2)
    scores = {k: rng.random(C) for k in (1, 2, 5)}
    text = cell_prediction_string(labels, scores)
    tokens = text.split()
    assert len(tokens) == 3 * 3 * C
    masks = {k: labels == k for k in scores}
    assert cell_prediction_string(masks, scores) == text
    for j in range(0, len(tokens), 3):
        cell = (1, 2, 5)[j // (3 * C)]
        assert int(tokens[j]) == (j // 3) % C
        np.testing.assert_array_equal(decode_mask(tokens[j + 2], *labels.shape), labels == cell)
    kept = cell_prediction_string(labels, {1: np.eye(C)[3]}, min_score=0.5).split()
    assert kept[:2] == ["3", "1"] and len(kept) == 3
    with pytest.raises(KeyError, match="cell 7"):
        cell_prediction_string(labels, {7: np.ones(C)})


def _two_images(tmp_path):
    labels = _label_image()
    sample = pd.DataFrame(
        {
            "ID": ["img_a", "img_b"],
            "ImageWidth": [30, 16],
            "ImageHeight": [40, 8],
            "PredictionString": [PLACEHOLDER, PLACEHOLDER],
        }
    )
    rng = np.random.default_rng(3)
    preds = pd.DataFrame({"image_id": "img_a", "cell_id": [1, 2, 5]})
    for c in range(C):
        preds[f"p_{c}"] = rng.random(3)
    masks = {"img_a": labels, "img_b": np.zeros((8, 16), np.int32)}
    return labels, sample, preds, masks


def test_write_cell_level_round_trip(tmp_path):
    labels, sample, preds, masks = _two_images(tmp_path)
    path = write_cell_level(preds, masks.__getitem__, sample, tmp_path / "cell.csv")
    stats = validate_cell_level(path, sample)
    assert stats["rows"] == 2 and stats["predictions"] == 3 * C + 1 and stats["placeholders"] == 1
    out = pd.read_csv(path)
    assert list(out["ID"]) == ["img_a", "img_b"]
    assert out["PredictionString"][1] == placeholder(8, 16)
    tokens = out["PredictionString"][0].split()
    probs = preds.set_index("cell_id")
    for j in range(0, len(tokens), 3):
        cell = (1, 2, 5)[j // (3 * C)]
        label = int(tokens[j])
        assert float(tokens[j + 1]) == pytest.approx(probs.loc[cell, f"p_{label}"], rel=1e-3)
        np.testing.assert_array_equal(decode_mask(tokens[j + 2], 40, 30), labels == cell)
    assert validate_main([str(path)]) == 0


def test_write_cell_level_rejects_wrong_mask_size(tmp_path):
    _, sample, preds, masks = _two_images(tmp_path)
    masks["img_a"] = masks["img_a"][:20]
    with pytest.raises(ValueError, match="original resolution"):
        write_cell_level(preds, masks.__getitem__, sample, tmp_path / "cell.csv")
    assert not (tmp_path / "cell.csv").exists()


def _valid_frame():
    mask = encode_mask(np.eye(4, dtype=bool))
    return pd.DataFrame(
        {
            "ID": ["a", "b", "c"],
            "ImageWidth": [4, 4, 2048],
            "ImageHeight": [4, 4, 2048],
            "PredictionString": [f"0 0.5 {mask} 3 0.25 {mask}", f"18 1 {mask}", PLACEHOLDER],
        }
    )


@pytest.mark.parametrize(
    ("row", "column", "value", "message"),
    [
        (0, "PredictionString", "19 0.5 {m}", "row 0 .*label '19'"),
        (1, "PredictionString", "x 0.5 {m}", "row 1 .*label 'x'"),
        (1, "PredictionString", "2 nan {m}", "row 1 .*confidence 'nan'"),
        (0, "PredictionString", "2 1.5 {m}", "row 0 .*confidence '1.5'"),
        (1, "ImageWidth", 5, "row 1 .*pixels"),
        (1, "ImageHeight", 0, "row 1 .*positive"),
        (2, "ID", "a", "row 2 .*duplicate ID"),
        (1, "PredictionString", "2 0.5 {m} 3 0.5", "row 1 .*triples"),
        (0, "PredictionString", "2 0.5 !!notbase64", "row 0 .*does not decode"),
        (0, "PredictionString", "2 0.5 {m} 3 0.5 {e}", "row 0 .*empty mask"),
        (1, "PredictionString", "", "row 1 .*empty PredictionString"),
    ],
)
def test_validator_catches(row, column, value, message, tmp_path):
    frame = _valid_frame()
    validate_cell_level(frame)
    if isinstance(value, str):
        value = value.format(m=encode_mask(np.eye(4, dtype=bool)), e=encode_mask(np.zeros((4, 4), bool)))
    frame.loc[row, column] = value
    path = tmp_path / "bad.csv"
    frame.to_csv(path, index=False)
    with pytest.raises(SubmissionError, match=message):
        validate_cell_level(path)
    assert validate_main([str(path)]) == 2


def test_validator_checks_sample_order_and_columns():
    frame = _valid_frame()
    frame.loc[2, "ID"] = "a"
    with pytest.raises(SubmissionError) as err:
        validate_cell_level(frame)
    assert err.value.problems == ["row 2 (ID a): duplicate ID"]  # the first occurrence is not blamed
    frame = _valid_frame()
    with pytest.raises(SubmissionError, match="another order"):
        validate_cell_level(frame, frame.iloc[::-1])
    with pytest.raises(SubmissionError, match="columns"):
        validate_cell_level(frame.rename(columns={"ID": "Id"}))


def test_image_level_predicts_a_class_at_its_exact_threshold(tmp_path):
    """image_level.csv reads thresholds as tuning and evaluation do: prob >= threshold is predicted."""
    from weakcell.config import ThresholdsConfig
    from weakcell.thresholds import tune_thresholds

    # 0.25, 0.5 and 0.75 are exact in binary: equality is equality, not rounding luck
    probs = pd.DataFrame({"image_id": ["x", "y"], "p_0": [0.5, 0.25], "p_1": [0.75, 0.5]})
    path = write_image_level(probs, np.array([0.5, 0.75]), tmp_path / "img.csv")
    assert list(pd.read_csv(path, keep_default_na=False)["Predicted"]) == ["0 1", ""]
    # tuning on the same rows: class 0's lowest best threshold is 0.5 (0.5 -> positive, 0.25 -> negative),
    # and the file must then predict exactly the positives the tuned F1 of 1.0 counted
    y_true = np.array([[1], [0]])
    tuned = tune_thresholds(
        y_true, probs[["p_0"]].to_numpy(), ThresholdsConfig(step=0.25, min_positives=1, shrinkage=0)
    )
    assert tuned["threshold"].tolist() == [0.5] and tuned["f1"].tolist() == [1.0]
    written = write_image_level(probs[["image_id", "p_0"]], tuned["threshold"].to_numpy(), tmp_path / "t.csv")
    assert list(pd.read_csv(written, keep_default_na=False)["Predicted"]) == ["0", ""]


def test_image_level_write_and_validate(tmp_path):
    probs = pd.DataFrame({"image_id": ["x", "y"], "p_0": [0.9, 0.1], "p_1": [0.6, 0.2], "p_2": [0.0, 0.3]})
    path = write_image_level(probs, np.array([0.5, 0.5, 0.25]), tmp_path / "img.csv")
    out = pd.read_csv(path, keep_default_na=False)
    assert list(out.columns) == ["Id", "Predicted"]
    assert list(out["Predicted"]) == ["0 1", "2"]
    assert validate_image_level(path, n_classes=3)["labels"] == 3
    assert validate_main([str(path)]) == 0
    bad = out.assign(Predicted=["0 7", "2"])
    with pytest.raises(SubmissionError, match=r"row 0 .*label '7'"):
        validate_image_level(bad, n_classes=3)


def test_image_level_in_the_2021_layout_keeps_negative_alone(tmp_path):
    """Issue 26: the 2021 image_level.csv carried the 2018 header Id,Predicted and listed Negative beside
    other classes. 2021 scores cells only, so its image labels are written as its train.csv is (ID,Label,
    `|`), and Negative (class 18, "no specific signal") never stands beside a class."""
    probs = pd.DataFrame(
        {"image_id": ["a", "b", "c"], "p_0": [0.9, 0.1, 0.1], "p_1": [0.8, 0.7, 0.1], "p_2": [0.9, 0.9, 0.2]}
    )
    path = write_image_level(
        probs, np.array([0.5, 0.5, 0.5]), tmp_path / "img.csv", columns=("ID", "Label", "|"), negative=2
    )
    assert path.read_text() == "ID,Label\na,0|1\nb,1\nc,\n"
    assert validate_image_level(path, n_classes=3)["labels"] == 3
    two_thousand_eighteen = write_image_level(probs, np.array([0.5, 0.5, 0.5]), tmp_path / "2018.csv")
    assert two_thousand_eighteen.read_text().splitlines()[:2] == ["Id,Predicted", "a,0 1 2"]
    assert validate_image_level(two_thousand_eighteen, n_classes=3)["labels"] == 5
    bad = tmp_path / "bad.csv"
    bad.write_text("ID,Predicted|\na,0\n")
    with pytest.raises(SubmissionError, match="expected ID,Predicted or ID,Label"):
        validate_image_level(bad)
