"""``make train``: K-fold weak supervision on the cell-crop cache, out-of-fold predictions per fold.

A round trains one fold model per fold k (images of fold k held out; ``weakcell.fold_model``: stage 1, the
cell model on inherited labels, then attention MIL over each image's cells) and concatenates their
out-of-fold tables into ``runs/<run>/oof_*.parquet`` (every image once), scored into ``metrics.json``.
Refinement rounds (``weakcell.refine``) are rounds too, on pseudo-labels. What training reads is
``weakcell.training_set``; what a round records and draws besides its predictions, ``weakcell.round_report``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from weakcell.config import Config
from weakcell.distributed import is_main_process
from weakcell.epoch_log import format_duration
from weakcell.errors import StageError
from weakcell.fold_model import fold_seconds, train_fold, write_parquet
from weakcell.lineage import Lineage, is_legacy, stale
from weakcell.models import resolve_weights_file
from weakcell.outputs import atomic_write_json, folder_lock, read_json
from weakcell.round_report import record_round, report_round
from weakcell.scoring import score_oof
from weakcell.training_set import TrainingSet, open_training_set, training_inputs


def run(cfg: Config) -> dict[str, float]:
    """Train every fold (or ``train.folds``), write OOF predictions and ``metrics.json`` into the run,
    holding the run folder's lock."""
    with folder_lock(cfg.run_dir, "train", cfg.checks.lock_wait_s):
        return _train(cfg)


def check_run(cfg: Config, lineage: Lineage, stage: str) -> None:
    """Refuse a run folder whose finished folds were made from other settings or data than ``lineage``
    (retraining would discard them: the user says so with FORCE=1 or another name)."""
    run_dir = cfg.run_dir
    differ = stale(run_dir, lineage, cfg)
    if differ:
        redo = "retrain it with FORCE=1 or give the new run another name (name=...)"
        if stage != "train":
            redo = "retrain it (make train FORCE=1) or refine a run trained on them (name=...)"
        raise StageError(
            f"run {run_dir} was trained with other settings or data ({', '.join(differ[:6])}); {redo}"
        )
    if is_legacy(run_dir):
        print(
            f"{stage}: {run_dir} has no lineage record (an older weakcell); its settings match, so it is "
            "taken as made from the current cache, folds and labels"
        )


def _train(cfg: Config) -> dict[str, float]:
    run_dir = cfg.run_dir
    lineage = Lineage.of("run", cfg, **training_inputs(cfg))
    if not cfg.force:  # finished folds are reused: only while what they were made from is the same
        check_run(cfg, lineage, "train")
    if cfg.model.pretrained_file is not None:  # a missing file stops before anything is written
        resolve_weights_file(str(cfg.rooted_weights().model.pretrained_file), cfg.model.backbone)
    data = open_training_set(cfg, "train")
    record_round(cfg, data, run_dir, lineage)
    return train_round(cfg, data, run_dir)


def train_round(
    cfg: Config,
    data: TrainingSet,
    run_dir: Path,
    init_dir: Path | None = None,
    fold_data: Callable[[int], TrainingSet] | None = None,
) -> dict[str, float]:
    """Every fold (or ``train.folds``) into ``run_dir``: OOF tables, ``metrics.json``, attention maps.

    fold_data: the training set fold k's model learns from (refinement: each fold its own pseudo-labels);
    default ``data`` for every fold."""
    start = time.perf_counter()
    folds = cfg.train.folds if cfg.train.folds is not None else data.validation_folds
    finished = [
        run_dir / f"fold{fold}" / name for fold in folds for name in ("oof_image.parquet", "oof_cell.parquet")
    ]
    saved = run_dir / "metrics.json"
    if not cfg.force and saved.is_file() and all(path.is_file() for path in finished):
        # a finished round: its tables, scores and maps are on disk already (reruns of make, the ablation)
        try:
            metrics = read_json(saved)
        except StageError:  # emptied or cut short: the folds are whole, only their scores are computed again
            print(f"train: {saved} is damaged; scoring the finished folds again")
        else:
            print(f"train: {run_dir} is finished ({len(folds)} folds), skipping (FORCE=1 redoes it)")
            return metrics
    results = []
    for position, fold in enumerate(folds):
        fold_started = time.perf_counter()
        results.append(train_fold(cfg, fold_data(fold) if fold_data else data, fold, run_dir, init_dir))
        left, seconds = len(folds) - position - 1, time.perf_counter() - fold_started
        if position == 0 and left and seconds > 1:  # a trained (not reused) first fold: an estimate
            print(
                f"train: fold {fold} took {format_duration(seconds)}; about {format_duration(seconds * left)} "
                f"left for {left} more fold(s)",
                flush=True,
            )
    oof_image = pd.concat([r[0] for r in results], ignore_index=True)
    oof_cell = pd.concat([r[1] for r in results], ignore_index=True)
    if oof_image["image_id"].duplicated().any():
        raise AssertionError("an image is out of fold in two folds: the folds file is inconsistent")
    write_parquet(oof_image, run_dir / "oof_image.parquet")
    write_parquet(oof_cell, run_dir / "oof_cell.parquet")
    metrics = score_oof(data, oof_image, oof_cell, cfg.infer, cfg.evaluate.verified)
    metrics.update(
        folds=len(folds),
        images=len(oof_image),
        cells=len(oof_cell),
        seconds=sum(fold_seconds(run_dir / f"fold{fold}") for fold in folds),  # training, reused folds too
        wall_seconds=time.perf_counter() - start,  # this call
    )
    if not is_main_process():
        return metrics
    atomic_write_json(run_dir / "metrics.json", metrics)
    report_round(cfg, data, run_dir, oof_image, oof_cell, metrics)
    return metrics


if __name__ == "__main__":
    from weakcell.cli import stage_main

    raise SystemExit(stage_main(run))
