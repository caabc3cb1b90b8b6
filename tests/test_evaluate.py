"""The evaluation stage: expected numbers are computed by hand from tiny hand-built cases (image labels,
label images, written submissions), then the whole stage runs once on a tiny synthetic pipeline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from tests.conftest import REPO
from weakcell import evaluate, evaluate_report, plots
from weakcell.competition_metric import score_submission, truth_by_image
from weakcell.config import load_config
from weakcell.data.datasets import get_dataset
from weakcell.submission import publish, write_cell_level

C = 19
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# -- image level ------------------------------------------------------------------------------------------

# 6 images, 3 classes. Class 0: positives 0, 1, 2; class 1: positive 4; class 2: no positive (left out).
Y_TRUE = np.array([[1, 0, 0], [1, 0, 0], [1, 0, 0], [0, 0, 0], [0, 1, 0], [0, 0, 0]])
PROBS = np.array(
    [[0.9, 0.1, 0.6], [0.6, 0.1, 0.6], [0.3, 0.1, 0.0], [0.4, 0.1, 0.0], [0.2, 0.45, 0.0], [0.1, 0.7, 0.0]]
)
THRESHOLDS = np.array([0.35, 0.4, 0.5])


def test_image_scores_by_hand():
    scores = evaluate.image_level_scores(Y_TRUE, PROBS, THRESHOLDS)
    # class 0 at 0.35 predicts images 0, 1, 3: TP 2, FP 1, FN 1 -> F1 4/6; class 1 at 0.4 predicts 4, 5:
    # TP 1, FP 1 -> F1 2/3. At 0.5: class 0 TP 2, FN 1 -> 4/5; class 1 predicts 5 only -> 0.
    assert scores["macro_f1_tuned"] == pytest.approx((4 / 6 + 2 / 3) / 2)
    assert scores["macro_f1_at_05"] == pytest.approx((4 / 5 + 0) / 2)
    # AP class 0: ranked T T F T -> (1 + 1 + 3/4) / 3; class 1: F T -> 1/2
    assert scores["map"] == pytest.approx(((1 + 1 + 0.75) / 3 + 0.5) / 2)
    assert scores["classes_scored"] == 2 and scores["images"] == 6
    assert scores["macro_f1_tuned_cross_fitted"] is None  # no folds given
    assert evaluate.image_level_scores(Y_TRUE, PROBS)["macro_f1_tuned"] is None
    perfect = evaluate.image_level_scores(Y_TRUE, Y_TRUE * 0.9 + 0.05, THRESHOLDS)
    assert perfect["map"] == 1.0 and perfect["macro_f1_tuned"] == 1.0


def test_per_class_table_counts():
    table = evaluate.per_class_table(Y_TRUE, PROBS, THRESHOLDS, ["a", "b", "c"]).set_index("class")
    assert table.loc[0, ["tp", "fp", "fn", "predicted", "positives"]].tolist() == [2, 1, 1, 3, 3]
    assert table.loc[0, "precision"] == pytest.approx(2 / 3) and table.loc[0, "recall"] == pytest.approx(
        2 / 3
    )
    assert table.loc[1, ["tp", "fp", "fn"]].tolist() == [1, 1, 0]
    # class 2 has no positive: 2 false positives, but recall, F1 and AP are undefined, not 0
    assert table.loc[2, "fp"] == 2 and table.loc[2, "precision"] == 0.0
    assert table.loc[2, ["recall", "f1", "image_ap"]].isna().all()
    assert table.loc[0, "name"] == "a"


def _write_round(folder, thresholds: np.ndarray | None) -> list[str]:
    """A fake round folder: OOF tables of the 6 images above (19 classes, the rest 0) + thresholds.json."""
    folder.mkdir(parents=True, exist_ok=True)
    ids = [f"img{i}" for i in range(len(Y_TRUE))]
    probs = np.zeros((len(ids), C))
    probs[:, :3] = PROBS
    oof_image = pd.DataFrame(probs, columns=[f"p_{c}" for c in range(C)]).assign(
        image_id=ids, fold=[0, 1, 0, 1, 0, 1]
    )
    oof_image.to_parquet(folder / "oof_image.parquet")
    pd.DataFrame({"image_id": ids, "cell_id": 1}).to_parquet(folder / "oof_cell.parquet")
    if thresholds is not None:
        full = np.full(C, 0.5)
        full[:3] = thresholds
        rows = [{"class": c, "threshold": float(t)} for c, t in enumerate(full)]
        (folder / "thresholds.json").write_text(json.dumps({"summary": {}, "classes": rows[::-1]}))
    return ids


def test_evaluate_round_on_a_fake_run_folder(tmp_path):
    from weakcell.training_set import TrainingSet

    cfg = load_config(
        None, [f"paths.root={tmp_path}", "data.dataset=hpa2021", "name=fake", "refine.rounds=0"]
    )
    ids = _write_round(cfg.run_dir, THRESHOLDS)
    labels = [list(np.flatnonzero(row)) or [18] for row in Y_TRUE]  # images without a class 0-2: Negative
    images = pd.DataFrame({"image_id": ids, "labels": labels, "fold": [0, 1, 0, 1, 0, 1]})
    data = TrainingSet(get_dataset("hpa2021"), None, pd.DataFrame(), images, np.zeros(0), None)
    result = evaluate.evaluate_round(cfg, data=data)
    image = result["image_oof"]
    # classes 0, 1 as above; class 18 (2 positives: images 3, 5, all probabilities 0) has F1 0
    assert image["macro_f1_tuned"] == pytest.approx((4 / 6 + 2 / 3 + 0) / 3)
    assert image["macro_f1_tuned_cross_fitted"] is not None and 0 <= image["macro_f1_tuned_cross_fitted"] <= 1
    assert result["round"] == 0 and "cell_oof" not in result and "cell_test" not in result
    assert any("no per-cell truth" in note for note in result["notes"])
    json.dumps(result, allow_nan=False)  # NaN became null: the file is strict JSON
    assert result["per_class"][2]["recall"] is None

    (cfg.run_dir / "thresholds.json").unlink()
    untuned = evaluate.evaluate_round(cfg, data=data)
    assert untuned["image_oof"]["macro_f1_tuned"] is None
    assert any("thresholds.json" in note for note in untuned["notes"])


def test_missing_round_fails_with_the_step_to_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="make train"):
        evaluate.read_round(tmp_path)


# -- cell level: the competition metric on written submissions -------------------------------------------


def _truth_mask() -> np.ndarray:
    """40x40: true cell 1 at rows/cols 0-9, true cell 2 at rows/cols 20-29."""
    mask = np.zeros((40, 40), np.int32)
    mask[:10, :10] = 1
    mask[20:30, 20:30] = 2
    return mask


def _pred_mask(cell2_pixels: int) -> np.ndarray:
    """Cell 1 exact; cell 2 the first ``cell2_pixels`` pixels of true cell 2 (column-major): IoU
    ``cell2_pixels / 100``."""
    mask = np.zeros((40, 40), np.int32)
    mask[:10, :10] = 1
    inside = np.zeros((10, 10), bool)
    inside.T.flat[:cell2_pixels] = True
    mask[20:30, 20:30][inside] = 2
    return mask


def _scores(image_id: str, cells: dict[int, dict[int, float]]) -> pd.DataFrame:
    rows = []
    for cell, probs in cells.items():
        row = {"image_id": image_id, "cell_id": cell, **{f"p_{c}": 0.0 for c in range(C)}}
        row.update({f"p_{c}": p for c, p in probs.items()})
        rows.append(row)
    return pd.DataFrame(rows)


def _sample(*image_ids: str) -> pd.DataFrame:
    return pd.DataFrame({"ID": list(image_ids), "ImageWidth": 40, "ImageHeight": 40, "PredictionString": ""})


def _score_file(path, true_masks, true_labels, verified="image") -> dict:
    return score_submission(path, truth_by_image(true_masks, true_labels, C), C, verified)


TRUE_LABELS = pd.DataFrame({"image_id": ["a", "a"], "cell_id": [1, 2], "labels": [[0], [1]]})


@pytest.mark.parametrize(("pixels", "expected"), [(100, 1.0), (61, 1.0), (59, 0.5)])
def test_written_submission_iou_threshold(tmp_path, pixels, expected):
    pred = _pred_mask(pixels)
    path = write_cell_level(
        _scores("a", {1: {0: 0.9}, 2: {1: 0.8}}), {"a": pred}.get, _sample("a"), tmp_path / "cell_level.csv"
    )
    result = _score_file(path, {"a": _truth_mask()}, TRUE_LABELS)
    # class 0 is always right; class 1's only prediction is a TP at IoU 0.61, a FP at 0.59
    assert result["map"] == pytest.approx(expected)
    assert result["ap"][0] == 1.0 and np.isnan(result["ap"][2:]).all()
    assert result["n_gt"][:2].tolist() == [1, 1]
    # 2 cells x the 2 classes of the image's true cells are judged; the other 17 classes are not verified
    assert result["n_predictions"] == 2 * 2 and result["ignored"]["unverified"] == 2 * (C - 2)


def test_classes_a_cell_does_not_list_are_no_prediction(tmp_path):
    # true cells 1 and 2 are both class 0; predicted cell 3 covers no true cell
    truth = _truth_mask()
    labels = pd.DataFrame({"image_id": ["a", "a"], "cell_id": [1, 2], "labels": [[0], [0]]})
    pred = truth.copy()
    pred[35:, 35:] = 3
    scores = _scores("a", {1: {0: 0.9}, 2: {0: 0.05}, 3: {0: 0.5}})
    path = write_cell_level(scores, {"a": pred}.get, _sample("a"), tmp_path / "cell_level.csv", min_score=0.1)
    result = _score_file(path, {"a": truth}, labels)
    # the file holds 0.9 (TP) and 0.5 (FP); cell 2's class 0 is below min_score, so not in it:
    # recall 1/2 at precision 1 -> AP 0.5 (scoring the missing pair as confidence 0 would give 0.833)
    assert result["ap"][0] == pytest.approx(0.5)
    assert result["n_predictions"] == 2 and result["n_tp"][0] == 1


def test_placeholder_row_is_dropped(tmp_path):
    # image b has no prediction: the sample's placeholder "0 1 <empty mask>" predicts class 0 at
    # confidence 1 with an empty mask, which the organisers' evaluator drops before matching
    truth_b = np.zeros((40, 40), np.int32)
    truth_b[5:15, 5:15] = 1
    labels = pd.concat([TRUE_LABELS, pd.DataFrame({"image_id": ["b"], "cell_id": [1], "labels": [[1]]})])
    path = write_cell_level(
        _scores("a", {1: {0: 0.9}, 2: {1: 0.8}}),
        {"a": _truth_mask()}.get,
        _sample("a", "b"),
        tmp_path / "cell_level.csv",
    )
    for reading in ("image", "all"):
        result = _score_file(path, {"a": _truth_mask(), "b": truth_b}, labels, reading)
        assert result["ap"][0] == pytest.approx(1.0)  # the TP at 0.9 alone; the placeholder is no FP
        assert result["ap"][1] == pytest.approx(0.5)  # 1 of 2 true class-1 cells found, at precision 1
        assert result["ignored"]["empty"] == 1


def test_distinct_confidences_stay_distinct_through_the_file(tmp_path):
    # neighbouring float32 values and values equal to 4 significant digits: each must read back exactly
    close = [0.5, float(np.nextafter(np.float32(0.5), np.float32(1))), 0.123451, 0.123452, 1e-9, 2e-9]
    cells = {1: dict(enumerate(close[:3])), 2: dict(enumerate(close[3:]))}
    path = write_cell_level(_scores("a", cells), {"a": _truth_mask()}.get, _sample("a"), tmp_path / "c.csv")
    tokens = pd.read_csv(path)["PredictionString"][0].split()
    written = {(int(label), float(conf)) for label, conf in zip(tokens[0::3], tokens[1::3])}
    expected = {(c, p) for probs in cells.values() for c, p in probs.items()}
    assert expected <= written  # exactly the floats that went in (the other classes are 0.0)
    assert len({conf for _, conf in written}) == len(close) + 1


def _synthetic_layout(tmp_path):
    """A synthetic-layout data folder with truth for image a, and a submission folder for it."""
    data_dir = tmp_path / "data"
    (data_dir / "truth").mkdir(parents=True)
    cv2.imwrite(str(data_dir / "truth" / "a_cells.png"), _truth_mask().astype(np.uint16))
    pd.DataFrame(
        {"image_id": ["a", "a"], "cell_id": [1, 2], "split": "test", "Label": ["0", "1"], "cell_line": "x"}
    ).to_csv(data_dir / "truth" / "cells.csv", index=False)
    cfg = load_config(None, [f"paths.root={tmp_path}", f"data.dir={data_dir}", "name=hand"])
    submission = tmp_path / "submissions" / "hand"
    # cell 1 is class 0, cell 2 class 1; the image probabilities alone cannot tell its cells apart
    cells = _scores("a", {1: {0: 0.9, 1: 0.2}, 2: {0: 0.3, 1: 0.8}})
    cells = cells.assign(**{f"image_{c}": 0.0 for c in range(C)}).assign(image_0=0.9, image_1=0.7)
    staging = tmp_path / "staging"  # published as one set, as infer does: evaluate reads nothing else
    staging.mkdir()
    cells.to_parquet(staging / "pred_cell.parquet")
    product = cells[["image_id", "cell_id"]].assign(
        **{f"p_{c}": cells[f"p_{c}"] * cells[f"image_{c}"] for c in range(C)}
    )
    write_cell_level(product, {"a": _truth_mask()}.get, _sample("a"), staging / "cell_level.csv")
    submission.mkdir(parents=True)
    publish(submission, {name: staging / name for name in ("pred_cell.parquet", "cell_level.csv")})
    return cfg, submission


def test_submission_cell_map_against_truth(tmp_path):
    cfg, submission = _synthetic_layout(tmp_path)
    result = evaluate.submission_cell_map(cfg, submission, masks_of={"a": _truth_mask()}.get)
    assert result["submission"]["map"] == 1.0 and result["masks_differ"] == 0
    assert set(evaluate.submission_cell_map(cfg, submission, alternatives=False)) == {
        "verified",
        "submission",
    }
    assert result["cell"]["map"] == 1.0 and result["cell_x_image"]["map"] == 1.0
    # every cell of an image gets the same image confidence: a tie, kept in input order, so class 1's
    # first prediction is cell 1 (FP), then cell 2 (TP): AP 1/2; class 0 ranks cell 1 first: AP 1
    assert result["image"]["ap"][:2] == pytest.approx([1.0, 0.5]) and result["image"]["map"] == 0.75
    # rescoring one formula: only it, without decoding the CSV (the image formula's AP as above)
    only = evaluate.submission_cell_maps(
        cfg,
        submission,
        {"a": _truth_mask()}.get,
        alternatives=("image",),
        readings=("image",),
        submission=False,
    )["image"]
    assert set(only) == {"verified", "image"} and only["image"]["map"] == 0.75
    other = _truth_mask()
    other[20:30, 25:30] = 0  # the cache's cell 2 is half of the submission's
    assert evaluate.submission_cell_map(cfg, submission, masks_of={"a": other}.get)["masks_differ"] == 1
    hpa = cfg.model_copy(update={"data": cfg.data.model_copy(update={"dataset": "hpa2021"})})
    with pytest.raises(ValueError, match="no per-cell truth"):
        evaluate.submission_cell_map(hpa, submission)


def test_rescored_ablation_rows_apply_min_score_as_the_submission_does(tmp_path, monkeypatch):
    from weakcell import ablate
    from weakcell.score import score_main

    # true cells 1 and 2 of image a are both class 0; the cell model gives class 0 0.9 to cell 1 and 0.3 to
    # cell 2, nothing else; infer.min_score 0.5 leaves 0.3 out of the file: recall 1/2 at precision 1 -> 0.5
    # (with the 0.3 in, both cells are found: 1.0)
    data_dir = tmp_path / "data"
    (data_dir / "truth").mkdir(parents=True)
    cv2.imwrite(str(data_dir / "truth" / "a_cells.png"), _truth_mask().astype(np.uint16))
    pd.DataFrame({"image_id": "a", "cell_id": [1, 2], "split": "test", "Label": "0"}).to_csv(
        data_dir / "truth" / "cells.csv", index=False
    )
    cfg = load_config(None, [f"paths.root={tmp_path}", f"data.dir={data_dir}", "infer.min_score=0.5"])
    staging, inferred = tmp_path / "staging", tmp_path / "submissions" / "shared"
    staging.mkdir()
    cells = _scores("a", {1: {0: 0.9}, 2: {0: 0.3}}).assign(**{f"image_{c}": 0.5 for c in range(C)})
    cells.to_parquet(staging / "pred_cell.parquet")
    # what infer writes for a row with these settings (the shared inference's own file, here the same
    # formula), published as infer does, and scored as `weakcell score` scores it
    write_cell_level(
        _scores("a", {1: {0: 0.9}, 2: {0: 0.3}}),
        {"a": _truth_mask()}.get,
        _sample("a"),
        staging / "cell_level.csv",
        cfg.infer.min_score,
    )
    inferred.mkdir(parents=True)
    publish(inferred, {name: staging / name for name in ("pred_cell.parquet", "cell_level.csv")})
    out = tmp_path / "own.json"
    argv = [str(inferred / "cell_level.csv"), "--truth", str(data_dir / "truth"), "--split", "test"]
    assert score_main([*argv, "--json", str(out)]) == 0
    assert json.loads(out.read_text())["map"] == pytest.approx(0.5)
    # a row rescored from another row's inference: the same predictions, the same min_score
    monkeypatch.setattr(evaluate, "_cache_masks", lambda cfg: {"a": _truth_mask()}.get)
    row = ablate.rows(1)[0]  # the inheritance row: confidence = the cell probability (image_power 0)
    scores = ablate.test_scores(cfg, row, "inheritance", inferred=inferred)
    assert scores["test_cell_map"] == pytest.approx(0.5)


# -- reports ---------------------------------------------------------------------------------------------


def _is_png(path) -> bool:
    return path.is_file() and path.stat().st_size > 1000 and path.read_bytes()[:8] == PNG_SIGNATURE


def test_plots_are_written_as_pngs(tmp_path):
    names = ["nucleoplasm", "membrane", "nothing"]
    ap = {"image": np.array([0.9, 0.5, np.nan]), "cell": np.array([0.7, 0.2, np.nan])}
    assert _is_png(plots.ap_bars(ap, names, tmp_path / "ap.png", "AP"))
    assert _is_png(
        plots.threshold_curves(Y_TRUE, PROBS, THRESHOLDS, names, tmp_path / "t.png", min_positives=2)
    )
    assert _is_png(plots.threshold_curves(Y_TRUE, PROBS, None, names, tmp_path / "untuned.png"))
    table = evaluate.per_class_table(Y_TRUE, PROBS, THRESHOLDS, names).map(evaluate_report._format)
    assert _is_png(plots.table_figure(table, tmp_path / "table.png", "per class"))
    assert not list(tmp_path.glob("*.tmp"))  # atomic writes leave no temporary file


def test_best_and_worst_images():
    losses = evaluate_report.image_bce(Y_TRUE, PROBS)
    # image 3 (no label; 0.4, 0.1, 0): -(log 0.6 + log 0.9) / 3; image 1 (class 0; 0.6, 0.1, 0.6):
    # -(log 0.6 + log 0.9 + log 0.4) / 3, the highest
    assert losses[3] == pytest.approx(-(np.log(0.6) + np.log(0.9)) / 3)
    assert losses[1] == pytest.approx(-(np.log(0.6) + np.log(0.9) + np.log(0.4)) / 3)
    best, worst = evaluate_report.best_and_worst([f"i{k}" for k in range(6)], losses, 2)
    assert best[0] == "i3" and worst[0] == "i1" and not set(best) & set(worst)
    best, worst = evaluate_report.best_and_worst(["x", "y", "z"], np.array([0.1, 0.3, 0.2]), 2)
    assert best == ["x", "z"] and worst == ["y"]  # disjoint when there are fewer than 2k images


def test_markdown_table():
    table = pd.DataFrame({"class": [0, 1], "f1": [0.5, np.nan]})
    assert evaluate_report.markdown_table(table).splitlines() == [
        "| class | f1 |",
        "|---|---|",
        "| 0 | 0.500 |",
        "| 1 | - |",
    ]


def test_stage_is_registered():
    from weakcell.cli import STAGES, _resolve

    assert _resolve(STAGES["evaluate"][0]) is evaluate.run


# -- the whole stage on a tiny synthetic pipeline --------------------------------------------------------


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    from tests.test_train import TINY
    from weakcell import folds, infer, thresholds, train
    from weakcell.cache import build
    from weakcell.synthetic import writer

    root = tmp_path_factory.mktemp("evaluate")
    cfg = load_config(None, [f"paths.root={root}", *TINY, "refine.rounds=0", "evaluate.attention_images=2"])
    for stage in (writer, folds, build, train, thresholds, infer):
        stage.run(cfg)
    return cfg, evaluate.run(cfg)


def _score_cli(path, truth, split: str, verified: str, out) -> dict:
    """``weakcell score`` in a process of its own, as a user runs it."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "weakcell", "score", str(path), "--truth", str(truth)]
    command += ["--split", split, "--verified", verified, "--json", str(out)]
    subprocess.run(command, check=True, cwd=REPO, env=env, capture_output=True)
    return json.loads(Path(out).read_text())


def test_stage_on_a_tiny_pipeline(evaluated, tmp_path):
    cfg, result = evaluated
    written = json.loads((cfg.run_dir / "evaluation.json").read_text())
    reports = cfg.path(cfg.paths.reports) / cfg.name
    assert json.loads((reports / "evaluation.json").read_text()) == written == result
    # out of fold: the file evaluate wrote holds every training image once, with the cache's cells as
    # masks and each cell's out-of-fold confidence (image_power 0: its probability), exactly
    oof_path = evaluate.submission_dir(cfg) / "oof_cell_level.csv"
    oof_file = pd.read_csv(oof_path, dtype=str)
    train_ids = pd.read_csv(cfg.data_dir / "train.csv", dtype=str)["ID"]
    assert oof_file["ID"].tolist() == sorted(train_ids)
    from weakcell.cache.store import CellCache

    cache = CellCache(cfg.cache_dir)
    cache_masks = {i: cache.masks(i).cells for i in train_ids}
    assert evaluate.masks_differ(oof_path, cache_masks) == 0
    oof_cell = pd.read_parquet(cfg.run_dir / "oof_cell.parquet")
    first = sorted(oof_cell["image_id"])[0]
    tokens = oof_file.set_index("ID").loc[first, "PredictionString"].split()
    probs = oof_cell.loc[oof_cell["image_id"] == first, [f"p_{c}" for c in range(C)]].to_numpy()
    assert sorted(map(float, tokens[1::3])) == sorted(probs.ravel().tolist())
    # ... and its score is the CLI's, to 1e-9, under both readings: evaluate's score of the file, the
    # in-memory score of the same confidences on the cache's cells, and training's metrics.json
    metrics = json.loads((cfg.run_dir / "metrics.json").read_text())
    for verified, key in (("image", "cell_oof"), ("all", "cell_oof_other")):
        cli = _score_cli(oof_path, cfg.data_dir / "truth", "train", verified, tmp_path / f"{verified}.json")
        assert cli["n_images"] == len(train_ids) and 0 < cli["map"] < 1
        assert abs(result[key]["submission"]["map"] - cli["map"]) <= 1e-9
        assert abs(result[key]["confidence"]["map"] - cli["map"]) <= 1e-9
    assert abs(metrics["cell_map_confidence"] - result["cell_oof"]["submission"]["map"]) <= 1e-9
    assert result["oof_submission"]["file"] == str(oof_path)
    assert result["image_oof"]["map"] == pytest.approx(metrics["image_map"])
    tuned = json.loads((cfg.run_dir / "thresholds.json").read_text())["summary"]
    assert result["image_oof"]["macro_f1_tuned"] == pytest.approx(tuned["macro_f1_tuned"])
    assert result["image_oof"]["macro_f1_tuned_cross_fitted"] == pytest.approx(
        tuned["macro_f1_tuned_cross_fitted"]
    )
    # the submission is the confidence formula of infer.*, written exactly: the same mAP as the
    # confidence recomputed from pred_cell.parquet, under both readings of the metric, and as the CLI
    test, other = result["cell_test"], result["cell_test_other"]
    cli = _score_cli(
        evaluate.submission_dir(cfg) / "cell_level.csv",
        cfg.data_dir / "truth",
        "test",
        "image",
        tmp_path / "t.json",
    )
    assert abs(test["submission"]["map"] - cli["map"]) <= 1e-9
    assert (test["verified"], other["verified"]) == ("image", "all") == tuple(result["verified"].values())
    assert test["masks_differ"] == 0 and 0 <= test["submission"]["map"] <= 1
    for reading in (test, other):
        assert reading["submission"]["map"] == pytest.approx(reading["confidence"]["map"], abs=1e-6)
        assert reading["submission"]["n_ties"] == 0
    assert "cell_oof_other" in result
    assert result["image_test"]["images"] == 3
    for name in ("ap_per_class.png", "threshold_curves.png", "per_class.png"):
        assert _is_png(reports / name)
    assert "| class | name |" in (reports / "per_class.md").read_text()
    for group in ("best", "worst"):
        maps = sorted((reports / f"attention_{group}").glob("*.png"))
        assert [p.stem for p in maps] == sorted(result["attention"][group]) and all(map(_is_png, maps))


def test_an_earlier_round_reports_apart_and_skips_the_test_split(evaluated, tmp_path):
    cfg, _ = evaluated
    # pretend the run has one refinement round: round 0 is then an earlier round
    later = cfg.model_copy(
        update={
            "refine": cfg.refine.model_copy(update={"rounds": 1}),
            "evaluate": cfg.evaluate.model_copy(update={"round": 0, "attention_images": 0}),
        }
    )
    assert evaluate.report_dir(later, 0) == cfg.path(cfg.paths.reports) / cfg.name / "round0"
    result = evaluate.evaluate_round(later)
    assert result["round"] == 0 and "cell_test" not in result and "cell_oof" in result
    assert "submission" not in result["cell_oof"]  # the OOF file is the final round's
    assert any("final round" in note for note in result["notes"])


def test_class_names_are_whole_in_the_threshold_panels(tmp_path, monkeypatch):
    """Issue 26: class names were cut in plots ("17 Vesicles and punctate cy"); they are wrapped now,
    each title inside the figure."""
    from weakcell.constants import HPA2021_CLASSES

    drawn = {}

    def keep(figure, path, dpi=plots.DPI, tight=False):
        drawn["figure"] = figure
        return path

    monkeypatch.setattr(plots, "save_figure", keep)
    names = [HPA2021_CLASSES[17], HPA2021_CLASSES[3], HPA2021_CLASSES[18]]
    plots.threshold_curves(Y_TRUE, PROBS, THRESHOLDS, names, tmp_path / "t.png", min_positives=2)
    figure = drawn["figure"]
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    renderer = FigureCanvasAgg(figure).get_renderer()
    titles = [ax.title for ax in figure.axes[:3]]
    for c, (title, name) in enumerate(zip(titles, names)):
        assert title.get_text().replace("\n", " ").startswith(f"{c} {name} (n=")
        box = title.get_window_extent(renderer)
        assert 0 <= box.x0 and box.x1 <= figure.bbox.width  # not cut at the figure's edge either


def test_a_run_of_some_folds_scores_its_own_images_only(evaluated, tmp_path):
    """A run that trained fold 0 alone (``train.folds``) lists fold 0's images in its OOF file and scores
    those: the other folds' images are not its to predict, so they are not counted as missed cells."""
    from weakcell import thresholds, train

    cfg, _ = evaluated
    cfg = cfg.model_copy(
        update={"name": "fold0-only", "train": cfg.train.model_copy(update={"folds": [0]})}
    )  # the same data, folds and cache as the fixture's run
    train.run(cfg)
    thresholds.run(cfg)
    result = evaluate.run(cfg)
    folds = pd.read_csv(cfg.folds_file, dtype={"ID": str}).set_index("ID")["fold"]
    oof_path = evaluate.submission_dir(cfg) / "oof_cell_level.csv"
    listed = pd.read_csv(oof_path, dtype=str)["ID"].tolist()
    assert listed == sorted(folds.index[folds == 0]) and len(listed) < len(folds)
    # the file's score is the in-memory score of the same confidences on fold 0, and the CLI's with
    # --listed-only; without it the CLI counts the other folds' true cells as missed: lower
    assert abs(result["cell_oof"]["submission"]["map"] - result["cell_oof"]["confidence"]["map"]) <= 1e-9
    assert any("--listed-only" in note for note in result["notes"])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    scores = {}
    for flags in ([], ["--listed-only"]):
        out = tmp_path / f"score{len(flags)}.json"
        command = [
            sys.executable,
            "-m",
            "weakcell",
            "score",
            str(oof_path),
            "--truth",
            str(cfg.data_dir / "truth"),
        ]
        command += ["--split", "train", "--json", str(out), *flags]
        subprocess.run(command, check=True, cwd=REPO, env=env, capture_output=True)
        scores[bool(flags)] = json.loads(out.read_text())
    assert scores[True]["n_images"] == len(listed) and scores[False]["n_images"] == len(folds)
    assert abs(scores[True]["map"] - result["cell_oof"]["submission"]["map"]) <= 1e-9
    assert scores[False]["map"] < scores[True]["map"]
