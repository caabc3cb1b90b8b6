"""What a round of fold models leaves besides its predictions: the run record (``config.yaml``,
``lineage.json``, ``run.json``: seed, git commit, the labelled images the cache lacked), and its report
(attention maps of a few out-of-fold images, the one-line summary). Training computes; this module
records and shows."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pandas as pd

from weakcell.attention_maps import draw_attention_maps, pick_images
from weakcell.config import Config, save_config
from weakcell.distributed import is_main_process
from weakcell.lineage import Lineage, write_lineage
from weakcell.outputs import atomic_write_json, writing
from weakcell.sources import competition_rows
from weakcell.training_set import TrainingSet


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run_record(cfg: Config, data: TrainingSet) -> dict[str, object]:
    """``run.json`` of a run or round: seed, git commit, the labelled images the cache lacked and, with
    external sources, what each gave (images, cells, fold mode, intensity gain)."""
    record: dict[str, object] = {"seed": cfg.seed, "git_commit": git_commit()}
    if data.missing is not None:
        record["missing_images"] = data.missing.record()
    if data.sources is not None and len(data.sources) > 1:
        record["sources"] = [summary.record() for summary in data.sources]
    return record


def record_round(cfg: Config, data: TrainingSet, round_dir: Path, lineage: Lineage) -> None:
    """Write the settings a run or round trains with (``config.yaml``), what it is made from
    (``lineage.json``: ``weakcell.lineage``) and its ``run.json`` (main process)."""
    if not is_main_process():
        return
    with writing(round_dir / "config.yaml"):
        save_config(cfg, round_dir)
        write_lineage(round_dir, lineage)
    atomic_write_json(round_dir / "run.json", run_record(cfg, data))


def report_round(
    cfg: Config,
    data: TrainingSet,
    round_dir: Path,
    oof_image: pd.DataFrame,
    oof_cell: pd.DataFrame,
    metrics: dict[str, float],
) -> None:
    """Draw the attention maps of 8 out-of-fold images of the competition into ``round_dir/attention``
    and print the round's one-line summary."""
    own_images = competition_rows(oof_image, data.images)
    maps = draw_attention_maps(
        cfg.data_dir,
        data.spec.train_dir,
        data.cache,
        competition_rows(oof_cell, data.images),
        own_images,
        pick_images(own_images, data.images, n=8, seed=cfg.seed),
        round_dir / "attention",
        data.spec.classes,
        labels=data.images,
    )
    summary = ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if "map" in k or "f1" in k)
    print(
        f"train: {metrics['folds']} folds, {len(oof_image)} images, {len(oof_cell)} cells out of fold; {summary}; "
        f"{metrics['wall_seconds']:.0f} s -> {round_dir} (+ {len(maps)} attention maps)"
    )
