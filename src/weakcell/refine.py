"""``make refine``: pseudo-label refinement rounds on top of a trained run, leak-free.

Round r retrains fold k's model on pseudo-labels of the other folds' cells. Those labels come only from
models that never saw fold k's labels, directly or through earlier pseudo-labels. Taking them from the
other folds' out-of-fold models instead would be a stacking leak (fold k's labels -> fold j's model ->
fold j's pseudo-labels -> fold k's model), flattering every refined round's out-of-fold figures, the
thresholds tuned on them and the ablation. So refinement is nested:

- round 0's inner models: for each pair of folds {a, b}, both stages trained on the other folds with the
  run's own (inherited) labels, predicting folds a and b (``inner/fold<a>-<b>/``); outer folds a and b
  share it, so K(K-1)/2 models;
- round r's targets for outer fold k: the rule below applied to the predictions of fold k's inner models
  of round r-1 (fold j's cells from the model that held out both k and j), with the thresholds and
  negative floors the rule uses computed from those predictions alone;
- round r's fold k model: fine-tuned from round r-1's fold k model on those targets, predicting fold k
  out of fold exactly as round 0 does (``fold<k>/``, ``oof_*.parquet``);
- round r's inner models of outer fold k (only when a round r+1 follows): fold j held out besides k, on
  the same targets, fine-tuned from round r-1's inner model of (k, j) (``inner/fold<k>-<j>/``).

``pseudo_labels`` turns predictions into per-cell targets by the rule documented in ``RefineConfig``. A
rule that keeps every inherited label (the ablation's control) reads no prediction and trains no inner
model. Round r lives in ``runs/<name>/round<r>/`` with round 0's layout plus ``pseudo_labels.parquet``
(one row per outer fold and training cell of the other folds).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from weakcell.config import Config, RefineConfig, save_config
from weakcell.constants import NEGATIVE, prob_columns
from weakcell.data.labels import to_multi_hot
from weakcell.distributed import is_main_process
from weakcell.errors import StageError
from weakcell.fold_model import FoldModel, fold_seconds, train_model
from weakcell.lineage import Lineage, stale, write_lineage
from weakcell.outputs import atomic_parquet, atomic_write_json, folder_lock, writing
from weakcell.round_report import record_round
from weakcell.scoring import cell_scores, image_best
from weakcell.sources import competition_rows
from weakcell.thresholds import tune_thresholds
from weakcell.train import check_run, train_round
from weakcell.training_set import TrainingSet, open_training_set


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
    kept = (inherited > 0) & near_best & (scores >= rule.threshold_scale * thresholds[None, :])
    if rule.min_attention > 0:  # attention is NaN when the inner models skipped stage 2 (no limit to test)
        kept &= attention >= rule.min_attention
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


@dataclass(frozen=True)
class FoldTargets:
    """What the rule gives one outer fold's model: the ``pseudo_labels.parquet`` rows (image_id, cell_id,
    p_* targets, trainable) of the other folds' cells, and the same laid out by cache row as
    ``TrainingSet`` holds them (rows of fold k itself keep their inherited labels: never trained on)."""

    table: pd.DataFrame
    targets: np.ndarray  # (len(cache.cells), C)
    trainable: np.ndarray  # (len(cache.cells),) bool

    def applied(self, data: TrainingSet) -> TrainingSet:
        """``data`` training on these targets."""
        return dataclasses.replace(data, cell_targets=self.targets, trainable=self.trainable)


def fold_targets(
    rule_cfg: Config, data: TrainingSet, predictions: tuple[pd.DataFrame, pd.DataFrame] | None, outer: int
) -> FoldTargets:
    """Pseudo-labels of the cells of ``predictions`` (an ``oof_cell`` and an ``oof_image`` table from
    models that never saw the outer fold), thresholds and floors from those tables alone.

    predictions None: the rule reads no score (``RefineConfig.keeps_inherited``): every training cell of
    the folds but ``outer`` keeps its inherited labels."""
    n_classes, rule = data.n_classes, rule_cfg.refine
    images = data.images.set_index("image_id")
    if predictions is None:  # the other folds' cells, as the inner models would have predicted
        others = (data.cells["fold"] != outer) & (data.cells["fold"] >= 0)
        cells = data.cells.loc[others, ["image_id", "cell_id"]].reset_index(drop=True)
        scores = attention = np.ones((len(cells), n_classes))
        thresholds = np.zeros(n_classes)
    else:
        cells, image_table = predictions
        tuning = image_table  # the images whose predictions tune the thresholds, as make thresholds does
        if rule_cfg.thresholds.sources == "competition":
            tuning = competition_rows(image_table, data.images)
        y_image = to_multi_hot(images.loc[tuning["image_id"], "labels"].tolist(), n_classes)
        thresholds = tune_thresholds(
            y_image, tuning[prob_columns(n_classes)].to_numpy(), rule_cfg.thresholds
        )["threshold"].to_numpy()
        scores = cell_scores(rule.score, cells, image_table, n_classes, rule_cfg.infer)
        attention = cells[prob_columns(n_classes, "att_")].to_numpy()
    inherited = to_multi_hot(images.loc[cells["image_id"], "labels"].tolist(), n_classes)
    targets, trainable = pseudo_labels(
        scores, cells["image_id"].to_numpy(), inherited, attention, thresholds, rule, data.spec.negative
    )
    table = cells[["image_id", "cell_id"]].reset_index(drop=True)
    table = table.assign(**dict(zip(prob_columns(n_classes), targets.T)), trainable=trainable)

    row_of = pd.Series(
        data.cells.index, index=pd.MultiIndex.from_arrays([data.cells["image_id"], data.cells["cell_id"]])
    )
    rows = row_of.reindex(pd.MultiIndex.from_arrays([table["image_id"], table["cell_id"]]))
    if rows.isna().any():
        raise StageError(
            "the previous round's predicted cells are not the cache's training cells; the cache was rebuilt "
            "after training: retrain the run (make train FORCE=1)"
        )
    by_row = data.cell_targets.copy()
    by_row[rows.to_numpy(np.int64)] = targets
    trainable_by_row = np.zeros(len(data.cell_targets), dtype=bool)
    trainable_by_row[rows.to_numpy(np.int64)] = trainable
    # train-only images (fold -1) are held out by no model, so none predicts them out of fold: their cells
    # keep their inherited labels in every round (a model's in-sample predictions would relabel them
    # with what it memorised)
    trainable_by_row[data.cells.index[data.cells["fold"].to_numpy() < 0]] = True
    return FoldTargets(table, by_row, trainable_by_row)


def inner_plan(cfg: Config, round_: int, outer: int, inner: int) -> FoldModel:
    """The model of round ``round_`` that holds out ``outer`` and ``inner``: round 0's is shared by the
    pair (its labels are the inherited ones either way); later rounds' are outer fold ``outer``'s own
    (trained on its targets, fine-tuned from its round ``round_ - 1`` inner model)."""
    pair = tuple(sorted((outer, inner)))
    first, second = pair if round_ == 0 else (outer, inner)
    folder = cfg.round_dir(round_) / "inner" / f"fold{first}-{second}"
    init = inner_plan(cfg, round_ - 1, outer, inner).folder / "cell" / "model.pt" if round_ > 0 else None
    # seeds apart from the outer models' (seed + k) so that no two models of a run share one
    seed = cfg.seed + 1000 * (round_ + 1) + 10 * first + second
    init = init if cfg.refine.init == "previous" else None
    return FoldModel(pair, folder, seed, init, stage2=cfg.refine.reads_stage2)


def lacks_stage2(folder: Path) -> bool:
    """Whether a finished model's predictions were made without stage 2 (no attention)."""
    path = folder / "oof_cell.parquet"
    return path.is_file() and bool(pd.read_parquet(path, columns=["attention"])["attention"].isna().all())


def inner_predictions(
    round_cfg: Config, data: TrainingSet, round_: int, outer: int, folds: list[int]
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Predictions of every fold but ``outer`` from the round-``round_`` models that held out ``outer``
    (trained here when missing): fold j's images and cells from the model that held out j as well."""
    cells, images = [], []
    for inner in folds:
        if inner == outer:
            continue
        plan = inner_plan(round_cfg, round_, outer, inner)
        # an inner model trained under other settings (e.g. refine.inner_epochs) is redone, not reused; the
        # targets of later rounds' inner models are the round's, which its own lineage guards
        lineage = Lineage.of("run", round_cfg, **(data.inputs or {}))
        redo = bool(stale(plan.folder, lineage, round_cfg)) or (plan.stage2 and lacks_stage2(plan.folder))
        model_cfg = round_cfg.model_copy(update={"force": True}) if redo else round_cfg
        oof_image, oof_cell = train_model(model_cfg, data, plan)
        if is_main_process() and (redo or not (plan.folder / "lineage.json").is_file()):
            with writing(plan.folder / "config.yaml"):
                save_config(round_cfg, plan.folder)
                write_lineage(plan.folder, lineage)
        images.append(oof_image[oof_image["fold"] == inner])
        cells.append(oof_cell[oof_cell["fold"] == inner])
    return pd.concat(cells, ignore_index=True), pd.concat(images, ignore_index=True)


def run(cfg: Config) -> list[dict[str, float]]:
    """Refinement rounds 1..``refine.rounds`` of the run ``name`` (finished rounds are reused), holding the
    run folder's lock."""
    if cfg.refine.rounds == 0:
        print("refine: refine.rounds=0, nothing to do (inference reads the run itself)")
        return []
    with folder_lock(cfg.run_dir, "refine", cfg.checks.lock_wait_s):
        return _refine(cfg)


def round_config(cfg: Config, round_: int) -> Config:
    """The settings round ``round_`` trains with: round 0 is the run's own; every later round trains its
    backbone for ``refine.epochs`` under the rule it applies (``relative`` may change by round)."""
    if round_ == 0:
        return cfg
    train = cfg.train.model_copy(update={"epochs": cfg.refine.epochs})
    return cfg.model_copy(update={"train": train, "refine": cfg.refine.for_round(round_)})


def inner_config(cfg: Config, round_: int) -> Config:
    """The settings round ``round_``'s inner models train with: the round's, with ``refine.inner_epochs``."""
    inner = round_config(cfg, round_)
    if cfg.refine.inner_epochs is None:
        return inner
    return inner.model_copy(
        update={"train": inner.train.model_copy(update={"epochs": cfg.refine.inner_epochs})}
    )


def check_round(this_round: Config, out_dir: Path, previous: Lineage) -> Lineage:
    """The lineage of a round continuing ``previous`` (the run or the round before); a finished round made
    from anything else is refused in one line naming what changed, unless ``force``."""
    lineage = Lineage.of("refine", this_round, previous=previous.fingerprint)
    differ = stale(out_dir, lineage, this_round)
    if differ and not this_round.force:
        raise StageError(
            f"round {out_dir} was trained with other settings or data ({', '.join(differ[:6])}); redo it "
            "with FORCE=1 or give the run another name (name=...)"
        )
    return lineage


def _refine(cfg: Config) -> list[dict[str, float]]:
    data = open_training_set(cfg, "refine")
    all_folds = data.validation_folds
    outer_folds = cfg.train.folds if cfg.train.folds is not None else all_folds
    reads_scores = not cfg.refine.keeps_inherited
    if reads_scores and len(all_folds) < 3:
        raise StageError(
            f"refinement needs at least 3 folds to label each fold's training cells with models that never "
            f"saw that fold (nested); {cfg.folds_file} has {len(all_folds)}: make folds with folds.n_splits>=3"
        )
    truth = data.true_targets()
    if not (cfg.run_dir / "oof_cell.parquet").is_file():
        raise FileNotFoundError(f"no out-of-fold predictions in {cfg.run_dir}; run make train first")
    # the rounds continue the run as it is: one trained on other data or settings is not refined further
    upstream = Lineage.of("run", cfg, **(data.inputs or {}))
    check_run(cfg, upstream, "refine")
    previous: dict[int, FoldTargets] = {}  # round r-1's targets of each outer fold (round 0: inherited)
    results = []
    for round_ in range(1, cfg.refine.rounds + 1):
        this_round, before = round_config(cfg, round_), inner_config(cfg, round_ - 1)
        out_dir = cfg.round_dir(round_)
        lineage = check_round(this_round, out_dir, previous=upstream)
        current: dict[int, FoldTargets] = {}
        for outer in outer_folds:
            predictions = None
            if reads_scores:
                inner_data = data if round_ == 1 else previous[outer].applied(data)
                predictions = inner_predictions(before, inner_data, round_ - 1, outer, all_folds)
            current[outer] = fold_targets(this_round, data, predictions, outer)
        # what the inner models cost when they were trained (reused ones too), as fold_seconds counts
        inner_dirs = (cfg.round_dir(round_ - 1) / "inner").glob("fold*") if reads_scores else []
        inner_seconds = sum(fold_seconds(folder) for folder in inner_dirs)
        stats = round_stats(round_, data, current, truth)
        record_round(this_round, data, out_dir, lineage)
        if is_main_process():
            table = pd.concat([t.table.assign(model_fold=k) for k, t in current.items()], ignore_index=True)
            atomic_parquet(out_dir / "pseudo_labels.parquet", table)
        init_dir = cfg.round_dir(round_ - 1) if cfg.refine.init == "previous" else None
        per_fold = {k: t.applied(data) for k, t in current.items()}
        metrics = train_round(this_round, data, out_dir, init_dir, fold_data=per_fold.__getitem__)
        # a round's cost includes the inner models its targets came from (the ablation's train seconds);
        # from the folds' records, so a finished round read back is not counted twice
        outer_seconds = sum(fold_seconds(out_dir / f"fold{k}") for k in outer_folds)
        metrics = {
            **stats,
            **metrics,
            "outer_seconds": outer_seconds,
            "inner_seconds": inner_seconds,
            "seconds": outer_seconds + inner_seconds,
        }
        if is_main_process():
            atomic_write_json(out_dir / "metrics.json", metrics)
        quality = (
            f"; pseudo-labels precision {stats['pseudo_precision']:.3f} recall {stats['pseudo_recall']:.3f} "
            f"(inherited {stats['inherited_precision']:.3f} / {stats['inherited_recall']:.3f})"
            if truth is not None
            else ""
        )
        inner = f", inner models {inner_seconds:.0f} s" if reads_scores else ""
        print(
            f"refine: round {round_}: {stats['labels_changed']} inherited cell labels changed in "
            f"{stats['cells_relabelled']} cells over {len(current)} fold models, {stats['cells_trainable']} "
            f"cells trained on{quality}{inner} -> {out_dir}"
        )
        previous, upstream = current, lineage
        results.append(metrics)
    return results


def round_stats(
    round_: int, data: TrainingSet, targets: dict[int, FoldTargets], truth: np.ndarray | None
) -> dict[str, float]:
    """How far a round's pseudo-labels moved from the inherited ones, pooled over the outer folds (each
    training cell counted once per fold model that trains on it), and their quality against the true cell
    labels (synthetic)."""
    position = pd.Series(np.arange(len(data.cells)), index=data.cells.index)
    judged = pd.Series(data.has_truth, index=data.cells.index)  # external sources have no truth
    new, inherited, true, with_truth = [], [], [], []
    for fold_targets_ in targets.values():
        rows = data.cells.index[fold_targets_.trainable[data.cells.index]]
        new.append(fold_targets_.targets[rows])
        inherited.append(data.cell_targets[rows])
        with_truth.append(judged[rows].to_numpy())
        if truth is not None:
            true.append(truth[position[rows].to_numpy()])
    pseudo, kept = np.concatenate(new), np.concatenate(inherited)
    changed = (pseudo > 0.5) != (kept > 0.5)
    stats: dict[str, float] = {
        "round": round_,
        "labels_changed": int(changed.sum()),
        "cells_relabelled": int(changed.any(axis=1).sum()),
        "cells_trainable": len(pseudo),
    }
    if truth is not None:
        scored = np.concatenate(with_truth)
        true_labels, negative = np.concatenate(true)[scored], data.spec.negative
        pseudo, kept = pseudo[scored], kept[scored]
        stats.update({f"pseudo_{k}": v for k, v in label_quality(pseudo, true_labels, negative).items()})
        stats.update({f"inherited_{k}": v for k, v in label_quality(kept, true_labels, negative).items()})
    return stats


if __name__ == "__main__":
    from weakcell.cli import stage_main

    raise SystemExit(stage_main(run))
