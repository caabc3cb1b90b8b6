"""``make thresholds``: one threshold per class, tuned on out-of-fold image predictions only.

Inference never tunes: it reads ``runs/<run>/thresholds.json`` (or, when ``image_level.csv`` is cut from the
whole-image model or the mean of both, ``infer.image_level``, the thresholds of that source:
``weakcell.combine.IMAGE_LEVELS``). Each class's threshold is the one that
maximises its OOF F1 on a grid, shrunk toward the one threshold that maximises macro-F1 over every class
(``thresholds.shrinkage``); a class with fewer than ``thresholds.min_positives`` OOF positives takes the
pooled threshold (a threshold fitted to two images is noise, and classes 11 and 18 are that rare).
With ``data.sources``, the OOF images of the competition's own set tune them (``thresholds.sources``): those
are the images inference predicts; ``all`` adds the folded external sources' OOF images.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from weakcell.combine import IMAGE_LEVELS, IMAGE_MODEL, MIL, image_level_probs, thresholds_file
from weakcell.config import Config, ThresholdsConfig
from weakcell.data.datasets import get_dataset
from weakcell.data.labels import to_multi_hot
from weakcell.errors import StageError
from weakcell.metrics import f1_per_class, predicted_classes
from weakcell.outputs import atomic_write_text, folder_lock, read_json
from weakcell.sources import COMPETITION, source_labels


def tune_thresholds(y_true: np.ndarray, probs: np.ndarray, tuning: ThresholdsConfig) -> pd.DataFrame:
    """Per class: the threshold to predict it at, its F1 there (in sample), the F1 at 0.5.

    Each class's own best grid threshold (ties: the lowest) is shrunk toward the one grid threshold that
    maximises macro-F1 over all classes, with weight ``positives / (positives + tuning.shrinkage)`` on the
    class's own: a class with 15 positives has a flat, jumpy F1 curve (its best threshold moved from 0.06
    to 0.43 between folds of the demo), the pooled one is fitted to every positive. A class with fewer than
    ``min_positives`` gets the pooled threshold (``fallback`` when ``shrinkage`` is 0: no pooling).
    y_true: (N, C) 0/1; probs: (N, C). Returns one row per class.
    """
    grid = np.arange(tuning.step, 1.0, tuning.step)  # (T,) candidate thresholds
    # (T, C) F1 of every class at every threshold, one vectorised pass per threshold
    f1 = np.stack([f1_per_class(y_true, predicted_classes(probs, t)) for t in grid])
    positives = y_true.sum(0)
    own = grid[f1.argmax(0)]  # first maximum = lowest threshold among ties
    tunable = positives >= tuning.min_positives
    # pooling needs a class to pool with: with none tunable the "pooled" best is the grid's lowest
    # threshold on a handful of images (every class predicted everywhere), so the fallback is used instead
    if tuning.shrinkage > 0 and tunable.any():
        present = positives > 0
        pooled = grid[f1[:, present].mean(1).argmax()] if present.any() else tuning.fallback
        weight = np.where(tunable, positives / (positives + tuning.shrinkage), 0.0)
        threshold = weight * own + (1.0 - weight) * pooled
    else:
        threshold = np.where(tunable, own, tuning.fallback)
    threshold = threshold.round(6)
    return pd.DataFrame(
        {
            "class": np.arange(y_true.shape[1]),
            "threshold": threshold,
            "f1": f1_per_class(y_true, predicted_classes(probs, threshold)),
            "f1_at_05": f1_per_class(y_true, predicted_classes(probs, 0.5)),
            "positives": positives.astype(int),
            "tuned": tunable,
        }
    )


def cross_fitted_f1(
    y_true: np.ndarray, probs: np.ndarray, folds: np.ndarray, tuning: ThresholdsConfig
) -> float:
    """Honest macro-F1 of tuning: thresholds tuned on the other folds' OOF rows, applied to each fold's
    own rows (tuning and scoring on the same rows flatters the tuned F1)."""
    predicted = np.zeros_like(y_true, dtype=bool)
    for fold in np.unique(folds):
        held_out = folds == fold
        table = tune_thresholds(y_true[~held_out], probs[~held_out], tuning)
        predicted[held_out] = predicted_classes(probs[held_out], table["threshold"].to_numpy())
    present = y_true.sum(0) > 0
    return float(f1_per_class(y_true, predicted)[present].mean())


def fallback_warning(table: pd.DataFrame, tuning: ThresholdsConfig) -> str | None:
    """A warning when more than half the classes could not be tuned (fewer than ``min_positives`` OOF
    positives): their thresholds are the pooled or fallback one, which says little about those classes."""
    untuned = table.loc[~table["tuned"]]
    if len(untuned) * 2 <= len(table):
        return None
    values = ", ".join(f"{t:g}" for t in sorted(untuned["threshold"].unique())[:3])
    return (
        f"{len(untuned)} of {len(table)} classes have fewer than thresholds.min_positives={tuning.min_positives} "
        f"out-of-fold positives and were not tuned (threshold {values}): train on more images, or lower "
        "thresholds.min_positives"
    )


def read_thresholds(path: str | Path) -> np.ndarray:
    """(C,) thresholds from a ``thresholds.json``."""
    table = read_json(path, "tune them again with `make thresholds`")["classes"]
    return np.array([row["threshold"] for row in sorted(table, key=lambda row: row["class"])])


def run(cfg: Config) -> pd.DataFrame:
    """Tune on ``runs/<name>/oof_image.parquet`` and write ``runs/<name>/thresholds.json`` (with
    ``infer.image_level``: the whole-image model's or the mean's, ``weakcell.combine.IMAGE_LEVELS``),
    holding the run folder's lock."""
    with folder_lock(cfg.run_dir, "thresholds", cfg.checks.lock_wait_s):
        return _tune(cfg)


def oof_images(cfg: Config) -> pd.DataFrame:
    """The out-of-fold image probabilities ``image_level.csv`` will be cut from (``infer.image_level``): the
    final round's MIL head (``oof_image.parquet``), the whole-image model's, or their mean per image."""
    run_dir = cfg.model_dir  # the final refinement round
    mil_path, model_path = run_dir / "oof_image.parquet", cfg.image_model_dir / "oof_image.parquet"
    mil = model = None
    reads = IMAGE_LEVELS[cfg.infer.image_level].reads
    if MIL in reads:
        if not mil_path.is_file():
            step = "make refine" if cfg.refine.rounds else "make train"
            raise FileNotFoundError(f"no out-of-fold predictions at {mil_path}; run `{step}` first")
        mil = pd.read_parquet(mil_path)
    if IMAGE_MODEL in reads:
        if not model_path.is_file():
            raise FileNotFoundError(
                f"no out-of-fold predictions at {model_path} (infer.image_level={cfg.infer.image_level}); run "
                "`make image-model` first"
            )
        model = pd.read_parquet(model_path)
    if mil is not None and model is not None:  # the mean: over the images both predicted out of fold
        both = set(mil["image_id"]) & set(model["image_id"])
        mil, model = mil[mil["image_id"].isin(both)], model[model["image_id"].isin(both)]
    first = mil if mil is not None else model
    assert first is not None  # image_level is one of the three (the schema's Literal)
    probs = image_level_probs(cfg, first, model)
    return probs.merge(first[["image_id", "fold"]], on="image_id", how="left", validate="one_to_one")


def _tune(cfg: Config) -> pd.DataFrame:
    spec = get_dataset(cfg.data.dataset)
    oof = oof_images(cfg)
    labels = source_labels(cfg, spec).set_index("ID")  # the competition's and every data.sources set's
    missing = sorted(set(oof["image_id"]) - set(labels.index))
    if missing:
        raise StageError(f"{len(missing)} OOF images are not in the label files, e.g. {missing[:3]}")
    if cfg.thresholds.sources == "competition":  # the images inference predicts are the competition's
        oof = oof[oof["image_id"].map(labels["source"]).eq(COMPETITION).to_numpy()]
    y_true = to_multi_hot(labels.loc[oof["image_id"], "labels"].tolist(), spec.n_classes)
    probs = oof[[f"p_{c}" for c in range(spec.n_classes)]].to_numpy()
    table = tune_thresholds(y_true, probs, cfg.thresholds)
    present = table["positives"] > 0
    summary = {
        "macro_f1_tuned": float(table.loc[present, "f1"].mean()),
        "macro_f1_tuned_cross_fitted": cross_fitted_f1(y_true, probs, oof["fold"].to_numpy(), cfg.thresholds),
        "macro_f1_at_05": float(table.loc[present, "f1_at_05"].mean()),
        "images": len(oof),
        "sources": cfg.thresholds.sources,
        "image_level": cfg.infer.image_level,
    }
    warning = fallback_warning(table, cfg.thresholds)
    payload = {
        "summary": summary,
        "warnings": [warning] if warning else [],
        "classes": table.to_dict(orient="records"),
    }
    target = thresholds_file(cfg, cfg.model_dir)  # infer.image_level's own file
    text = json.dumps(payload, indent=2, default=lambda v: v.item() if hasattr(v, "item") else v)
    atomic_write_text(target, text)
    with pd.option_context("display.width", 160):
        print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(
        f"thresholds: OOF macro-F1 {summary['macro_f1_tuned']:.3f} tuned (cross-fitted over folds "
        f"{summary['macro_f1_tuned_cross_fitted']:.3f}) vs {summary['macro_f1_at_05']:.3f} at 0.5 "
        f"({int(table['tuned'].sum())} of {len(table)} classes tuned, on {len(oof)} OOF images"
        f"{' of the competition' if cfg.data.sources and cfg.thresholds.sources == 'competition' else ''}) "
        f"-> {target}"
    )
    if warning:
        print(f"thresholds: WARNING: {warning}")
    return table


if __name__ == "__main__":
    from weakcell.cli import stage_main

    raise SystemExit(stage_main(run))
