"""``make evaluate``: how good a finished run is, on image and on cell level, with per-class plots.

Reads one round folder (``evaluate.round``; default the final refinement round, ``cfg.model_dir``) and,
when that round is the final one, the submission ``make infer`` wrote from it:

1. image level, on the round's OOF predictions: mAP, macro-F1 at 0.5, at the tuned thresholds of its
   ``thresholds.json`` and cross-fitted over folds (``thresholds.cross_fitted_f1``); classes without a
   positive are left out, as the thresholds stage does. On the synthetic set also the test split's
   image predictions (``pred_image.parquet``) against ``truth/test.csv``;
2. cell level, on the OOF predictions (synthetic set only): the cell AP of every score variant of
   ``scoring.cell_score_variants`` against the matched true cells (``cell_truth.cell_level_ap``: what
   ``metrics.json`` holds, per class);
3. cell level, the 2021 competition metric on the test split (synthetic set only): ``cell_level.csv``
   read back (every mask decoded) and scored against ``truth/`` with ``competition_metric``, and the
   alternative confidences of ``pred_cell.parquet`` on the cache's masks: the cell model alone, the
   image probability alone, their plain product, and the submitted confidence recomputed;
4. ``evaluation.json`` into the round folder and the report folder, ``reports/<name>/`` (a non-final
   round: ``reports/<name>/round<r>/``), with ``ap_per_class.png``, ``threshold_curves.png``,
   ``per_class.md`` + ``per_class.png`` and the attention maps of the best and worst OOF images by
   image-level BCE (``attention_best/``, ``attention_worst/``).

Everything up to the plots is a pure function (``image_level_scores``, ``per_class_table``,
``oof_cell_ap``, ``submission_cell_maps``, ``submission_cell_map``,
``evaluate_round``) that writes nothing, for stages such as an ablation grid to call.
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

from weakcell.cell_truth import cell_level_ap, read_true_mask
from weakcell.competition_metric import (
    label_detections,
    mask_overlaps,
    read_submission,
    score_found,
    submission_detections,
    truth_by_image,
)
from weakcell.config import Config, InferConfig, ThresholdsConfig
from weakcell.constants import READINGS, Verified, prob_columns
from weakcell.data.datasets import DatasetSpec
from weakcell.data.labels import to_multi_hot
from weakcell.errors import StageError
from weakcell.metrics import (
    f1_per_class,
    macro_f1,
    mean_average_precision,
    per_class_ap,
    predicted_classes,
)
from weakcell.scoring import ALTERNATIVES, cell_score_variants
from weakcell.submission import mask_pixels
from weakcell.thresholds import cross_fitted_f1, read_thresholds

if TYPE_CHECKING:  # train imports torch: loaded only when a stage needs the training set
    from weakcell.train import TrainingSet

# The OOF cell score shown per class in the plots and table: the confidence inference submits.
PLOTTED_VARIANT = "confidence"


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


def oof_cell_ap(
    oof_cell: pd.DataFrame,
    oof_image: pd.DataFrame,
    matches: pd.DataFrame,
    truth: pd.DataFrame,
    n_classes: int,
    infer: InferConfig | None = None,
    verified: Verified = "image",
) -> dict[str, np.ndarray]:
    """Per-class cell AP ``(C,)`` of every ``scoring.cell_score_variants`` score against the matched true
    cells under the metric's ``verified`` reading (their NaN-mean is ``metrics.json``'s
    ``cell_map_<variant>``)."""
    return {
        name: cell_level_ap(table, prob_columns(n_classes), matches, truth, verified)
        for name, table in cell_score_variants(oof_cell, oof_image, n_classes, infer).items()
    }


# -- cell level, the competition metric on a submission ----------------------------------------------


def other_reading(verified: Verified) -> Verified:
    """The reading of the metric that is not ``verified`` (the report shows both)."""
    return next(reading for reading in READINGS if reading != verified)


def read_cell_truth(
    data_dir: str | os.PathLike[str], image_ids: list[str], spec: DatasetSpec | None = None
) -> tuple[dict[str, np.ndarray], pd.DataFrame]:
    """True instance masks and ``image_id, cell_id, labels`` of the listed images of a synthetic set of
    layout ``spec`` (default the 2021 one; any split: ``truth/`` holds every image's cells)."""
    from weakcell.synthetic.truth import SPEC, read_truth

    truth = read_truth(data_dir, spec or SPEC)
    truth = truth[truth["image_id"].isin(image_ids)][["image_id", "cell_id", "labels"]]
    return {image_id: read_true_mask(data_dir, image_id) for image_id in image_ids}, truth


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
    keys = ("map", "ap", "n_gt", "n_tp", "n_predictions", "ignored", "n_ties", "n_images", "interval")
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
    synthetic truth of its images under each of ``readings``; with ``alternatives`` (True: every one of
    ``ALTERNATIVES``, or their names; ``pred_cell.parquet`` beside the CSV) also those confidences on the
    cache's masks (``masks_of``, default the run's cache), and ``masks_differ``. Masks are decoded and
    overlapped once, then scored under every reading. Returns ``{reading: {"verified", "submission":
    {...}, <alternative>: {...}, "masks_differ"}}``; ``bootstrap`` > 0 adds the 95% interval over that
    many resamples of the images to the ``interval_of`` entry. ``submission=False`` leaves the CSV's
    masks undecoded (rescoring another formula over the same predictions needs only the alternatives)."""
    from weakcell.data.datasets import get_dataset

    spec = get_dataset(cfg.data.dataset)
    if not spec.has_truth:
        raise StageError(f"{spec.name} has no per-cell truth: only the synthetic set can be scored per cell")
    folder = Path(folder) if folder is not None else submission_dir(cfg)
    csv_path = folder / "cell_level.csv"
    if not csv_path.is_file():
        raise FileNotFoundError(f"no {csv_path}; run `make infer` first")
    n = spec.n_classes
    image_ids = read_submission(csv_path)["ID"].tolist()
    true_masks, true_labels = read_cell_truth(cfg.data_dir, image_ids, spec)
    truth = truth_by_image(true_masks, true_labels, n)
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
        from weakcell.train import load_training_set

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
    per-class table (``per_class_table`` + the OOF and test cell AP where there is truth)."""
    spec, n = data.spec, data.n_classes
    notes: list[str] = []
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
    table = per_class_table(y_true, probs, thresholds, list(spec.classes))

    if data.truth is None or data.matches is None:
        notes.append(f"cell level skipped: {spec.name} has no per-cell truth (only the synthetic set has)")
    else:
        reading, other = cfg.evaluate.verified, other_reading(cfg.evaluate.verified)
        cell_ap = oof_cell_ap(oof_cell, oof_image, data.matches, data.truth, n, cfg.infer, reading)
        evaluation["cell_oof"] = {name: {"map": _nanmean(ap), "ap": ap} for name, ap in cell_ap.items()}
        other_ap = oof_cell_ap(oof_cell, oof_image, data.matches, data.truth, n, cfg.infer, other)
        evaluation["cell_oof_other"] = {name: {"map": _nanmean(ap)} for name, ap in other_ap.items()}
        evaluation["verified"] = {"default": reading, "other": other}
        evaluation["plotted_variant"] = PLOTTED_VARIANT
        table["cell_ap_oof"] = cell_ap[PLOTTED_VARIANT]

        submission = submission_dir(cfg)
        csv_path = submission / "cell_level.csv"
        if folder != cfg.model_dir:
            notes.append(f"test split skipped: {submission} holds the final round's predictions")
        elif not csv_path.is_file():
            notes.append(f"test split skipped: no {csv_path} (run `make infer`)")
        else:
            if csv_path.stat().st_mtime < (folder / "oof_image.parquet").stat().st_mtime:
                notes.append(f"{csv_path} is older than the round's OOF predictions: rerun `make infer`?")
            evaluation["submission"] = {"folder": str(submission), "split": cfg.infer.split}
            both = submission_cell_maps(cfg, submission, readings=(reading, other))
            evaluation["cell_test"], evaluation["cell_test_other"] = both[reading], both[other]
            table["cell_ap_test"] = evaluation["cell_test"]["submission"]["ap"]
            if (submission / "pred_image.parquet").is_file():
                evaluation["image_test"] = submission_image_scores(cfg, submission, thresholds)
            if evaluation["cell_test"].get("masks_differ"):
                notes.append(
                    f"{evaluation['cell_test']['masks_differ']} masks of {csv_path} are not cache cells: "
                    "the alternatives are scored on other masks than the submission"
                )
    evaluation["notes"] = notes
    return evaluation, table


def _nanmean(values: np.ndarray) -> float:
    values = np.asarray(values, dtype=np.float64)
    return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")


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


# -- reports ------------------------------------------------------------------------------------------


def image_bce(y_true: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """``(N,)`` mean binary cross-entropy over classes of each image's predictions (nats)."""
    p = np.clip(np.asarray(probs, dtype=np.float64), 1e-7, 1 - 1e-7)
    y = np.asarray(y_true, dtype=np.float64)
    return -(y * np.log(p) + (1 - y) * np.log(1 - p)).mean(1)


def best_and_worst(image_ids: list[str], losses: np.ndarray, n: int) -> tuple[list[str], list[str]]:
    """The ``n`` images of lowest and of highest loss (disjoint; the worst first in their list)."""
    order = np.argsort(losses, kind="stable")
    best = [image_ids[i] for i in order[:n]]
    worst = [image_ids[i] for i in order[::-1] if image_ids[i] not in best][:n]
    return best, worst


def _format(value: Any) -> str:
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.3f}"
    return str(value)


def markdown_table(table: pd.DataFrame) -> str:
    """A GitHub markdown table of ``table`` (floats to 3 decimals, NaN as -)."""
    lines = ["| " + " | ".join(map(str, table.columns)) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(_format(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def _write_text(text: str, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def summary_lines(evaluation: Mapping[str, Any]) -> list[str]:
    """The compact table printed at the end of the stage."""

    def f(value: Any) -> str:
        return "  -  " if value is None else f"{value:.3f}"

    image = evaluation["image_oof"]
    lines = [
        f"  image OOF  ({image['images']} images)   mAP {f(image['map'])}   macro-F1 @0.5 "
        f"{f(image['macro_f1_at_05'])}  tuned {f(image['macro_f1_tuned'])}  cross-fitted "
        f"{f(image['macro_f1_tuned_cross_fitted'])}"
    ]
    if "image_test" in evaluation:
        test = evaluation["image_test"]
        lines.append(
            f"  image test ({test['images']} images)    mAP {f(test['map'])}   macro-F1 @0.5 "
            f"{f(test['macro_f1_at_05'])}  tuned {f(test['macro_f1_tuned'])}"
        )
    readings = evaluation.get("verified", {})
    for key, title in (
        ("cell_oof", "cell OOF mAP (matched truth)"),
        ("cell_test", "cell test, competition mAP"),
    ):
        for suffix, reading in (("", readings.get("default")), ("_other", readings.get("other"))):
            if key + suffix in evaluation:
                scores = evaluation[key + suffix]
                parts = "  ".join(
                    f"{name} {f(v['map'])}" for name, v in scores.items() if isinstance(v, dict)
                )
                lines.append(f"  {title}, verified={reading}{'' if suffix else ' (default)'}:  {parts}")
    if readings:
        lines.append(
            "  (verified=image: the organisers' reading, a class is judged only in images with a true cell of "
            "it; verified=all: every class in every image)"
        )
    return lines


def write_report(
    cfg: Config,
    evaluation: dict[str, Any],
    table: pd.DataFrame,
    data: TrainingSet,
    oof_image: pd.DataFrame,
    oof_cell: pd.DataFrame,
    thresholds: np.ndarray | None,
    out_dir: Path,
) -> list[Path]:
    """Plots, the per-class table and the best/worst attention maps of one evaluated round; records the
    chosen images in ``evaluation["attention"]``. Returns the files written."""
    from weakcell import plots
    from weakcell.attention_maps import draw_attention_maps

    spec, n = data.spec, data.n_classes
    names = list(spec.classes)
    y_true = image_targets(oof_image["image_id"], data.images, n)
    probs = oof_image[prob_columns(n)].to_numpy(np.float64)
    label = f"{cfg.name}, round {evaluation['round']}"
    written = []

    bars = {"image AP (OOF)": table["image_ap"].to_numpy(float)}
    if "cell_ap_oof" in table:
        bars[f"cell AP (OOF, {PLOTTED_VARIANT})"] = table["cell_ap_oof"].to_numpy(float)
    if "cell_ap_test" in table:
        bars["cell AP (test, competition metric)"] = table["cell_ap_test"].to_numpy(float)
    written.append(plots.ap_bars(bars, names, out_dir / "ap_per_class.png", f"{label}: AP per class"))
    written.append(
        plots.threshold_curves(
            y_true,
            probs,
            thresholds,
            names,
            out_dir / "threshold_curves.png",
            step=cfg.thresholds.step,
            min_positives=cfg.thresholds.min_positives,
        )
    )
    at = "the tuned thresholds" if thresholds is not None else "0.5 (no thresholds.json)"
    title = f"{label}: OOF image predictions per class at {at}"
    legend = (
        "\n\ncell_ap_oof: OOF cell AP of the "
        f"{PLOTTED_VARIANT} score against the matched true cells; cell_ap_test: the competition metric "
        "(IoU >= 0.6) of cell_level.csv on the test split; both read the metric as "
        f"evaluate.verified={cfg.evaluate.verified}"
        if "cell_ap_oof" in table
        else ""
    )
    text = f"# {title}{legend}\n\n{markdown_table(table)}"
    written.append(_write_text(text, out_dir / "per_class.md"))
    shown = table.map(_format)
    shown["name"] = table["name"]  # whole names: the table's columns size to their text
    written.append(plots.table_figure(shown, out_dir / "per_class.png", title))

    ids = oof_image["image_id"].astype(str).tolist()
    best, worst = best_and_worst(ids, image_bce(y_true, probs), cfg.evaluate.attention_images)
    for group, chosen in (("best", best), ("worst", worst)):
        folder = out_dir / f"attention_{group}"
        for old in folder.glob("*.png"):  # a previous evaluation's picks
            old.unlink()
        if chosen:
            written += draw_attention_maps(
                cfg.data_dir,
                spec.train_dir,
                data.cache,
                oof_cell,
                oof_image,
                chosen,
                folder,
                names,
                labels=data.images,
            )
    evaluation["attention"] = {"ranked_by": "image-level BCE", "best": best, "worst": worst}
    return written


def run(cfg: Config) -> dict[str, Any]:
    """Score the evaluated round, write ``evaluation.json`` and the report, print a summary."""
    from weakcell.train import load_training_set

    start = time.perf_counter()
    round_ = evaluated_round(cfg)
    folder = cfg.round_dir(round_)
    oof_image, oof_cell, thresholds = read_round(folder)
    data = load_training_set(cfg)
    evaluation, table = score_round(cfg, folder, data, oof_image, oof_cell, thresholds)
    out_dir = report_dir(cfg, round_)
    write_report(cfg, evaluation, table, data, oof_image, oof_cell, thresholds, out_dir)
    evaluation["per_class"] = table.to_dict(orient="records")
    evaluation["seconds"] = round(time.perf_counter() - start, 1)
    payload = json.dumps(_jsonable(evaluation), indent=2)
    for target in (folder / "evaluation.json", out_dir / "evaluation.json"):
        _write_text(payload, target)
    print(f"evaluate: {cfg.name} round {round_} ({folder})")
    print("\n".join(summary_lines(evaluation)))
    for note in evaluation["notes"]:
        print(f"  note: {note}")
    k = len(evaluation["attention"]["best"])
    maps = f", attention_best/ + attention_worst/ ({k} maps each)" if k else ""
    print(
        f"evaluate: {evaluation['seconds']:.0f} s -> {folder / 'evaluation.json'}; {out_dir}/: evaluation.json, "
        f"ap_per_class.png, threshold_curves.png, per_class.md + .png{maps}"
    )
    return _jsonable(evaluation)


if __name__ == "__main__":
    from weakcell.cli import stage_main

    raise SystemExit(stage_main(run))
