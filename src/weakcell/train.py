"""``make train``: K-fold weak supervision on the cell-crop cache, out-of-fold predictions per fold.

For every fold k (images of fold k held out):

1. stage 1, the cell model: a timm backbone on single-cell crops, every cell inheriting its image's labels
   (``train.targets=inherit``; ``truth`` trains on the synthetic set's true cell labels: the oracle);
2. embeddings and probabilities of every training-split cell from that fold's model;
3. stage 2, attention MIL (Ilse et al. 2018) over each image's cells, trained on the frozen embeddings of
   the other folds' images;
4. out-of-fold predictions of the held-out images: ``fold<k>/oof_image.parquet`` and
   ``fold<k>/oof_cell.parquet``, concatenated into ``runs/<run>/oof_*.parquet`` (every image once).

Both stages train through the one engine (``weakcell.engine.fit``); only the model and the data differ.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from weakcell.attention_maps import draw_attention_maps, pick_images
from weakcell.cache.augment import crop_augment
from weakcell.cache.loader import CellCrops, CropAugment
from weakcell.cache.store import SKIPPED_FILE, CellCache
from weakcell.cell_truth import cell_level_ap, cell_truth_table
from weakcell.config import OUTPUT_INPUTS, Config, TrainConfig, changed_settings, save_config
from weakcell.constants import NEGATIVE, prob_columns
from weakcell.data.datasets import DatasetSpec, get_dataset
from weakcell.data.labels import read_label_file, to_multi_hot
from weakcell.engine import fit, format_duration, predict
from weakcell.errors import StageError
from weakcell.folds import read_folds
from weakcell.metrics import sigmoid
from weakcell.models import create_model, resolve_weights_file
from weakcell.outputs import atomic_write, atomic_write_text, folder_lock, writing
from weakcell.scoring import image_metrics, max_pool_images, score_oof
from weakcell.stage2 import STAGE2, BagRequest
from weakcell.weights import load_state_dict

log = logging.getLogger(__name__)


# -- what training reads ------------------------------------------------------------------------------


@dataclass
class TrainingSet:
    """The training split of a cache joined with image labels and folds.

    cells: the cache's cell rows of the training split (index = row in ``cache.cells``), plus ``fold``.
    images: one row per training image (with or without cells): ``image_id, fold, labels``.
    cell_targets: (len(cache.cells), C) float32 targets of every cache row (0 for other splits).
    """

    spec: DatasetSpec
    cache: CellCache
    cells: pd.DataFrame
    images: pd.DataFrame
    cell_targets: np.ndarray
    truth: pd.DataFrame | None  # synthetic only: true cells (image_id, cell_id, labels)
    matches: pd.DataFrame | None  # synthetic only: segmented cell -> true cell
    trainable: np.ndarray | None = None  # (len(cache.cells),) bool: cells stage 1 may learn from; None = all
    missing: MissingImages | None = None  # labelled images that give training no cells, by reason

    @property
    def n_classes(self) -> int:
        return self.spec.n_classes

    @property
    def image_targets(self) -> np.ndarray:
        return to_multi_hot(self.images["labels"].tolist(), self.n_classes).astype(np.float32)

    def bags(self, image_ids: list[str]) -> list[np.ndarray]:
        """Cache rows of each image's cells (empty for an image without cells)."""
        by_image = self.cells.groupby("image_id", sort=False).indices
        positions = self.cells.index.to_numpy()
        return [positions[by_image[i]] if i in by_image else np.zeros(0, np.int64) for i in image_ids]


@dataclass(frozen=True)
class MissingImages:
    """Labelled training images (label file IDs) that give training no cell, by reason."""

    labelled: int  # images in the label file
    without_cells: list[str]  # cached, but segmentation found no cell
    failed: list[str]  # cached as skipped: unreadable or failed to segment (skipped.csv says why)
    not_cached: list[str]  # absent from the cache (not cached yet, or a cache built without them)

    @property
    def count(self) -> int:
        return len(self.without_cells) + len(self.failed) + len(self.not_cached)

    @property
    def share(self) -> float:
        return self.count / max(self.labelled, 1)

    def describe(self) -> str:
        return (
            f"{self.count} of {self.labelled} labelled training images give no cells: "
            f"{len(self.without_cells)} without cells, {len(self.failed)} failed to read or segment, "
            f"{len(self.not_cached)} not cached"
        )

    def record(self) -> dict[str, object]:
        """What ``run.json`` keeps: counts, the share and up to 5 IDs per reason."""
        reasons = {"without_cells": self.without_cells, "failed": self.failed, "not_cached": self.not_cached}
        return {
            "labelled": self.labelled,
            "missing": self.count,
            "share": round(self.share, 6),
            **{name: len(ids) for name, ids in reasons.items()},
            "examples": {name: ids[:5] for name, ids in reasons.items() if ids},
        }


def missing_images(labelled: list[str], cache_images: pd.DataFrame) -> MissingImages:
    """Which of the ``labelled`` IDs the cache's training images (``images.parquet`` rows) lack, and why."""
    rows = cache_images[cache_images["split"] == "train"].set_index("image_id")
    cached = [i for i in labelled if i in rows.index]
    status, n_cells = rows["status"].to_dict(), rows["n_cells"].to_dict()
    return MissingImages(
        labelled=len(labelled),
        without_cells=[i for i in cached if status[i] == "ok" and n_cells[i] == 0],
        failed=[i for i in cached if status[i] != "ok"],
        not_cached=[i for i in labelled if i not in rows.index],
    )


def check_missing(cfg: Config, missing: MissingImages, stage: str) -> None:
    """Print what the cache lacks; refuse above ``checks.max_missing_share`` (a silent loss otherwise)."""
    limit = cfg.checks.max_missing_share
    if missing.share > limit:
        needed = math.ceil(missing.share * 100) / 100
        raise StageError(
            f"{stage}: the cache {cfg.cache_dir} lacks too much: {missing.describe()} ({missing.share:.1%} > "
            f"checks.max_missing_share={limit:g}); cache them (make cache; {cfg.cache_dir / SKIPPED_FILE} says "
            f"why images failed), or train without them with checks.max_missing_share={needed:g}"
        )
    if missing.count:
        print(
            f"{stage}: {missing.describe()} ({missing.share:.1%}, within checks.max_missing_share={limit:g})"
        )
    else:
        print(f"{stage}: every one of the {missing.labelled} labelled training images is cached with cells")


def load_training_set(cfg: Config) -> TrainingSet:
    """Join the cache, the label file and the folds file; every cached training image must have both.
    ``missing`` says which labelled images the cache lacks (``check_missing`` decides whether to go on)."""
    spec = get_dataset(cfg.data.dataset)
    labels = read_label_file(cfg.data_dir / spec.label_file, spec)
    if not cfg.folds_file.is_file():
        raise FileNotFoundError(f"no folds file {cfg.folds_file}; run `make folds` first")
    folds = read_folds(cfg.folds_file)
    cache = CellCache(cfg.cache_dir)
    images = cache.images[cache.images["split"] == "train"][["image_id"]]
    images = images.merge(labels.rename(columns={"ID": "image_id"})[["image_id", "labels"]], how="left")
    images = images.merge(folds.rename(columns={"ID": "image_id"}), how="left")
    missing = images[images["labels"].isna() | images["fold"].isna()]["image_id"].tolist()
    if missing:
        raise StageError(
            f"{len(missing)} cached training images lack labels or a fold (e.g. {missing[:3]}); "
            f"rebuild the folds (make folds FORCE=1) or the cache (make cache FORCE=1)"
        )
    images = images.astype({"fold": np.int64}).reset_index(drop=True)
    cells = cache.cells[cache.cells["split"] == "train"].copy()
    cells["fold"] = cells["image_id"].map(dict(zip(images["image_id"], images["fold"])))

    truth = matches = None
    if spec.has_truth:
        from weakcell.synthetic.truth import read_truth

        truth = read_truth(cfg.data_dir, spec)
        matches = cell_truth_table(cache.masks, cfg.data_dir, images["image_id"].tolist())

    targets = np.zeros((len(cache.cells), spec.n_classes), dtype=np.float32)
    if cfg.train.targets == "inherit":
        image_hot = dict(zip(images["image_id"], to_multi_hot(images["labels"].tolist(), spec.n_classes)))
        targets[cells.index] = np.stack([image_hot[i] for i in cells["image_id"]]) if len(cells) else 0
    else:  # the oracle: each segmented cell learns its matched true cell's labels
        if truth is None or matches is None:
            raise StageError(f"train.targets=truth needs per-cell truth, which {spec.name} does not have")
        targets[cells.index] = true_cell_targets(cells, truth, matches, spec.n_classes, spec.negative)
    missing = missing_images(labels["ID"].astype(str).tolist(), cache.images)
    return TrainingSet(spec, cache, cells, images, targets, truth, matches, missing=missing)


def true_cell_targets(
    cells: pd.DataFrame,
    truth: pd.DataFrame,
    matches: pd.DataFrame,
    n_classes: int,
    negative: int | None = NEGATIVE,
) -> np.ndarray:
    """(len(cells), C) labels of the true cell each segmented cell matches; unmatched cells are Negative
    (all zero when the set has no Negative class, ``negative=None``).

    cells: ``image_id, cell_id`` rows; truth / matches: as in ``TrainingSet``."""
    own = truth.merge(matches, left_on=["image_id", "cell_id"], right_on=["image_id", "true_cell_id"])
    own = own.rename(columns={"cell_id_y": "cell_id"})[["image_id", "cell_id", "labels"]]
    position = pd.Series(
        np.arange(len(cells)), index=pd.MultiIndex.from_arrays([cells["image_id"], cells["cell_id"]])
    )
    found = position.reindex(pd.MultiIndex.from_arrays([own["image_id"], own["cell_id"]]))
    targets = np.zeros((len(cells), n_classes), dtype=np.float32)
    if negative is not None:
        targets[:, negative] = 1.0
    known = found.notna().to_numpy()
    targets[found[known].to_numpy(np.int64)] = to_multi_hot(
        [labels for labels, k in zip(own["labels"], known) if k], n_classes
    )
    return targets


# -- datasets -----------------------------------------------------------------------------------------


class LabelledCrops(CellCrops):
    """Cell crops with their (inherited or pseudo) targets, read a batch at a time. ``sample_weights``
    (one per position), when set, makes the engine draw cells in proportion to them."""

    def __init__(
        self,
        cache: CellCache,
        indices: np.ndarray,
        targets: np.ndarray,
        augment: CropAugment | None,
        sample_weights: np.ndarray | None = None,
    ):
        super().__init__(cache, indices, augment)
        self.targets = targets  # (len(cache.cells), C): looked up by the rows a batch ends up holding
        self.sample_weights = sample_weights

    def __getitems__(self, positions):
        batch = super().__getitems__(positions)
        batch["targets"] = torch.from_numpy(self.targets[batch["index"].numpy()])
        return batch


# -- class imbalance ------------------------------------------------------------------------------------


def class_pos_weight(targets: np.ndarray, limit: float = 50.0) -> np.ndarray:
    """(C,) BCE ``pos_weight`` = sqrt(negatives / positives) per class, clipped to [1, limit]."""
    positives = targets.sum(0)
    ratio = (len(targets) - positives) / np.maximum(positives, 1)
    return np.clip(np.sqrt(ratio), 1.0, limit).astype(np.float32)


def balanced_sample_weights(targets: np.ndarray) -> np.ndarray:
    """(N,) weight of each cell = sqrt(1 / frequency) of its rarest positive class (1 for no positive)."""
    frequency = np.maximum(targets.mean(0), 1.0 / max(len(targets), 1))  # (C,)
    per_class = np.sqrt(1.0 / frequency)[None, :] * (targets > 0)  # (N, C)
    return np.where(per_class.max(1) > 0, per_class.max(1), 1.0)


# -- one fold -----------------------------------------------------------------------------------------


def stage_config(train: TrainConfig, **changes: object) -> TrainConfig:
    return train.model_copy(update=changes)


@dataclass
class BagSplit:
    """The images of one fold split as MIL bags: cache rows of each image's cells and image targets."""

    train: list[np.ndarray]
    train_targets: np.ndarray  # (n_train_images, C)
    val: list[np.ndarray]
    val_targets: np.ndarray  # (n_val_images, C)

    @property
    def n_max(self) -> int:
        return max((len(b) for b in self.train + self.val), default=1)


@dataclass(frozen=True)
class FoldModel:
    """One model of a round: both stages trained on the images of every fold but ``held_out``, predicting
    the held-out folds' images. The outer models of a round hold out one fold each (``fold<k>/``); the
    inner models refinement trains hold out two (``inner/fold<k>-<j>/``: see ``weakcell.refine``)."""

    held_out: tuple[int, ...]
    folder: Path
    seed: int
    init: Path | None = None  # a cell ``model.pt`` stage 1 starts from (refinement fine-tunes)
    stage2: bool = True  # False: stage 1 alone, images scored by their best cell (a rule that reads no more)

    @property
    def name(self) -> str:
        return "fold " + "+".join(str(f) for f in self.held_out)


def outer_model(cfg: Config, fold: int, run_dir: Path, init_dir: Path | None = None) -> FoldModel:
    """Fold ``fold``'s model of the round in ``run_dir`` (init: the same fold of ``init_dir``)."""
    init = init_dir / f"fold{fold}" / "cell" / "model.pt" if init_dir is not None else None
    return FoldModel((fold,), run_dir / f"fold{fold}", cfg.seed + fold, init)


def train_fold(
    cfg: Config, data: TrainingSet, fold: int, run_dir: Path, init_dir: Path | None = None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Both stages on the other folds; out-of-fold image and cell predictions of fold ``fold``.

    init_dir: a previous round's folder whose ``fold<k>/cell/model.pt`` stage 1 starts from (refinement).
    """
    return train_model(cfg, data, outer_model(cfg, fold, run_dir, init_dir))


def train_model(cfg: Config, data: TrainingSet, plan: FoldModel) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Both stages on every fold but ``plan.held_out``; image and cell predictions of the held-out images
    (``oof_image.parquet``, ``oof_cell.parquet`` in ``plan.folder``; reused when finished)."""
    fold_dir = plan.folder
    oof_image_path, oof_cell_path = fold_dir / "oof_image.parquet", fold_dir / "oof_cell.parquet"
    if oof_image_path.is_file() and oof_cell_path.is_file() and not cfg.force:
        print(f"train: {plan.name} is finished in {fold_dir}, skipping (FORCE=1 redoes it)")
        return pd.read_parquet(oof_image_path), pd.read_parquet(oof_cell_path)
    fold_start = time.perf_counter()
    n_classes, config_dict = data.n_classes, cfg.model_dump(mode="json")
    held_out = data.cells["fold"].isin(plan.held_out).to_numpy()
    train_cells = data.cells.index[~held_out].to_numpy()
    if data.trainable is not None:  # refinement may leave cells without a reliable label out
        train_cells = train_cells[data.trainable[train_cells]]
    val_cells = data.cells.index[held_out].to_numpy()
    val_table = data.cache.cells.loc[val_cells]

    # -- stage 1: cells learn from their (inherited) labels
    fold_targets = np.nan_to_num(data.cell_targets[train_cells])  # NaN: a pair refinement leaves out
    pos_weight = class_pos_weight(fold_targets) if cfg.train.class_weights == "sqrt_inverse" else None
    sample_weights = balanced_sample_weights(fold_targets) if cfg.train.sampler == "balanced" else None
    torch.manual_seed(plan.seed)
    cell_model = create_model("cell", cfg, n_classes, pos_weight=pos_weight)
    if plan.init is not None:
        cell_model.load_state_dict(load_state_dict(plan.init))
    val_images = data.images[data.images["fold"].isin(plan.held_out)]
    val_image_ids = val_images["image_id"].tolist()
    val_image_targets = to_multi_hot(val_images["labels"].tolist(), n_classes)

    def score_cells(outputs: dict[str, np.ndarray]) -> dict[str, float]:
        order = pd.Index(outputs["index"]).get_indexer(val_cells)  # back to val_cells order
        probs = sigmoid(outputs["logits"])[order]
        scores = image_metrics(val_image_targets, max_pool_images(val_table, probs, val_image_ids), "max_")
        if data.truth is not None:
            table = val_table[["image_id", "cell_id"]].assign(**dict(zip(prob_columns(n_classes), probs.T)))
            scores["cell_map"] = float(
                np.nanmean(
                    cell_level_ap(
                        table, prob_columns(n_classes), data.matches, data.truth, cfg.evaluate.verified
                    )
                )
            )
        return scores

    augment = crop_augment(cfg.train.augment)
    fit(
        cell_model,
        LabelledCrops(data.cache, train_cells, data.cell_targets, augment, sample_weights),
        LabelledCrops(data.cache, val_cells, data.cell_targets, None),
        # tiny sets (a test's inner models learn from one fold of 9 images) still make one batch
        stage_config(cfg.train, batch_size=max(1, min(cfg.train.batch_size, len(train_cells)))),
        fold_dir / "cell",
        seed=plan.seed,
        evaluate=score_cells,
        batch_keys=("index",),
        config=config_dict,
        force=cfg.force,
    )
    cell_model.load_state_dict(load_state_dict(fold_dir / "cell" / "model.pt"))

    # -- embeddings + probabilities of every training-split cell from this fold's model (stage 2 trains on
    # them), or of the held-out cells alone when no stage 2 follows
    every_cell = data.cells.index.to_numpy() if plan.stage2 else val_cells
    outputs = predict(
        cell_model,
        LabelledCrops(data.cache, every_cell, data.cell_targets, None),
        cfg.train,
        batch_keys=("index",),
    )
    embeddings = np.zeros((len(data.cache.cells), outputs["embeddings"].shape[1]), dtype=np.float32)
    embeddings[outputs["index"]] = outputs["embeddings"]
    cell_probs = np.zeros((len(data.cache.cells), n_classes), dtype=np.float64)
    cell_probs[outputs["index"]] = sigmoid(outputs["logits"])
    fold_dir.mkdir(parents=True, exist_ok=True)
    if is_main_process():  # the held-out cells' embeddings, keyed by (image_id, cell_id); atomic
        tmp = fold_dir / "oof_embeddings.tmp.npz"
        np.savez(
            tmp,
            image_id=val_table["image_id"].to_numpy(str),
            cell_id=val_table["cell_id"].to_numpy(np.int64),
            embeddings=embeddings[val_cells].astype(np.float16),
        )
        tmp.replace(fold_dir / "oof_embeddings.npz")
    if not plan.stage2:
        oof_image, oof_cell = stage1_tables(val_table, cell_probs[val_cells], val_images, n_classes)
        return _finish(plan, oof_image, oof_cell, fold_start)

    # -- stage 2: attention MIL over each image's cells (frozen embeddings or end to end)
    train_images = data.images[~data.images["fold"].isin(plan.held_out)]
    bags = BagSplit(
        train=data.bags(train_images["image_id"].tolist()),
        train_targets=to_multi_hot(train_images["labels"].tolist(), n_classes).astype(np.float32),
        val=data.bags(val_image_ids),
        val_targets=val_image_targets.astype(np.float32),
    )
    mil_train = stage_config(
        cfg.train,
        epochs=cfg.mil.epochs,
        batch_size=min(cfg.mil.batch_size, len(bags.train)),  # tiny sets still make one batch
        lr=cfg.mil.lr,
        ema=None,
    )

    def score_images(outputs: dict[str, np.ndarray]) -> dict[str, float]:
        probs = np.zeros((len(bags.val), n_classes))
        probs[outputs["bag"]] = sigmoid(outputs["logits"])
        return image_metrics(val_image_targets, probs)

    torch.manual_seed(plan.seed)
    stage2 = STAGE2[cfg.mil.mode]
    model = stage2.build(cfg, n_classes, embeddings.shape[1])
    stage2.start(model, fold_dir)
    train_bag_data = stage2.bags(
        BagRequest(cfg, data.cache, embeddings, bags.train, bags.train_targets, bags.n_max, training=True)
    )
    val_bag_data = stage2.bags(
        BagRequest(cfg, data.cache, embeddings, bags.val, bags.val_targets, bags.n_max, training=False)
    )
    fit(
        model,
        train_bag_data,
        val_bag_data,
        mil_train,
        fold_dir / "mil",
        seed=plan.seed,
        evaluate=score_images,
        batch_keys=("bag",),
        config=config_dict,
        force=cfg.force,
    )
    model.load_state_dict(load_state_dict(fold_dir / "mil" / "model.pt"))
    mil_out = predict(model, val_bag_data, mil_train, batch_keys=("bag",))
    val_bags = bags.val

    # -- out-of-fold tables, keyed by ID (never by row position)
    order = np.argsort(mil_out["bag"])
    image_probs = sigmoid(mil_out["logits"][order])  # (n_val_images, C)
    oof_image = pd.DataFrame(image_probs, columns=prob_columns(n_classes)).assign(
        image_id=val_image_ids, fold=val_images["fold"].to_numpy()
    )
    oof_image = oof_image[["image_id", *prob_columns(n_classes), "fold"]]
    instance_probs = sigmoid(mil_out["instance_logits"][order])  # (n_val_images, N, C)
    attention = mil_out["attention"][order]  # (n_val_images, C, N)
    fold_of = dict(zip(val_images["image_id"], val_images["fold"]))
    pieces = []
    for position, rows in enumerate(val_bags):
        n = len(rows)
        if n == 0:
            continue
        cell_rows = data.cache.cells.loc[rows, ["image_id", "cell_id"]].reset_index(drop=True)
        # attention x n cells: 1 = the cell gets an average share of its image's attention for that class
        relative = attention[position, :, :n].T * n  # (n, C)
        pieces.append(
            pd.concat(
                [
                    cell_rows,
                    pd.DataFrame(cell_probs[rows], columns=prob_columns(n_classes)),
                    pd.DataFrame(instance_probs[position, :n], columns=prob_columns(n_classes, "mil_p_")),
                    pd.DataFrame(relative, columns=prob_columns(n_classes, "att_")),
                ],
                axis=1,
            ).assign(attention=relative.max(axis=1), fold=fold_of[cell_rows["image_id"].iloc[0]])
        )
    oof_cell = (
        pd.concat(pieces, ignore_index=True) if pieces else pd.DataFrame(columns=["image_id", "cell_id"])
    )
    return _finish(plan, oof_image, oof_cell, fold_start)


def _finish(
    plan: FoldModel, oof_image: pd.DataFrame, oof_cell: pd.DataFrame, start: float
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Write a model's prediction tables (what makes it finished) and what it cost."""
    plan.folder.mkdir(parents=True, exist_ok=True)
    _write_parquet(oof_cell, plan.folder / "oof_cell.parquet")
    _write_parquet(oof_image, plan.folder / "oof_image.parquet")
    if is_main_process():  # a reused fold still reports what it cost (ablation wall times)
        (plan.folder / "fold.json").write_text(json.dumps({"seconds": time.perf_counter() - start}))
    return oof_image, oof_cell


def stage1_tables(
    cells: pd.DataFrame, probs: np.ndarray, images: pd.DataFrame, n_classes: int
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The prediction tables of a model without stage 2: each cell's probabilities, no MIL columns (NaN),
    and each image's as the max over its cells."""
    fold_of = dict(zip(images["image_id"], images["fold"]))
    oof_cell = cells[["image_id", "cell_id"]].reset_index(drop=True)
    missing = np.full_like(probs, np.nan)
    oof_cell = pd.concat(
        [
            oof_cell,
            pd.DataFrame(probs, columns=prob_columns(n_classes)),
            pd.DataFrame(missing, columns=prob_columns(n_classes, "mil_p_")),
            pd.DataFrame(missing, columns=prob_columns(n_classes, "att_")),
        ],
        axis=1,
    ).assign(attention=np.nan, fold=oof_cell["image_id"].map(fold_of).to_numpy())
    image_ids = images["image_id"].tolist()
    oof_image = pd.DataFrame(max_pool_images(cells, probs, image_ids), columns=prob_columns(n_classes))
    oof_image = oof_image.assign(image_id=image_ids, fold=images["fold"].to_numpy())
    return oof_image[["image_id", *prob_columns(n_classes), "fold"]], oof_cell


def fold_seconds(fold_dir: Path) -> float:
    """Wall seconds the fold took when it was trained (0 when not recorded)."""
    path = fold_dir / "fold.json"
    return float(json.loads(path.read_text())["seconds"]) if path.is_file() else 0.0


def is_main_process() -> bool:
    """Under torchrun every process computes the same (gathered) outputs; rank 0 alone writes them."""
    return int(os.environ.get("RANK", "0")) == 0


def _write_parquet(table: pd.DataFrame, path: Path) -> None:
    if is_main_process():
        atomic_write(path, lambda tmp: table.to_parquet(tmp, index=False))


# -- the stage ----------------------------------------------------------------------------------------


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run_record(cfg: Config, data: TrainingSet) -> dict[str, object]:
    """``run.json`` of a run or round: seed, git commit and the labelled images the cache lacked."""
    record: dict[str, object] = {"seed": cfg.seed, "git_commit": git_commit()}
    if data.missing is not None:
        record["missing_images"] = data.missing.record()
    return record


def run(cfg: Config) -> dict[str, float]:
    """Train every fold (or ``train.folds``), write OOF predictions and ``metrics.json`` into the run,
    holding the run folder's lock."""
    with folder_lock(cfg.run_dir, "train", cfg.checks.lock_wait_s):
        return _train(cfg)


def _train(cfg: Config) -> dict[str, float]:
    run_dir = cfg.run_dir
    if not cfg.force:
        # finished folds are reused: only while what they computed from is the same
        differ = changed_settings(run_dir, cfg, OUTPUT_INPUTS["run"])
        if differ:
            raise StageError(
                f"run {run_dir} was trained with other settings ({', '.join(differ[:6])}); retrain it with "
                "FORCE=1 or give the new run another name (name=...)"
            )
    if cfg.model.pretrained_file is not None:  # a missing file stops before anything is written
        resolve_weights_file(str(cfg.rooted_weights().model.pretrained_file), cfg.model.backbone)
    data = load_training_set(cfg)
    if data.missing is not None:
        check_missing(cfg, data.missing, "train")
    if is_main_process():
        with writing(run_dir / "config.yaml"):
            save_config(cfg, run_dir)
        atomic_write_text(run_dir / "run.json", json.dumps(run_record(cfg, data), indent=2))
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
    folds = cfg.train.folds if cfg.train.folds is not None else sorted(data.images["fold"].unique().tolist())
    finished = [
        run_dir / f"fold{fold}" / name for fold in folds for name in ("oof_image.parquet", "oof_cell.parquet")
    ]
    saved = run_dir / "metrics.json"
    if not cfg.force and saved.is_file() and all(path.is_file() for path in finished):
        # a finished round: its tables, scores and maps are on disk already (reruns of make, the ablation)
        print(f"train: {run_dir} is finished ({len(folds)} folds), skipping (FORCE=1 redoes it)")
        return json.loads(saved.read_text())
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
    _write_parquet(oof_image, run_dir / "oof_image.parquet")
    _write_parquet(oof_cell, run_dir / "oof_cell.parquet")
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
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    maps = draw_attention_maps(
        cfg.data_dir,
        data.spec.train_dir,
        data.cache,
        oof_cell,
        oof_image,
        pick_images(oof_image, data.images, n=8, seed=cfg.seed),
        run_dir / "attention",
        data.spec.classes,
        labels=data.images,
    )
    summary = ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if "map" in k or "f1" in k)
    print(
        f"train: {len(folds)} folds, {len(oof_image)} images, {len(oof_cell)} cells out of fold; {summary}; "
        f"{metrics['wall_seconds']:.0f} s -> {run_dir} (+ {len(maps)} attention maps)"
    )
    return metrics


if __name__ == "__main__":
    from weakcell.cli import stage_main

    raise SystemExit(stage_main(run))
