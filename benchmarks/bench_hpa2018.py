"""The 2018 competition's claim, measured: "threshold tuning has a stronger impact than architectural
changes under imbalance" (the source design), on the 2018-flavoured synthetic benchmark.

Every variant trains round 0 (cells inherit image labels, then attention MIL; ``refine.rounds=0``) on the
same data, cache and folds (``configs/hpa2018-bench.yaml``: the 2018 demo's training images and settings,
1,000 test images), with the same epochs, batch and learning rate, once per seed of ``ablate.seeds``:

- baseline: the demo's backbone and plain BCE (round 0 of the config's own run);
- a second backbone (``--backbone``, default efficientnet_lite0) at the same budget, read both ways: the
  same epochs (about 3x the baseline's CPU time here), and the same training time (``--same-time-epochs``,
  default 4: the epochs at which it trains in the baseline's 12 epochs' time on this 2-core machine,
  measured 385 s vs 128 s per seed);
- the kit's class-imbalance options: ``train.loss=focal``, ``train.class_weights=sqrt_inverse``,
  ``train.sampler=balanced``;
- a whole-image model alone (``weakcell.image_model``: the 2018 winners' kind of model, no cells at all;
  ``infer.image_level=image_model``), at the config's stage-1 epochs (``whole_image``) and at the epochs at
  which it trains in about the baseline's time (``whole_image_same_time``, ``--whole-image-same-time-epochs``).
  Its OOF and test probabilities are the image model's fold ensemble, its thresholds tuned on its own OOF
  images, its ``train s`` the image model's training time.

For each: image macro-F1 of the out-of-fold images at 0.5 and with per-class thresholds cross-fitted over
the folds (tuned on the other folds' images, applied to each fold's), and of the test split at 0.5 and at
the thresholds tuned on all OOF images (``make thresholds``). The claim holds when tuning the baseline's
thresholds gains more than any variant gains over the baseline at 0.5, the margin paired by seed.

Then the cell level at the config's seed (``--no-cell-level`` skips it): the baseline, one nested
refinement round on it, and the oracle trained on the true cell labels, each through ``make evaluate``.
Last, ``configs/hpa2018.yaml``'s segmentation on the shared real images downscaled to the 2018 size.

    python benchmarks/bench_hpa2018.py [--config configs/hpa2018-bench.yaml] [--only NAME ...] [ARGS key=value]

Finished variants are reused (their runs are ``runs/<name>-<variant>[-seed<s>]/``). Writes
``benchmarks/hpa2018.md`` from every variant and seed that has finished, and their records to
``benchmarks/hpa2018.json`` (``--report-only`` rewrites the report from them), after each record. The
records of the previous call (that file) for the variants and seeds this call does not measure are kept, and
so is its cell-level table under ``--no-cell-level``: ``--only whole_image whole_image_same_time`` adds rows
without training the rest again.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from weakcell import ablate, ablate_report
from weakcell import evaluate as evaluate_stage
from weakcell import folds as folds_stage
from weakcell import image_model as image_model_stage
from weakcell import infer as infer_stage
from weakcell import refine as refine_stage
from weakcell import thresholds as thresholds_stage
from weakcell import train as train_stage
from weakcell.cache import build as cache_stage
from weakcell.config import Config, load_config
from weakcell.constants import prob_columns
from weakcell.data.datasets import get_dataset
from weakcell.data.images import list_image_ids, read_image
from weakcell.evaluate import image_level_scores, image_targets, submission_image_scores
from weakcell.segment import segment_image
from weakcell.segment.metrics import match_at_thresholds
from weakcell.synthetic import writer as data_stage
from weakcell.synthetic.truth import read_image_labels
from weakcell.thresholds import read_thresholds

REPO = Path(__file__).resolve().parents[1]
REAL_2021 = REPO.parent / "shared" / "data" / "hpa2021"
REAL_CONFIG = REPO / "configs" / "hpa2018.yaml"
SIZE_2018 = 512
BASELINE = "baseline"
WHOLE_IMAGE = "whole_image"
IMBALANCE = {
    "focal": ["train.loss=focal"],
    "class_weights": ["train.class_weights=sqrt_inverse"],
    "balanced_sampler": ["train.sampler=balanced"],
}


def variants(
    backbone: str, same_time_epochs: int = 4, epochs: int = 12, whole_image_same_time_epochs: int = 6
) -> dict[str, list[str]]:
    """Variant name -> its overrides on top of the config (round 0 only; ``epochs``: the config's stage-1
    epochs, which the whole-image model trains at equal epochs)."""
    whole_image = ["image_model.enabled=true", "infer.image_level=image_model"]
    return {
        BASELINE: [],
        f"backbone_{backbone}": [f"model.backbone={backbone}"],
        f"backbone_{backbone}_same_time": [f"model.backbone={backbone}", f"train.epochs={same_time_epochs}"],
        **IMBALANCE,
        WHOLE_IMAGE: [*whole_image, f"image_model.epochs={epochs}"],
        f"{WHOLE_IMAGE}_same_time": [*whole_image, f"image_model.epochs={whole_image_same_time_epochs}"],
    }


def variant_config(config: str, base: list[str], name: str, overrides: list[str], seed: int) -> Config:
    """The variant's config for one training seed: round 0 of run ``<name>-<variant>``, with ``-seed<s>``
    for a seed other than the config's. The baseline is the config's own run (its test predictions go to
    ``submissions/<run>-baseline``, beside, not over, the run's own submission)."""
    plain = load_config(config, base)
    run = plain.name if seed == plain.seed else f"{plain.name}-seed{seed}"
    own = [f"name={run}", f"infer.output={run}-{name}"] if name == BASELINE else [f"name={run}-{name}"]
    return load_config(config, [*base, f"seed={seed}", *own, "refine.rounds=0", *overrides])


SCORES = {
    "oof_f1_at_05": "OOF F1 @0.5",
    "oof_f1_tuned_cross_fitted": "OOF F1 tuned (cross-fitted)",
    "test_f1_at_05": "test F1 @0.5",
    "test_f1_tuned": "test F1 tuned",
    "oof_map": "OOF image mAP",
    "test_map": "test image mAP",
}


def measure(cfg: Config) -> dict[str, float | int | None]:
    """Train (or reuse) one variant, tune its thresholds, infer the test split; its image scores."""
    if cfg.image_model.enabled:
        return measure_whole_image(cfg)
    train_stage.run(cfg)
    thresholds_stage.run(cfg)
    out_dir = infer_stage.run(cfg)
    oof = pd.read_parquet(cfg.model_dir / "oof_image.parquet")
    thresholds = read_thresholds(cfg.model_dir / "thresholds.json")
    test = submission_image_scores(cfg, out_dir, thresholds)
    metrics = json.loads((cfg.model_dir / "metrics.json").read_text())
    return scores(cfg, oof, test, float(metrics.get("seconds", 0.0)))


def measure_whole_image(cfg: Config) -> dict[str, float | int | None]:
    """Train (or reuse) the whole-image model alone, tune thresholds on its OOF images (``make thresholds``
    with ``infer.image_level=image_model``) and predict the test split with its folds (what ``make infer``
    cuts ``image_level.csv`` from; no cell model is trained or read); its image scores."""
    metrics = image_model_stage.run(cfg)
    thresholds_stage.run(cfg)
    spec = get_dataset(cfg.data.dataset)
    n = spec.n_classes
    sample = pd.read_csv(cfg.data_dir / spec.sample_submission, dtype={spec.id_column: str})
    test_ids = sample[spec.id_column].tolist()
    probs = image_model_stage.predict_images(cfg, image_model_stage.trained_folds(cfg), test_ids, "test")
    y_test = image_targets(probs["image_id"], read_image_labels(cfg.data_dir, spec), n)
    thresholds = read_thresholds(cfg.image_model_dir / "thresholds.json")
    test = image_level_scores(y_test, probs[prob_columns(n)].to_numpy(), thresholds)
    oof = pd.read_parquet(cfg.image_model_dir / "oof_image.parquet")
    return scores(cfg, oof, test, float(metrics["seconds"]))


def scores(
    cfg: Config, oof: pd.DataFrame, test: dict[str, float | int | None], train_seconds: float
) -> dict[str, float | int | None]:
    """A variant's record: the OOF image scores of ``oof`` (thresholds cross-fitted over its folds), the
    test split's ``test`` scores and the training time."""
    spec = get_dataset(cfg.data.dataset)
    n = spec.n_classes
    y_true = image_targets(oof["image_id"], read_image_labels(cfg.data_dir, spec), n)
    oof_scores = image_level_scores(
        y_true, oof[prob_columns(n)].to_numpy(), None, oof["fold"].to_numpy(), cfg.thresholds
    )
    return {
        "oof_f1_at_05": oof_scores["macro_f1_at_05"],
        "oof_f1_tuned_cross_fitted": oof_scores["macro_f1_tuned_cross_fitted"],
        "test_f1_at_05": test["macro_f1_at_05"],
        "test_f1_tuned": test["macro_f1_tuned"],
        "oof_map": oof_scores["map"],
        "test_map": test["map"],
        "oof_classes": oof_scores["classes_scored"],
        "test_classes": test["classes_scored"],
        "train_seconds": round(train_seconds),  # the fold records: reused runs too
    }


def real_segmentation() -> str:
    """``configs/hpa2018.yaml``'s segmentation on real images at the 2018 size: the shared 2048² HPA 2021
    training images (their IDs are 2018 training images too) area-downscaled to 512², as the 2018 set
    distributed them, against the HPA-Cell-Segmentation masks downscaled by nearest neighbour. The config's
    settings are the full-size defaults scaled by 1/4 (nuclei ~45 px), not tuned on these images."""
    if not (REAL_2021 / "hpacellseg_masks").is_dir():
        return f"_skipped: no real images and reference masks at {REAL_2021}_"
    segment_cfg = load_config(REAL_CONFIG, []).segment
    rows = []
    for image_id in list_image_ids(REAL_2021 / "train"):
        image = read_image(REAL_2021 / "train", image_id)
        small = np.stack([cv2.resize(p, (SIZE_2018, SIZE_2018), interpolation=cv2.INTER_AREA) for p in image])
        mask_path = REAL_2021 / "hpacellseg_masks" / f"{image_id}_predictedmask.png"
        mask = cv2.imread(str(mask_path), cv2.IMREAD_UNCHANGED)
        if mask is None:
            raise SystemExit(f"bench_hpa2018: cannot read the reference mask {mask_path}")
        reference = cv2.resize(mask, (SIZE_2018, SIZE_2018), interpolation=cv2.INTER_NEAREST).astype(np.int32)
        segment_image(small, segment_cfg)  # warm-up: the first call loads OpenCV / scikit-image paths
        start = time.process_time()
        cells = segment_image(small, segment_cfg).cells
        cpu_ms = 1000 * (time.process_time() - start)
        at_05, at_06 = match_at_thresholds(cells, reference, (0.5, 0.6))
        rows.append(
            [
                image_id[:8],
                at_05["n_pred"],
                at_05["n_true"],
                at_05["f1"],
                at_06["f1"],
                at_05["mean_iou"],
                cpu_ms,
            ]
        )
    frame = pd.DataFrame(
        rows, columns=["image", "cells", "reference cells", "F1@0.5", "F1@0.6", "mean IoU", "CPU ms"]
    ).set_index("image")
    means = frame[["F1@0.5", "F1@0.6", "mean IoU", "CPU ms"]].mean()
    frame.loc["**mean**"] = ["", "", *means.to_list()]
    frame["CPU ms"] = frame["CPU ms"].map(lambda v: f"{v:.1f}")
    return markdown(frame.map(lambda v: f"{v:.3f}" if isinstance(v, float) else v), "image")


def cell_level(config: str, base: list[str]) -> list[dict[str, object]]:
    """The cell level at the config's seed (one seed: each row is a full pipeline): inheritance (round 0,
    the baseline), one nested refinement round on it, and the oracle (true cell labels, as many epochs as
    the refined backbone). Each scored by ``make evaluate``: test cell mAP under the organisers' reading,
    OOF cell mAP, and the test split's image macro-F1."""
    weak = load_config(config, [*base, "refine.rounds=1"])
    epochs = weak.train.epochs + weak.refine.epochs
    runs = {
        "inheritance (round 0)": [*base, "refine.rounds=0", f"infer.output={weak.name}-{BASELINE}"],
        "1 nested refinement round": [*base, "refine.rounds=1"],
        f"oracle: true cell labels, {epochs} epochs": [
            *base,
            f"name={weak.name}-oracle{epochs}",
            "train.targets=truth",
            f"train.epochs={epochs}",
            "refine.rounds=0",
        ],
    }
    rows = []
    for label, overrides in runs.items():
        cfg = load_config(config, overrides)
        print(f"bench_hpa2018: cell level, {label}", flush=True)
        train_stage.run(cfg)
        refine_stage.run(cfg)
        thresholds_stage.run(cfg)
        infer_stage.run(cfg)
        evaluation = evaluate_stage.run(cfg)
        rows.append(
            {
                "run": label,
                "test cell mAP": evaluation["cell_test"]["submission"]["map"],
                "OOF cell mAP": evaluation["cell_oof"][evaluation["plotted_variant"]]["map"],
                "test F1 @0.5": evaluation["image_test"]["macro_f1_at_05"],
                "test F1 tuned": evaluation["image_test"]["macro_f1_tuned"],
                "OOF F1 tuned (cross-fitted)": evaluation["image_oof"]["macro_f1_tuned_cross_fitted"],
            }
        )
    return rows


def gains(seed_rows: pd.DataFrame) -> dict[str, dict[str, float]]:
    """One seed's gains over the baseline at 0.5: tuning the baseline's thresholds, and each other
    variant at 0.5, per split (``oof``: tuned cross-fitted; ``test``: tuned on every OOF image)."""
    base = seed_rows.loc[BASELINE]
    out = {}
    for split, at05, tuned in (
        ("oof", "oof_f1_at_05", "oof_f1_tuned_cross_fitted"),
        ("test", "test_f1_at_05", "test_f1_tuned"),
    ):
        row = {"tuning the baseline's thresholds": base[tuned] - base[at05]}
        row.update((seed_rows[at05] - base[at05]).drop(BASELINE).to_dict())
        out[split] = row
    return out


def verdict(table: pd.DataFrame) -> str:
    """Whether tuning the baseline's thresholds gains more macro-F1 than any other variant gains at 0.5.
    The margin (tuning's gain minus the best other variant's) is paired by seed: the claim holds when its
    mean exceeds its sd over the seeds, fails when it is below minus its sd, and is a tie in between."""
    seeds = [s for s, rows in table.groupby("seed") if BASELINE in set(rows["variant"]) and len(rows) > 1]
    if not seeds:
        return "_not decided: the baseline and at least one variant must have finished at a seed_"
    per_seed = {s: gains(table[table["seed"] == s].set_index("variant")) for s in seeds}
    tuning = "tuning the baseline's thresholds"
    lines = []
    for split, label in (("oof", "OOF (cross-fitted)"), ("test", "test")):
        frame = pd.DataFrame({s: per_seed[s][split] for s in seeds}).T  # seeds x gains
        mean, sd = frame.mean(), frame.std(ddof=1).fillna(0.0)
        others = mean.drop(tuning)
        best = others.idxmax()
        margin = frame[tuning] - frame[best]
        margin_sd = float(margin.std(ddof=1)) if len(seeds) > 1 else 0.0
        holds_at = sum(bool(frame.loc[s, tuning] > frame.loc[s].drop(tuning).max()) for s in seeds)
        if margin.mean() > margin_sd:
            outcome = "holds"
        elif margin.mean() < -margin_sd:
            outcome = "does not hold"
        else:
            outcome = "is a tie (the margin is within its seeds' sd)"
        lines.append(
            f"- {label}: tuning the baseline's thresholds gains {mean[tuning]:+.3f} ± {sd[tuning]:.3f} "
            f"macro-F1; the best other variant at 0.5, {best}, {others[best]:+.3f} ± {sd[best]:.3f} (all: "
            + ", ".join(f"{k} {mean[k]:+.3f}" for k in others.index)
            + f"). Margin, paired by seed: {margin.mean():+.3f} ± {margin_sd:.3f}; tuning gains more at "
            f"{holds_at} of {len(seeds)} seeds. The claim {outcome}."
        )
    return "\n".join(lines)


def summary(table: pd.DataFrame) -> pd.DataFrame:
    """Mean ± sd over the seeds per variant, in the bench's order (``ablate.across_seeds``, shown as the
    leaderboard shows it), with the median training time."""
    stats = ablate.across_seeds(table).set_index("variant")
    frame = pd.DataFrame(
        {
            label: [ablate_report.mean_sd_text(row, column) for _, row in stats.iterrows()]
            for column, label in SCORES.items()
        },
        index=stats.index,
    )
    frame["seeds"] = stats["seeds"].astype(str)
    frame["train s (median)"] = (
        table.groupby("variant", sort=False)["train_seconds"].median().map("{:.0f}".format)
    )
    return frame


def markdown(frame: pd.DataFrame, index: str) -> str:
    header = f"| {index} | " + " | ".join(frame.columns) + " |\n|---|" + "---|" * len(frame.columns)
    body = [f"| {name} | " + " | ".join(str(v) for v in row) + " |" for name, row in frame.iterrows()]
    return "\n".join([header, *body])


def write_report(
    table: pd.DataFrame,
    cfg: Config,
    command: str,
    out: Path,
    total_s: float,
    segmentation: str,
    cells: list[dict[str, object]],
    cells_note: str = "",
) -> None:
    """The report; ``cells_note``: a note under the cell-level table (kept with a table carried over from
    an earlier call, e.g. that its OOF column was measured another way)."""
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    per_seed = table.set_index(["variant", "seed"])[[*SCORES, "oof_classes", "test_classes", "train_seconds"]]
    per_seed.index = [f"{v} (seed {s})" for v, s in per_seed.index]
    text = (
        "# The 2018 competition: threshold tuning vs architecture vs imbalance options vs a whole-image model "
        "(`make bench-hpa2018`)\n\n"
        f"`{command}` ({when}; {platform.node()}, {os.cpu_count()} CPUs, no GPU). Data: the 2018-flavoured "
        f"synthetic set of `{cfg.data_dir}` ({cfg.synthetic.n_train} train / {cfg.synthetic.n_test} test "
        "images, 28 classes drawn with the real 2018 frequencies, so the rarest classes are absent from so "
        f"small a training set), {cfg.folds.n_splits} folds, round 0 only (inheritance + attention MIL), "
        f"{cfg.train.epochs} epochs stage 1, {cfg.mil.epochs} epochs MIL, crops {cfg.cache.crop_size} px, "
        "every variant at the same epochs, batch and learning rate except `*_same_time` (the second backbone at "
        "fewer epochs, so that it trains in about the baseline's time: see `train s`), trained once per seed (same data and "
        f"folds). `{WHOLE_IMAGE}*`: no cells at all, the whole-image model alone (`make image-model`: "
        f"{cfg.image_model.backbone} on the whole image downscaled to {cfg.image_model.size} px, batch "
        f"{cfg.image_model.batch_size}, lr {cfg.image_model.lr:g}), at the stage-1 epochs or at about the baseline's "
        "training time; its `train s` is the image model's. Rows this call did not measure are the previous "
        "call's records. Image macro-F1 over the classes with a positive among the scored images (`*_classes`); "
        "OOF tuned = per-class thresholds tuned on the other folds' images and applied to each fold's "
        "(cross-fitted); test tuned = thresholds tuned on every OOF image (`make thresholds`), applied to the "
        "test split. `train s`: training wall time from the runs' fold records.\n\n"
        "## Mean ± sd over the seeds\n\n"
        + markdown(summary(table), "variant")
        + "\n\n## Does the claim hold here?\n\n"
        'The claim (the source design): "threshold tuning has a stronger impact than architectural changes '
        "under imbalance\". It holds when tuning the baseline's thresholds gains more macro-F1 than any other "
        "variant gains over the baseline at 0.5. The margin between the two is paired by seed: the claim holds "
        "when the margin's mean exceeds its sd over the seeds, and is a tie when it lies within it.\n\n"
        + verdict(table)
        + "\n\n## Every run\n\n"
        + markdown(
            per_seed.map(lambda v: "-" if pd.isna(v) else (f"{v:.3f}" if isinstance(v, float) else v)), "run"
        )
        + f"\n\n## The cell level: inheritance, refinement and the oracle (seed {cfg.seed})\n\n"
        + (cell_level.__doc__ or "").split("\n\n")[0].replace("\n    ", " ")
        + "\n\n"
        + (
            markdown(pd.DataFrame(cells).set_index("run").map(lambda v: f"{v:.3f}"), "run")
            if cells
            else "_not run (`--no-cell-level`)_"
        )
        + (f"\n\n> {cells_note}" if cells and cells_note else "")
        + "\n\n## Real images at the 2018 size: `configs/hpa2018.yaml`'s segmentation\n\n"
        + (real_segmentation.__doc__ or "").split("\n\n")[0].replace("\n    ", " ")
        + "\n\n"
        + segmentation
        + f"\n\nWall time of this call: {total_s:.0f} s (runs finished by an earlier call are reused: their "
        "training time is `train s`).\n"
    )
    out.write_text(text)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "hpa2018-bench.yaml"))
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument(
        "--same-time-epochs", type=int, default=4, help="the second backbone's epochs at the baseline's time"
    )
    parser.add_argument(
        "--whole-image-same-time-epochs",
        type=int,
        default=6,
        help="the whole-image model's epochs at the baseline's training time",
    )
    parser.add_argument(
        "--only", nargs="*", default=None, help="variants to train now (others: reused if done)"
    )
    parser.add_argument(
        "--seeds", type=int, nargs="*", default=None, help="default: the config's ablate.seeds"
    )
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "hpa2018.md")
    parser.add_argument(
        "--no-cell-level",
        action="store_true",
        help="skip the refined and oracle runs of the cell-level table (the previous call's table is kept)",
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="rewrite the report from the records of the last call (<out>.json): no training or inference",
    )
    parser.add_argument("overrides", nargs="*", help="config overrides key=value for every variant")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    start = time.perf_counter()
    base_cfg = load_config(args.config, args.overrides)
    seeds = args.seeds or base_cfg.ablate.seeds or [base_cfg.seed]
    grid = variants(
        args.backbone, args.same_time_epochs, base_cfg.train.epochs, args.whole_image_same_time_epochs
    )
    unknown = set(args.only or []) - set(grid)
    if unknown:
        raise SystemExit(f"bench_hpa2018: --only {sorted(unknown)}: no such variant ({', '.join(grid)})")
    segmentation = real_segmentation()
    print(segmentation, flush=True)
    records_file = args.out.with_suffix(".json")
    saved = json.loads(records_file.read_text()) if records_file.is_file() else {}
    if args.report_only:
        table = pd.DataFrame(saved["records"])
        write_report(
            table,
            base_cfg,
            saved["command"],
            args.out,
            saved["seconds"],
            segmentation,
            saved.get("cells", []),
            saved.get("cells_note", ""),
        )
        print(verdict(table))
        print(f"bench_hpa2018 -> {args.out} (from {records_file})")
        return
    command = "python benchmarks/bench_hpa2018.py " + " ".join(
        [*(f"--only {' '.join(args.only)}".split() if args.only else []), *args.overrides]
    )
    cells = saved.get("cells", []) if args.no_cell_level else []
    cells_note = saved.get("cells_note", "") if args.no_cell_level else ""
    # the previous call's records stand for the variants and seeds this call does not measure
    measured: list[dict] = []
    kept = [r for r in saved.get("records", []) if r["variant"] in grid]

    def save() -> pd.DataFrame:
        now = {(r["variant"], r["seed"]) for r in measured}
        records = measured + [r for r in kept if (r["variant"], r["seed"]) not in now]
        order = {name: position for position, name in enumerate(grid)}
        records.sort(key=lambda r: (r["seed"], order[r["variant"]]))
        payload = {"command": command.strip(), "seconds": time.perf_counter() - start, "records": records}
        records_file.write_text(json.dumps({**payload, "cells": cells, "cells_note": cells_note}, indent=1))
        table = pd.DataFrame(records)
        write_report(
            table, base_cfg, command.strip(), args.out, payload["seconds"], segmentation, cells, cells_note
        )
        return table

    # the shared inputs: data, folds and cache (each reused when finished); the whole-image variants read
    # no cells, so a call that trains only them does not segment the images
    data_stage.run(base_cfg)
    folds_stage.run(base_cfg)
    if args.only is None or any(not name.startswith(WHOLE_IMAGE) for name in args.only):
        cache_stage.run(base_cfg)
    for seed in seeds:
        for name, overrides in grid.items():
            cfg = variant_config(args.config, args.overrides, name, overrides, seed)
            done = cfg.image_model_dir if cfg.image_model.enabled else cfg.model_dir
            finished = (done / "oof_image.parquet").is_file()
            if args.only is not None and name not in args.only and not finished:
                continue
            print(
                f"bench_hpa2018: {name} seed {seed} ({' '.join(overrides) or 'the config as is'})", flush=True
            )
            record = {"variant": name, "seed": seed, **measure(cfg)}
            print(f"bench_hpa2018: {json.dumps(record)}", flush=True)
            measured.append(record)
            save()
    if not args.no_cell_level:
        cells, cells_note = cell_level(args.config, args.overrides), ""
    table = save()
    print(summary(table).to_string())
    print(verdict(table))
    print(f"bench_hpa2018 -> {args.out}")


if __name__ == "__main__":
    main()
