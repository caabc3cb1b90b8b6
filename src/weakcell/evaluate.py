"""``make evaluate``: how good a finished run is, on image and on cell level, with per-class plots.

Reads one round folder (``evaluate.round``; default the final refinement round, ``cfg.model_dir``) and,
when that round is the final one, the submission ``make infer`` wrote from it:

1. image level, on the round's OOF predictions of the competition's images: mAP, macro-F1 at 0.5, at the
   tuned thresholds of its ``thresholds.json`` and cross-fitted over folds (``thresholds.cross_fitted_f1``);
   classes without a positive are left out, as the thresholds stage does. The OOF images of folded external
   sources (``data.sources``) get their own mAP and macro-F1 (``image_oof_sources``). On the synthetic set
   also the test split's image predictions (``pred_image.parquet``) against ``truth/test.csv``;
2. cell level, out of fold (synthetic set only), the 2021 competition metric throughout: every score
   variant of ``scoring.cell_score_variants`` on the cache's cells against the true cells of every
   training image (``cell_truth.CellTruth``: what ``metrics.json`` holds), and, for the final round,
   ``submissions/<run>/oof_cell_level.csv`` scored exactly as ``weakcell score ... --split train`` scores
   it (``score.score_file``; entry ``submission``). The stage writes that file first
   (``write_oof_submission``): every training image of the competition's once, each predicted by the fold
   model that did not see it, with the test submission's masks (the cache's label images), confidence
   formula and ``infer.min_score``. Evaluate writes it, not infer: it is a round's out-of-fold tables as a
   file, which only the evaluated round has (infer may blend other runs, runs per ablation row and in
   Kaggle kernels without those tables), and only where it is scored (a set with per-cell truth);
3. cell level, the 2021 competition metric on the test split (synthetic set only): ``cell_level.csv``
   read back (every mask decoded) and scored against ``truth/`` with ``competition_metric``, and the
   alternative confidences of ``pred_cell.parquet`` on the cache's masks: the cell model alone, the
   image probability alone, their plain product, and the submitted confidence recomputed. The folder
   must be one completely published inference (``submission.check_published``);
4. ``evaluation.json`` into the round folder and the report folder, ``reports/<name>/`` (a non-final
   round: ``reports/<name>/round<r>/``), with ``ap_per_class.png``, ``threshold_curves.png``,
   ``per_class.md`` + ``per_class.png`` and the attention maps of the best and worst OOF images by
   image-level BCE (``attention_best/``, ``attention_worst/``).

Everything up to the plots but ``write_oof_submission`` is a pure function (``image_level_scores``,
``per_class_table``, ``submission_cell_maps``, ``submission_cell_map``, ``evaluate_round``) that writes
nothing, for stages such as an ablation grid to call. The report (4.: plots, table, attention maps, the
printed summary) is ``weakcell.evaluate_report``.

Over 400 lines on purpose: what is left is the scoring of one round, the three parts above and
``score_round`` that assembles them into ``evaluation.json``; they share the round's tables and readings.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from weakcell.cell_truth import CellTruth, read_truth_folder
from weakcell.competition_metric import (
    label_detections,
    mask_overlaps,
    read_submission,
    score_found,
    submission_detections,
)
from weakcell.config import Config, ThresholdsConfig
from weakcell.constants import READINGS, Verified, prob_columns
from weakcell.data.labels import to_multi_hot
from weakcell.errors import StageError
from weakcell.evaluate_report import summary_lines, write_report, write_text
from weakcell.metrics import (
    f1_per_class,
    macro_f1,
    mean_average_precision,
    per_class_ap,
    predicted_classes,
)
from weakcell.outputs import folder_lock
from weakcell.rle import mask_pixels
from weakcell.score import score_file
from weakcell.scoring import ALTERNATIVES, SUBMITTED, cell_score_table, cell_score_variants, oof_cell_scores
from weakcell.sources import competition_rows, external_sources, source_rows
from weakcell.submission import check_published, write_cell_level
from weakcell.synthetic.truth import TRUTH
from weakcell.thresholds import cross_fitted_f1, read_thresholds

if TYPE_CHECKING:  # loaded only when a stage needs the training set
    from weakcell.training_set import TrainingSet

# The OOF cell score shown per class in the plots and table: the confidence inference submits.
PLOTTED_VARIANT = SUBMITTED
OOF_FILE = "oof_cell_level.csv"  # the training split's out-of-fold predictions, in submissions/<run>/
OOF_SPLIT = "train"  # the truth split the out-of-fold file is scored against


# -- image level --------------------------------------------------------------------------------------


def image_level_scores(
    y_true: np.ndarray,
    probs: np.ndarray,
    thresholds: np.ndarray | None = None,
    folds: np.ndarray | None = None,
    tuning: ThresholdsConfig | None = None,
) -> dict[str, float | int | None]:
    """mAP and macro-F1 (at 0.5, at ``thresholds``, cross-fitted over ``folds`` with ``tuning``'s grid)
    of image predictions; macro averages over the classes with a positive. y_true, probs: ``(N, C)``;
    thresholds: ``(C,)``, a class is predicted when ``prob >= threshold`` (as tuned). A score whose input
    is missing is None."""
    y_true = np.asarray(y_true)
    probs = np.asarray(probs, dtype=np.float64)
    cross_fitted = None
    if folds is not None and tuning is not None and len(np.unique(folds)) > 1:
        cross_fitted = cross_fitted_f1(y_true, probs, np.asarray(folds), tuning)
    return {
        "map": mean_average_precision(y_true, probs),
        "macro_f1_at_05": macro_f1(y_true, predicted_classes(probs, 0.5)),
        "macro_f1_tuned": None
        if thresholds is None
        else macro_f1(y_true, predicted_classes(probs, thresholds)),
        "macro_f1_tuned_cross_fitted": cross_fitted,
        "images": len(y_true),
        "classes_scored": int((y_true.sum(0) > 0).sum()),
    }


def per_class_table(
    y_true: np.ndarray, probs: np.ndarray, thresholds: np.ndarray | None, class_names: list[str] | tuple
) -> pd.DataFrame:
    """Confusion-style counts per class at ``thresholds`` (0.5 when None): positives, predicted, TP, FP,
    FN, precision, recall, F1, F1 at 0.5 and AP. Precision is NaN without predictions; recall, F1 and AP
    are NaN without positives (such a class is left out of every macro average)."""
    y_true = np.asarray(y_true).astype(bool)
    n_classes = y_true.shape[1]
    cut = np.full(n_classes, 0.5) if thresholds is None else np.asarray(thresholds, dtype=np.float64)
    predicted = predicted_classes(probs, cut)
    tp = (y_true & predicted).sum(0)
    fp = (~y_true & predicted).sum(0)
    fn = (y_true & ~predicted).sum(0)
    positives = y_true.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(tp + fp > 0, tp / (tp + fp), np.nan)
        recall = np.where(positives > 0, tp / positives, np.nan)
    return pd.DataFrame(
        {
            "class": np.arange(n_classes),
            "name": [class_names[c] if c < len(class_names) else str(c) for c in range(n_classes)],
            "positives": positives,
            "predicted": predicted.sum(0),
            "threshold": cut,
            "tp": tp,
            "fp": fp,
            "fn": fn,
            "precision": precision,
            "recall": recall,
            "f1": np.where(positives > 0, f1_per_class(y_true, predicted), np.nan),
            "f1_at_05": np.where(positives > 0, f1_per_class(y_true, predicted_classes(probs, 0.5)), np.nan),
            "image_ap": per_class_ap(y_true, np.asarray(probs, dtype=np.float64)),
        }
    )


def image_targets(image_ids: pd.Series | list[str], labels: pd.DataFrame, n_classes: int) -> np.ndarray:
    """``(N, C)`` 0/1 labels of ``image_ids`` from a table with ``image_id`` (or ``ID``) and ``labels``;
    raises when an image has no labels (predictions are joined by ID, never by row position)."""
    key = "image_id" if "image_id" in labels.columns else "ID"
    lookup = labels.drop_duplicates(key).set_index(key)["labels"]
    ids = pd.Index([str(i) for i in image_ids])
    missing = ids.difference(lookup.index)
    if len(missing):
        raise StageError(f"{len(missing)} predicted images have no labels, e.g. {list(missing[:3])}")
    return to_multi_hot(lookup.loc[ids].tolist(), n_classes)


def read_round(round_dir: str | os.PathLike[str]) -> tuple[pd.DataFrame, pd.DataFrame, np.ndarray | None]:
    """``oof_image``, ``oof_cell`` and the tuned thresholds (None without ``thresholds.json``) of a round."""
    round_dir = Path(round_dir)
    image_path, cell_path = round_dir / "oof_image.parquet", round_dir / "oof_cell.parquet"
    if not image_path.is_file() or not cell_path.is_file():
        raise FileNotFoundError(
            f"no out-of-fold predictions in {round_dir}; run `make train` (round 0) or `make refine` first"
        )
    thresholds_path = round_dir / "thresholds.json"
    thresholds = read_thresholds(thresholds_path) if thresholds_path.is_file() else None
    return pd.read_parquet(image_path), pd.read_parquet(cell_path), thresholds


# -- cell level, out of fold -------------------------------------------------------------------------


def oof_submission_rows(
    cfg: Config, data: TrainingSet, oof_image: pd.DataFrame, oof_cell: pd.DataFrame
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """What ``oof_cell_level.csv`` holds: the submitted confidence of every out-of-fold cell
    (``image_id, cell_id, p_*``, NaN below ``infer.min_score``) and the rows ``ID, ImageWidth,
    ImageHeight`` of every training image of the predicted folds whose size the cache knows, by image id.
    The competition's images only: a folded external source's OOF cells are not the competition's to score."""
    oof_image, oof_cell = competition_rows(oof_image, data.images), competition_rows(oof_cell, data.images)
    predictions = cell_score_table(SUBMITTED, oof_cell, oof_image, data.n_classes, cfg.infer)
    images = data.cache.images
    # the images of the folds this run predicted: a run of some folds (``train.folds``) leaves the others'
    # images out of the file instead of submitting them empty (scored as missed cells)
    predicted = data.images[data.images["fold"].isin(set(oof_image["fold"].tolist()))]
    images = images[images["image_id"].isin(predicted["image_id"]) & (images["width"] > 0)]
    images = competition_rows(images, data.images)
    images = images.drop_duplicates("image_id").sort_values("image_id")
    sample = pd.DataFrame(
        {
            "ID": images["image_id"].astype(str).to_numpy(),
            "ImageWidth": images["width"].to_numpy(),
            "ImageHeight": images["height"].to_numpy(),
        }
    )
    return predictions, sample


def write_oof_submission(
    cfg: Config, data: TrainingSet, oof_image: pd.DataFrame, oof_cell: pd.DataFrame
) -> Path:
    """``submissions/<run>/oof_cell_level.csv`` (``oof_submission_rows``), validated like the test file,
    holding the submission folder's lock (``make infer`` writes there too)."""
    predictions, sample = oof_submission_rows(cfg, data, oof_image, oof_cell)
    folder = submission_dir(cfg)
    with folder_lock(folder, "evaluate", cfg.checks.lock_wait_s):
        return write_cell_level(
            predictions,
            lambda image_id: data.cache.masks(image_id).cells,
            sample,
            folder / OOF_FILE,
            cfg.infer.min_score,
        )


# -- cell level, the competition metric on a submission ----------------------------------------------


def other_reading(verified: Verified) -> Verified:
    """The reading of the metric that is not ``verified`` (the report shows both)."""
    return next(reading for reading in READINGS if reading != verified)


def masks_differ(path: str | os.PathLike[str], cache_masks: Mapping[Any, np.ndarray]) -> int:
    """How many distinct non-empty masks of a cell-level file are not exactly one cell of the cache
    (0 = the submission used the cache's segmentation)."""
    differ = 0
    for image_id, width, height, text in read_submission(path).itertuples(index=False):
        labels = np.asarray(cache_masks.get(image_id, np.zeros((int(height), int(width)), np.int64)))
        labels_f = labels.ravel(order="F").astype(np.int64)
        areas = np.bincount(labels_f)
        ids = np.flatnonzero(areas[1:]) + 1
        for mask_text in set(text.split()[2::3]):
            pixels = mask_pixels(mask_text, int(height), int(width))
            if len(pixels):
                iou = mask_overlaps(pixels, labels_f, areas, ids)
                differ += int(not (iou.size and iou.max() >= 1.0 - 1e-9))
    return differ


def _result_json(result: Mapping[str, Any]) -> dict[str, Any]:
    keys = (
        "map",
        "ap",
        "n_gt",
        "n_tp",
        "n_predictions",
        "ignored",
        "n_ties",
        "n_images",
        "interval",
        "resampled",
        "resamples_key",
    )
    return {key: result[key] for key in keys if key in result}


def _cache_masks(cfg: Config) -> Callable[[str], np.ndarray]:
    from weakcell.cache.store import CellCache

    cache = CellCache(cfg.cache_dir)
    return lambda image_id: cache.masks(image_id).cells


def submission_dir(cfg: Config) -> Path:
    """Where ``make infer`` writes: ``submissions/<infer.output or name>/``."""
    return cfg.submission_dir


def submission_cell_maps(
    cfg: Config,
    folder: str | os.PathLike[str] | None = None,
    masks_of: Callable[[str], np.ndarray] | None = None,
    alternatives: bool | Collection[str] = True,
    readings: tuple[Verified, ...] = READINGS,
    bootstrap: int = 0,
    interval_of: str = "submission",
    submission: bool = True,
) -> dict[str, dict[str, Any]]:
    """The competition mAP of ``folder/cell_level.csv`` (default ``submission_dir(cfg)``) against the
    synthetic truth of the ``infer.split`` images (what ``make score`` scores) under each of ``readings``;
    with ``alternatives`` (True: every one of ``ALTERNATIVES``, or their names; ``pred_cell.parquet``
    beside the CSV) also those confidences on the cache's masks (``masks_of``, default the run's cache),
    and ``masks_differ``. Masks are decoded and overlapped once, then scored under every reading.
    Returns ``{reading: {"verified", "submission": {...}, <alternative>: {...}, "masks_differ"}}``;
    ``bootstrap`` > 0 adds the 95% interval over that many resamples of the images to the
    ``interval_of`` entry. ``submission=False`` leaves the CSV's masks undecoded (rescoring another
    formula over the same predictions needs only the alternatives)."""
    from weakcell.data.datasets import get_dataset

    spec = get_dataset(cfg.data.dataset)
    if not spec.has_truth:
        raise StageError(f"{spec.name} has no per-cell truth: only the synthetic set can be scored per cell")
    folder = Path(folder) if folder is not None else submission_dir(cfg)
    csv_path = folder / "cell_level.csv"
    if not csv_path.is_file():
        raise FileNotFoundError(f"no {csv_path}; run `make infer` first")
    check_published(csv_path)  # one complete inference's files, never an old CSV beside new tables
    n = spec.n_classes
    truth = read_truth_folder(cfg.data_dir / TRUTH, n, cfg.infer.split)
    found = {"submission": submission_detections(csv_path, truth)} if submission else {}
    extra: dict[str, Any] = {}
    cells_path = folder / "pred_cell.parquet"
    names = list(ALTERNATIVES) if alternatives is True else list(alternatives or ())
    if names and cells_path.is_file():
        cells = pd.read_parquet(cells_path)
        lookup = masks_of if masks_of is not None else _cache_masks(cfg)
        cache_masks = {i: np.asarray(lookup(i)) for i in cells["image_id"].unique()}
        if submission:
            extra["masks_differ"] = masks_differ(csv_path, cache_masks)
        cell = cells[prob_columns(n)].to_numpy(np.float64)
        image = cells[prob_columns(n, "image_")].to_numpy(np.float64)
        keys = cells[["image_id", "cell_id"]].reset_index(drop=True)
        for name in names:
            combined = ALTERNATIVES[name](cell, image, keys["image_id"].to_numpy(), cfg.infer)
            scores = keys.assign(**dict(zip(prob_columns(n), combined.T)))
            found[name] = label_detections(cache_masks, scores, truth, n)
    return {
        reading: {
            "verified": reading,
            **{
                name: _result_json(
                    score_found(f, truth, n, reading, bootstrap=bootstrap * (name == interval_of))
                )
                for name, f in found.items()
            },
            **extra,
        }
        for reading in readings
    }


def submission_cell_map(
    cfg: Config,
    folder: str | os.PathLike[str] | None = None,
    masks_of: Callable[[str], np.ndarray] | None = None,
    alternatives: bool | Collection[str] = True,
    verified: Verified | None = None,
) -> dict[str, Any]:
    """``submission_cell_maps`` under one reading (default ``evaluate.verified``)."""
    reading = verified or cfg.evaluate.verified
    return submission_cell_maps(cfg, folder, masks_of, alternatives, (reading,))[reading]


def submission_image_scores(
    cfg: Config, folder: str | os.PathLike[str], thresholds: np.ndarray | None
) -> dict[str, Any]:
    """Image-level scores of ``folder/pred_image.parquet`` against the synthetic set's image labels."""
    from weakcell.data.datasets import get_dataset
    from weakcell.synthetic.truth import read_image_labels

    spec = get_dataset(cfg.data.dataset)
    n = spec.n_classes
    check_published(Path(folder) / "pred_image.parquet")
    predictions = pd.read_parquet(Path(folder) / "pred_image.parquet")
    y_true = image_targets(predictions["image_id"], read_image_labels(cfg.data_dir, spec), n)
    return image_level_scores(y_true, predictions[prob_columns(n)].to_numpy(), thresholds)


# -- one round ----------------------------------------------------------------------------------------


def evaluated_round(cfg: Config) -> int:
    """``evaluate.round``, or the final refinement round."""
    return cfg.refine.rounds if cfg.evaluate.round is None else cfg.evaluate.round


def report_dir(cfg: Config, round_: int | None) -> Path:
    """``reports/<name>/`` for the final round, ``reports/<name>/round<r>/`` for an earlier one."""
    base = cfg.path(cfg.paths.reports) / cfg.name
    return base if round_ in (None, cfg.refine.rounds) else base / f"round{round_}"


def _round_of(cfg: Config, folder: Path) -> int | None:
    """The refinement round a folder holds (``cfg.round_dir`` inverted); None for another folder."""
    if folder == cfg.run_dir:
        return 0
    digits = folder.name.removeprefix("round")
    return int(digits) if folder.parent == cfg.run_dir and digits.isdigit() else None


def evaluate_round(
    cfg: Config, round_dir: str | os.PathLike[str] | None = None, data: TrainingSet | None = None
) -> dict[str, Any]:
    """Every score of one round folder (default: that of ``evaluate.round``), JSON-ready; writes nothing.

    ``data``: the run's ``TrainingSet`` when the caller has it (matching segmented to true cells takes
    seconds). The test split is scored only for the final round, the one ``make infer`` predicts with.
    """
    folder = Path(round_dir) if round_dir is not None else cfg.round_dir(evaluated_round(cfg))
    oof_image, oof_cell, thresholds = read_round(folder)
    if data is None:
        from weakcell.training_set import load_training_set

        data = load_training_set(cfg)
    evaluation, table = score_round(cfg, folder, data, oof_image, oof_cell, thresholds)
    return _jsonable({**evaluation, "per_class": table.to_dict(orient="records")})


def score_round(
    cfg: Config,
    folder: Path,
    data: TrainingSet,
    oof_image: pd.DataFrame,
    oof_cell: pd.DataFrame,
    thresholds: np.ndarray | None,
) -> tuple[dict[str, Any], pd.DataFrame]:
    """The scores of one round's OOF tables (and of the submission, for the final round) and the
    per-class table (``per_class_table`` + the OOF and test cell AP where there is truth). Scored on the
    competition's images; the OOF images of folded external sources get their own image scores
    (``image_oof_sources``: how well the model reads each source, not the competition's figure)."""
    spec, n = data.spec, data.n_classes
    notes: list[str] = []
    by_source = {}
    for source in external_sources(data.images):
        own = source_rows(oof_image, data.images, source)
        if len(own):
            y_source = image_targets(own["image_id"], data.images, n)
            by_source[source] = image_level_scores(y_source, own[prob_columns(n)].to_numpy(np.float64))
    oof_image, oof_cell = competition_rows(oof_image, data.images), competition_rows(oof_cell, data.images)
    y_true = image_targets(oof_image["image_id"], data.images, n)
    probs = oof_image[prob_columns(n)].to_numpy(np.float64)
    if thresholds is None:
        notes.append(f"no {folder / 'thresholds.json'}: tuned F1 skipped (run `make thresholds`)")
    evaluation: dict[str, Any] = {
        "run": cfg.name,
        "round": _round_of(cfg, folder),
        "round_dir": str(folder),
        "image_oof": image_level_scores(
            y_true, probs, thresholds, oof_image["fold"].to_numpy(), cfg.thresholds
        ),
    }
    if by_source:
        evaluation["image_oof_sources"] = by_source
    table = per_class_table(y_true, probs, thresholds, list(spec.classes))

    if data.cell_truth is None:
        notes.append(f"cell level skipped: {spec.name} has no per-cell truth (only the synthetic set has)")
    else:
        reading, other = cfg.evaluate.verified, other_reading(cfg.evaluate.verified)
        evaluation.update(oof_cell_evaluation(cfg, folder, data.cell_truth, oof_image, oof_cell, notes))
        evaluation["verified"] = {"default": reading, "other": other}
        evaluation["plotted_variant"] = PLOTTED_VARIANT
        table["cell_ap_oof"] = evaluation["cell_oof"][PLOTTED_VARIANT]["ap"]
        evaluation.update(test_cell_evaluation(cfg, folder, thresholds, notes))
        if "cell_test" in evaluation:
            table["cell_ap_test"] = evaluation["cell_test"]["submission"]["ap"]
    evaluation["notes"] = notes
    return evaluation, table


def oof_cell_evaluation(
    cfg: Config,
    folder: Path,
    truth: CellTruth,
    oof_image: pd.DataFrame,
    oof_cell: pd.DataFrame,
    notes: list[str],
) -> dict[str, Any]:
    """``cell_oof`` / ``cell_oof_other``: the competition metric of every OOF cell score variant under
    ``evaluate.verified`` and the other reading, and for the final round (``submission``) of
    ``oof_cell_level.csv`` scored as ``weakcell score`` scores it. Appends to ``notes``."""
    reading, other = cfg.evaluate.verified, other_reading(cfg.evaluate.verified)
    variants = cell_score_variants(oof_cell, oof_image, truth.n_classes, cfg.infer)
    folds = set(oof_image["fold"].tolist())
    both = oof_cell_scores(variants, truth, (reading, other), folds)
    result: dict[str, Any] = {
        "cell_oof": {name: _result_json(scores) for name, scores in both[reading].items()},
        "cell_oof_other": {name: {"map": scores["map"]} for name, scores in both[other].items()},
    }
    oof_path = submission_dir(cfg) / OOF_FILE
    if folder != cfg.model_dir:
        notes.append(f"{oof_path} not scored: it holds the final round's out-of-fold predictions")
    elif not oof_path.is_file():
        notes.append(f"{oof_path} not scored: `make evaluate` writes it")
    else:
        if oof_path.stat().st_mtime < (folder / "oof_image.parquet").stat().st_mtime:
            notes.append(f"{oof_path} is older than the round's OOF predictions: rerun `make evaluate`")
        # a run of some folds lists only their images: score those (what `weakcell score --listed-only` does)
        some_folds = bool({image.fold for image in truth.images.values()} - folds)
        scored = score_file(
            oof_path,
            cfg.data_dir / TRUTH,
            truth.n_classes,
            OOF_SPLIT,
            (reading, other),
            listed_only=some_folds,
        )
        if some_folds:
            notes.append(
                f"{oof_path} holds the images of folds {sorted(folds)} (the folds this run trained), "
                "scored on those alone (`weakcell score --listed-only`)"
            )
        result["cell_oof"]["submission"] = _result_json(scored[reading])
        result["cell_oof_other"]["submission"] = {"map": scored[other]["map"]}
        result["oof_submission"] = {"file": str(oof_path), "truth_split": OOF_SPLIT}
    return result


def test_cell_evaluation(
    cfg: Config, folder: Path, thresholds: np.ndarray | None, notes: list[str]
) -> dict[str, Any]:
    """``cell_test`` / ``cell_test_other`` (``submission_cell_maps`` of the final round's submission) and
    ``image_test``; empty for an earlier round or without ``cell_level.csv``. Appends to ``notes``."""
    reading, other = cfg.evaluate.verified, other_reading(cfg.evaluate.verified)
    submission = submission_dir(cfg)
    csv_path = submission / "cell_level.csv"
    if folder != cfg.model_dir:
        notes.append(f"test split skipped: {submission} holds the final round's predictions")
        return {}
    if not csv_path.is_file():
        notes.append(f"test split skipped: no {csv_path} (run `make infer`)")
        return {}
    if csv_path.stat().st_mtime < (folder / "oof_image.parquet").stat().st_mtime:
        notes.append(f"{csv_path} is older than the round's OOF predictions: rerun `make infer`?")
    both = submission_cell_maps(cfg, submission, readings=(reading, other))
    result: dict[str, Any] = {
        "submission": {"folder": str(submission), "split": cfg.infer.split},
        "cell_test": both[reading],
        "cell_test_other": both[other],
    }
    if (submission / "pred_image.parquet").is_file():
        result["image_test"] = submission_image_scores(cfg, submission, thresholds)
    if both[reading].get("masks_differ"):
        notes.append(
            f"{both[reading]['masks_differ']} masks of {csv_path} are not cache cells: "
            "the alternatives are scored on other masks than the submission"
        )
    return result


def _jsonable(value: Any) -> Any:
    """Plain JSON types: arrays to lists, numpy scalars to Python, NaN and inf to None."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return [_jsonable(v) for v in value.tolist()]
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def run(cfg: Config) -> dict[str, Any]:
    """Score the evaluated round, write ``evaluation.json`` and the report, print a summary; holds the
    run folder's lock (``evaluation.json`` goes into its round) and the report folder's."""
    round_ = evaluated_round(cfg)
    wait = cfg.checks.lock_wait_s
    with folder_lock(cfg.run_dir, "evaluate", wait), folder_lock(report_dir(cfg, round_), "evaluate", wait):
        return _evaluate(cfg, round_)


def _evaluate(cfg: Config, round_: int) -> dict[str, Any]:
    from weakcell.training_set import load_training_set

    start = time.perf_counter()
    folder = cfg.round_dir(round_)
    oof_image, oof_cell, thresholds = read_round(folder)
    data = load_training_set(cfg)
    # the OOF file where it can be scored (per-cell truth): at real scale writing it costs about 0.07 CPU s
    # per 2048² image (benchmarks/metric.md), which a set without truth would pay for nothing
    scored_here = folder == cfg.model_dir and data.cell_truth is not None
    oof_path = write_oof_submission(cfg, data, oof_image, oof_cell) if scored_here else None
    evaluation, table = score_round(cfg, folder, data, oof_image, oof_cell, thresholds)
    oof_image, oof_cell = competition_rows(oof_image, data.images), competition_rows(oof_cell, data.images)
    out_dir = report_dir(cfg, round_)
    y_true = image_targets(oof_image["image_id"], data.images, data.n_classes)
    write_report(cfg, evaluation, table, data, oof_image, oof_cell, thresholds, y_true, out_dir)
    evaluation["per_class"] = table.to_dict(orient="records")
    evaluation["seconds"] = round(time.perf_counter() - start, 1)
    payload = json.dumps(_jsonable(evaluation), indent=2)
    for target in (folder / "evaluation.json", out_dir / "evaluation.json"):
        write_text(payload, target)
    print(f"evaluate: {cfg.name} round {round_} ({folder})")
    print("\n".join(summary_lines(evaluation)))
    for note in evaluation["notes"]:
        print(f"  note: {note}")
    k = len(evaluation["attention"]["best"])
    maps = f", attention_best/ + attention_worst/ ({k} maps each)" if k else ""
    oof = f"; {oof_path} (out of fold, validated)" if oof_path is not None else ""
    print(
        f"evaluate: {evaluation['seconds']:.0f} s -> {folder / 'evaluation.json'}; {out_dir}/: evaluation.json, "
        f"ap_per_class.png, threshold_curves.png, per_class.md + .png{maps}{oof}"
    )
    return _jsonable(evaluation)


if __name__ == "__main__":
    from weakcell.cli import stage_main

    raise SystemExit(stage_main(run))
