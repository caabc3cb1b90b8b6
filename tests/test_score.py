"""``weakcell score`` under both readings of the metric, and the truth folders it reads; expected values by
hand."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pandas as pd
import pytest

from weakcell.cli import main
from weakcell.rle import encode_mask
from weakcell.score import score_main

# image a (16-bit PNG): cell 1 = rows 0-9 x cols 0-9, class 0; cell 2 = rows 0-9 x cols 10-19, no class.
# image b (8-bit PNG): cell 1 = rows 10-19 x cols 0-9, class 1. image c (split train): cell 1, class 0.
A = np.zeros((20, 20), np.uint16)
A[:10, :10], A[:10, 10:] = 1, 2
B = np.zeros((20, 20), np.uint8)
B[10:, :10] = 1


def _truth_folder(tmp_path):
    folder = tmp_path / "truth"
    folder.mkdir(parents=True)
    cv2.imwrite(str(folder / "a_cells.png"), A)
    cv2.imwrite(str(folder / "b_cells.png"), B)
    cv2.imwrite(str(folder / "c_cells.png"), A.astype(np.uint8))
    pd.DataFrame(
        {
            "image_id": ["a", "a", "b", "c"],
            "cell_id": [1, 2, 1, 1],
            "Label": ["0", "", "1", "0"],
            "split": ["test", "test", "test", "train"],
        }
    ).to_csv(folder / "cells.csv", index=False)
    return folder


def _submission(tmp_path, size: int = 20):
    a1, a2, b1 = (A == 1), (A == 2), (B == 1)
    rows = {
        "a": f"0 0.9 {encode_mask(a1)} 1 0.8 {encode_mask(a2)}",
        "b": f"1 0.7 {encode_mask(b1)} 0 0.95 {encode_mask(b1)}",
    }
    path = tmp_path / f"cell_level_{size}.csv"
    pd.DataFrame(
        {"ID": list(rows), "ImageWidth": size, "ImageHeight": size, "PredictionString": list(rows.values())}
    ).to_csv(path, index=False)
    return path


@pytest.mark.parametrize(
    ("verified", "expected"),
    [
        # organisers: class 0 judged in a only (a's cell 1 at 0.9: AP 1), class 1 in b only (AP 1); a's
        # class-1 and b's class-0 predictions are ignored
        ("image", {"map": 1.0, "0": 1.0, "1": 1.0, "unverified": 2}),
        # every class everywhere: class 0 ranks b (0.95, FP) before a's TP (0.9): 1/2; class 1 ranks a's
        # classless cell 2 (0.8, FP) before b's TP (0.7): 1/2
        ("all", {"map": 0.5, "0": 0.5, "1": 0.5, "unverified": 0}),
    ],
)
def test_score_a_file_by_hand(tmp_path, capsys, verified, expected):
    out = tmp_path / "score.json"
    argv = [str(_submission(tmp_path)), "--truth", str(_truth_folder(tmp_path)), "--split", "test"]
    assert score_main([*argv, "--verified", verified, "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["verified"] == verified and result["map"] == pytest.approx(expected["map"])
    assert result["ap"]["0"] == pytest.approx(expected["0"]) and result["ap"]["1"] == pytest.approx(
        expected["1"]
    )
    assert set(result["ap"]) == {str(c) for c in range(19)} and result["ap"]["2"] is None
    assert result["ignored"]["unverified"] == expected["unverified"]
    assert f"mAP {expected['map']:.4f}" in capsys.readouterr().out


def test_truth_images_without_rows_predict_nothing(tmp_path):
    # without --split, image c (class 0, no submission row) counts: class 0 recall stops at 1/2 -> 0.5
    out = tmp_path / "score.json"
    assert (
        main(
            ["score", str(_submission(tmp_path)), "--truth", str(_truth_folder(tmp_path)), "--json", str(out)]
        )
        == 0
    )
    result = json.loads(out.read_text())
    assert result["ap"]["0"] == pytest.approx(0.5) and result["map"] == pytest.approx(0.75)
    assert result["n_images"] == 3


def test_bad_input_is_one_line_naming_the_file_or_row(tmp_path, capsys):
    truth = _truth_folder(tmp_path)
    submission = _submission(tmp_path)
    (truth / "b_cells.png").unlink()
    assert score_main([str(submission), "--truth", str(truth)]) == 2
    assert "b_cells.png is missing" in capsys.readouterr().err
    truth = _truth_folder(tmp_path / "again")
    assert score_main([str(_submission(tmp_path, size=24)), "--truth", str(truth)]) == 2
    assert "row 0 (ID a)" in capsys.readouterr().err
    cells = pd.read_csv(truth / "cells.csv", dtype=str, keep_default_na=False)
    cells.loc[2, "Label"] = "1|x"
    cells.to_csv(truth / "cells.csv", index=False)
    assert score_main([str(submission), "--truth", str(truth)]) == 2
    assert "'x' is not a class index" in capsys.readouterr().err
    assert score_main([str(tmp_path / "none.csv"), "--truth", str(_truth_folder(tmp_path / "third"))]) == 2
    assert "no submission file" in capsys.readouterr().err
    cv2.imwrite(str(truth / "a_cells.png"), np.zeros((20, 20, 3), np.uint8))
    cells.loc[2, "Label"] = "1"
    cells.to_csv(truth / "cells.csv", index=False)
    assert score_main([str(submission), "--truth", str(truth)]) == 2
    assert "single-channel label image" in capsys.readouterr().err


def _with_an_empty_image(tmp_path, images_table: bool = True):
    """The truth folder above plus image e (split test): a label image without any cell, so no cells.csv
    row; its split only in images.csv. The submission predicts class 0 in e at 0.99."""
    truth = _truth_folder(tmp_path)
    cv2.imwrite(str(truth / "e_cells.png"), np.zeros((20, 20), np.uint16))
    if images_table:
        pd.DataFrame({"image_id": ["a", "b", "c", "e"], "split": ["test", "test", "train", "test"]}).to_csv(
            truth / "images.csv", index=False
        )
    submission = _submission(tmp_path)
    frame = pd.read_csv(submission, dtype=str)
    e = pd.DataFrame(
        {
            "ID": ["e"],
            "ImageWidth": ["20"],
            "ImageHeight": ["20"],
            "PredictionString": [f"0 0.99 {encode_mask(A == 1)}"],
        }
    )
    pd.concat([frame, e]).to_csv(submission, index=False)
    return truth, submission


@pytest.mark.parametrize(
    ("verified", "expected"),
    [
        # e has no cell, so no class is verified there: its prediction is ignored (a and b as above)
        ("image", {"map": 1.0, "0": 1.0, "1": 1.0}),
        # every class everywhere: class 0 ranks e (0.99, FP), b (0.95, FP), then a's TP (0.9): precision
        # 1/3 at the only hit; class 1 as above, 1/2 -> mAP 5/12
        ("all", {"map": 5 / 12, "0": 1 / 3, "1": 0.5}),
    ],
)
def test_a_truth_image_without_cells_is_still_a_truth_image(tmp_path, verified, expected):
    truth, submission = _with_an_empty_image(tmp_path)
    out = tmp_path / "score.json"
    argv = [str(submission), "--truth", str(truth), "--split", "test", "--verified", verified]
    assert score_main([*argv, "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["n_images"] == 3 and result["map"] == pytest.approx(expected["map"])
    assert [result["ap"]["0"], result["ap"]["1"]] == pytest.approx([expected["0"], expected["1"]])


def test_truth_folders_without_an_image_table_stay_readable(tmp_path, capsys):
    # a folder written before images.csv: splits come from cells.csv, as before
    out = tmp_path / "score.json"
    argv = [str(_submission(tmp_path)), "--truth", str(_truth_folder(tmp_path)), "--split", "test"]
    assert score_main([*argv, "--json", str(out)]) == 0
    assert json.loads(out.read_text())["n_images"] == 2
    # ... but an image without cells has no split there: selecting a split says how to give it one
    truth, submission = _with_an_empty_image(tmp_path / "empty", images_table=False)
    assert score_main([str(submission), "--truth", str(truth), "--split", "test"]) == 2
    error = capsys.readouterr().err
    assert "e_cells.png" in error and "images.csv" in error and error.count("\n") == 1
    # without --split every label image is a truth image, the empty one too: class 0 as in "all" above
    assert score_main([str(submission), "--truth", str(truth), "--verified", "all", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["n_images"] == 4
