"""``make refine``: pseudo-label refinement rounds on top of a trained run.

Round r reads round r-1's out-of-fold outputs (``cfg.round_dir(r - 1)``): every training cell was scored
by the fold model that never saw its image, so no image labels its own cells. ``pseudo_labels`` turns
those scores into per-cell targets by the rule documented in ``RefineConfig`` (the image's labels, the
cell's score relative to its image's best cell, the tuned per-class thresholds, MIL attention). Then each
fold's backbone is retrained on the selected cells (fine-tuned from round r-1's fold model by default) and
its MIL head retrained on the new embeddings, through the same ``train_round`` as round 0. Round r lives in
``runs/<name>/round<r>/`` with round 0's layout plus ``pseudo_labels.parquet``.
"""

from __future__ import annotations

import dataclasses
import json
from functools import partial

import numpy as np
import pandas as pd

from weakcell.config import Config, RefineConfig, changed_settings, save_config
from weakcell.constants import NEGATIVE, prob_columns
from weakcell.data.labels import to_multi_hot
from weakcell.errors import StageError
from weakcell.metrics import image_best
from weakcell.outputs import atomic_write, atomic_write_text, folder_lock, writing
from weakcell.thresholds import tune_thresholds
from weakcell.train import (
    RUNTIME_SETTINGS,
    TRAINING_SETTINGS,
    TrainingSet,
    cell_scores,
    check_missing,
    is_main_process,
    load_training_set,
    run_record,
    train_round,
    true_cell_targets,
)

# Refinement rounds are computed from the training settings and the rule; ``refine.rounds`` only says how
# many there are, and ``refine.epochs`` reaches the rounds through ``train.epochs``.
REFINE_SETTINGS = (*TRAINING_SETTINGS, "refine.", "thresholds.")
REFINE_RUNTIME = (*RUNTIME_SETTINGS, "refine.rounds")


def pseudo_labels(
    scores: np.ndarray,
    image_ids: np.ndarray,
    inherited: np.ndarray,
    attention: np.ndarray,
    thresholds: np.ndarray,
    rule: RefineConfig,
    negative: int | None = NEGATIVE,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-cell targets from out-of-fold scores.

    scores, attention: (N, C) per cell; image_ids: (N,) the image of each cell; inherited: (N, C) 0/1 image
    labels of each cell's image; thresholds: (C,) tuned image thresholds.
    Returns targets (N, C) float32 (NaN: a pair left out of the loss, ``rule.uncertain=ignore``) and
    trainable (N,) bool (False: the cell keeps no class and ``rule.unlabelled`` is ``drop``).
    ``negative``: the Negative class a cell that keeps no class is labelled with (``rule.unlabelled=negative``);
    None for a class table without one (2018): the cell stays trainable with an all-zero target.
    """
    best = image_best(scores, image_ids)  # (N, C)
    near_best = scores >= rule.relative * best
    if rule.negative_quantile is not None:
        near_best |= scores >= negative_floor(scores, inherited, rule.negative_quantile)[None, :]
    kept = (
        (inherited > 0)
        & near_best
        & (scores >= rule.threshold_scale * thresholds[None, :])
        & (attention >= rule.min_attention)
    )
    if rule.targets == "soft":
        targets = np.where(kept, np.clip(scores / np.maximum(best, 1e-12), 0.0, 1.0), 0.0)
    else:
        targets = kept.astype(np.float64)
    unlabelled = ~kept.any(axis=1)
    trainable = np.ones(len(scores), dtype=bool)
    if rule.unlabelled == "negative":
        if negative is not None:
            targets[unlabelled, negative] = 1.0
    else:
        trainable &= ~unlabelled
    if rule.uncertain == "ignore":
        targets[(inherited > 0) & ~kept] = np.nan  # the loss leaves these pairs out
    return targets.astype(np.float32), trainable


def negative_floor(scores: np.ndarray, inherited: np.ndarray, quantile: float) -> np.ndarray:
    """(C,) per class, the ``quantile`` of the scores of cells in images without that class.

    Those cells are known negatives, so a cell of a labelled image scoring above the floor is a positive
    with an estimated false-positive rate of ``1 - quantile``, however far it is below its image's best
    cell. Why: the relative rule alone keeps ever fewer cells per round once the best cells grow peaky
    (about a quarter of the true nucleoli and vesicle cells by round 2 of the demo). A class that every
    image has gets no floor (inf)."""
    floor = np.full(scores.shape[1], np.inf)
    for c in range(scores.shape[1]):
        negatives = scores[inherited[:, c] == 0, c]
        if len(negatives):
            floor[c] = np.quantile(negatives, quantile)
    return floor


def label_quality(
    predicted: np.ndarray, true: np.ndarray, negative: int | None = NEGATIVE
) -> dict[str, float]:
    """Precision and recall of the (cell, class) positives of ``predicted`` against ``true`` ((N, C) 0/1),
    over the localisation classes (Negative, if the table has it, is what is left over, not a finding)."""
    findings = np.arange(predicted.shape[1]) != negative
    predicted, true = predicted[:, findings] > 0.5, true[:, findings] > 0.5
    tp = float((predicted & true).sum())
    return {
        "precision": tp / max(float(predicted.sum()), 1.0),
        "recall": tp / max(float(true.sum()), 1.0),
    }


def round_targets(
    cfg: Config, data: TrainingSet, oof_cell: pd.DataFrame, oof_image: pd.DataFrame
) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """Pseudo-labels of every training cell from one round's OOF tables.

    Returns the ``pseudo_labels.parquet`` table (image_id, cell_id, p_* targets, trainable) and the same
    targets / trainable flags laid out by cache row, as ``TrainingSet`` holds them."""
    n_classes = data.n_classes
    images = data.images.set_index("image_id")
    y_image = to_multi_hot(images.loc[oof_image["image_id"], "labels"].tolist(), n_classes)
    thresholds = tune_thresholds(y_image, oof_image[prob_columns(n_classes)].to_numpy(), cfg.thresholds)[
        "threshold"
    ].to_numpy()
    inherited = to_multi_hot(images.loc[oof_cell["image_id"], "labels"].tolist(), n_classes)
    targets, trainable = pseudo_labels(
        cell_scores(cfg.refine.score, oof_cell, oof_image, n_classes, cfg.infer),
        oof_cell["image_id"].to_numpy(),
        inherited,
        oof_cell[prob_columns(n_classes, "att_")].to_numpy(),
        thresholds,
        cfg.refine,
        data.spec.negative,
    )
    table = oof_cell[["image_id", "cell_id"]].reset_index(drop=True)
    table = table.assign(**dict(zip(prob_columns(n_classes), targets.T)), trainable=trainable)

    row_of = pd.Series(
        data.cells.index, index=pd.MultiIndex.from_arrays([data.cells["image_id"], data.cells["cell_id"]])
    )
    rows = row_of.reindex(pd.MultiIndex.from_arrays([table["image_id"], table["cell_id"]]))
    if rows.isna().any():
        raise StageError(
            "the previous round's OOF cells are not the cache's training cells; the cache was rebuilt "
            "after training: retrain the run (make train FORCE=1)"
        )
    by_row = np.zeros_like(data.cell_targets)
    by_row[rows.to_numpy(np.int64)] = targets
    trainable_by_row = np.zeros(len(data.cell_targets), dtype=bool)
    trainable_by_row[rows.to_numpy(np.int64)] = trainable
    return table, by_row, trainable_by_row


def run(cfg: Config) -> list[dict[str, float]]:
    """Refinement rounds 1..``refine.rounds`` of the run ``name`` (finished rounds are reused), holding the
    run folder's lock."""
    if cfg.refine.rounds == 0:
        print("refine: refine.rounds=0, nothing to do (inference reads the run itself)")
        return []
    with folder_lock(cfg.run_dir, "refine", cfg.checks.lock_wait_s):
        return _refine(cfg)


def _refine(cfg: Config) -> list[dict[str, float]]:
    # every round trains its backbone for refine.epochs; the rest of the training settings are the run's
    round_cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"epochs": cfg.refine.epochs})})
    data = load_training_set(cfg)
    if data.missing is not None:
        check_missing(cfg, data.missing, "refine")
    training = data.cells.index.to_numpy()
    truth = (
        true_cell_targets(data.cells, data.truth, data.matches, data.n_classes, data.spec.negative)
        if data.truth is not None and data.matches is not None
        else None
    )
    previous_targets = data.cell_targets[training]  # inherited labels: what round 1 changes
    results = []
    for round_ in range(1, cfg.refine.rounds + 1):
        before, out_dir = cfg.round_dir(round_ - 1), cfg.round_dir(round_)
        oof_paths = [before / "oof_cell.parquet", before / "oof_image.parquet"]
        if not all(path.is_file() for path in oof_paths):
            step = "make train" if round_ == 1 else f"refinement round {round_ - 1}"
            raise FileNotFoundError(f"no out-of-fold predictions in {before}; run {step} first")
        # each round saves and is checked against the rule it applies (``relative`` may change by round)
        this_round = round_cfg.model_copy(update={"refine": cfg.refine.for_round(round_)})
        differ = changed_settings(out_dir, this_round, include=REFINE_SETTINGS, exclude=REFINE_RUNTIME)
        if differ and not cfg.force:
            raise StageError(
                f"round {out_dir} was trained with other settings ({', '.join(differ[:6])}); redo it with "
                "FORCE=1 or give the run another name (name=...)"
            )
        table, targets, trainable = round_targets(
            this_round, data, pd.read_parquet(oof_paths[0]), pd.read_parquet(oof_paths[1])
        )
        new = targets[training]
        stats: dict[str, float] = {
            "round": round_,
            "labels_changed": int(((new > 0.5) != (previous_targets > 0.5)).sum()),
            "cells_relabelled": int(((new > 0.5) != (previous_targets > 0.5)).any(axis=1).sum()),
            "cells_trainable": int(trainable[training].sum()),
        }
        if truth is not None:
            stats.update({f"pseudo_{k}": v for k, v in label_quality(new, truth, data.spec.negative).items()})
            stats.update(
                {
                    f"inherited_{k}": v
                    for k, v in label_quality(data.cell_targets[training], truth, data.spec.negative).items()
                }
            )
        if is_main_process():
            with writing(out_dir / "config.yaml"):
                save_config(this_round, out_dir)
            atomic_write(out_dir / "pseudo_labels.parquet", partial(table.to_parquet, index=False))
            atomic_write_text(out_dir / "run.json", json.dumps(run_record(this_round, data), indent=2))
        init_dir = before if cfg.refine.init == "previous" else None
        metrics = train_round(
            this_round,
            dataclasses.replace(data, cell_targets=targets, trainable=trainable),
            out_dir,
            init_dir,
        )
        metrics = {**stats, **metrics}
        if is_main_process():
            (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        quality = (
            f"; pseudo-labels precision {stats['pseudo_precision']:.3f} recall {stats['pseudo_recall']:.3f} "
            f"(inherited {stats['inherited_precision']:.3f} / {stats['inherited_recall']:.3f})"
            if truth is not None
            else ""
        )
        print(
            f"refine: round {round_}: {stats['labels_changed']} cell labels changed in "
            f"{stats['cells_relabelled']} cells, {stats['cells_trainable']} cells trained on{quality} -> {out_dir}"
        )
        previous_targets = new
        results.append(metrics)
    return results


if __name__ == "__main__":
    from weakcell.cli import stage_main

    raise SystemExit(stage_main(run))
