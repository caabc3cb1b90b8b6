"""One fold model: both stages trained on the images of every fold but the held-out ones, predicting the
held-out images out of fold. ``train_model`` reads top to bottom as its steps:

1. ``stage1``: the cell model, a timm backbone on single-cell crops, every cell learning from its targets
   (inherited image labels, pseudo-labels in refinement, true cell labels for the oracle);
2. ``embed``: embeddings and probabilities of every training-split cell from that model (of the held-out
   cells alone when no stage 2 follows);
3. ``stage2``: attention MIL (Ilse et al. 2018) over each image's cells, trained on the other folds' images;
4. ``oof_tables``: the held-out images' and cells' predictions, keyed by ID (``oof_image.parquet``,
   ``oof_cell.parquet``: what makes the model finished).

Both stages train through the one engine (``weakcell.engine.fit``); only the model and the data differ.
Rounds of fold models (every fold of a run, refinement's nested models) are ``weakcell.train`` and
``weakcell.refine``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from weakcell.cache.augment import crop_augment
from weakcell.config import Config, TrainConfig
from weakcell.constants import prob_columns
from weakcell.data.labels import to_multi_hot
from weakcell.distributed import is_main_process
from weakcell.engine import fit, predict
from weakcell.labelled_crops import LabelledCrops, balanced_sample_weights, class_pos_weight
from weakcell.metrics import sigmoid
from weakcell.models import create_model
from weakcell.outputs import atomic_parquet, atomic_write, atomic_write_json
from weakcell.scoring import image_metrics, max_pool_images
from weakcell.sources import competition_rows
from weakcell.stage2 import STAGE2, BagRequest
from weakcell.training_set import TrainingSet
from weakcell.weights import load_state_dict

Tables = tuple[pd.DataFrame, pd.DataFrame]  # (oof_image, oof_cell)


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


@dataclass(frozen=True)
class HeldOut:
    """A fold model's split of the training set: the cache rows it trains stage 1 on, and the held-out
    cells and images it predicts."""

    train_cells: np.ndarray  # cache rows stage 1 learns from
    cells: np.ndarray  # cache rows of the held-out images' cells
    table: pd.DataFrame  # their ``cache.cells`` rows
    images: pd.DataFrame  # the held-out ``TrainingSet.images`` rows
    image_targets: np.ndarray  # (n_held_out_images, C) 0/1 image labels

    @property
    def image_ids(self) -> list[str]:
        return self.images["image_id"].tolist()

    @classmethod
    def of(cls, data: TrainingSet, plan: FoldModel) -> HeldOut:
        held_out = data.cells["fold"].isin(plan.held_out).to_numpy()
        train_cells = data.cells.index[~held_out].to_numpy()
        if data.trainable is not None:  # refinement may leave cells without a reliable label out
            train_cells = train_cells[data.trainable[train_cells]]
        cells = data.cells.index[held_out].to_numpy()
        images = data.images[data.images["fold"].isin(plan.held_out)]
        targets = to_multi_hot(images["labels"].tolist(), data.n_classes)
        return cls(train_cells, cells, data.cache.cells.loc[cells], images, targets)


@dataclass(frozen=True)
class Embedded:
    """What the trained cell model says of the cells it was run on, laid out by cache row (0 elsewhere)."""

    embeddings: np.ndarray  # (len(cache.cells), D) float32
    cell_probs: np.ndarray  # (len(cache.cells), C) float64


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

    @classmethod
    def of(cls, data: TrainingSet, plan: FoldModel, held_out: HeldOut) -> BagSplit:
        train_images = data.images[~data.images["fold"].isin(plan.held_out)]
        return cls(
            train=data.bags(train_images["image_id"].tolist()),
            train_targets=to_multi_hot(train_images["labels"].tolist(), data.n_classes).astype(np.float32),
            val=data.bags(held_out.image_ids),
            val_targets=held_out.image_targets.astype(np.float32),
        )


def stage_config(train: TrainConfig, **changes: object) -> TrainConfig:
    return train.model_copy(update=changes)


def train_fold(
    cfg: Config, data: TrainingSet, fold: int, run_dir: Path, init_dir: Path | None = None
) -> Tables:
    """Both stages on the other folds; out-of-fold image and cell predictions of fold ``fold``.

    init_dir: a previous round's folder whose ``fold<k>/cell/model.pt`` stage 1 starts from (refinement).
    """
    return train_model(cfg, data, outer_model(cfg, fold, run_dir, init_dir))


def train_model(cfg: Config, data: TrainingSet, plan: FoldModel) -> Tables:
    """Both stages on every fold but ``plan.held_out``; image and cell predictions of the held-out images
    (``oof_image.parquet``, ``oof_cell.parquet`` in ``plan.folder``; reused when finished)."""
    oof_image_path, oof_cell_path = plan.folder / "oof_image.parquet", plan.folder / "oof_cell.parquet"
    if oof_image_path.is_file() and oof_cell_path.is_file() and not cfg.force:
        print(f"train: {plan.name} is finished in {plan.folder}, skipping (FORCE=1 redoes it)")
        return pd.read_parquet(oof_image_path), pd.read_parquet(oof_cell_path)
    start = time.perf_counter()
    held_out = HeldOut.of(data, plan)
    cell_model = stage1(cfg, data, plan, held_out)
    embedded = embed(cfg, data, plan, held_out, cell_model)
    if not plan.stage2:
        cell_probs = embedded.cell_probs[held_out.cells]
        return _finish(
            plan, *stage1_tables(held_out.table, cell_probs, held_out.images, data.n_classes), start
        )
    bags = BagSplit.of(data, plan, held_out)
    mil_out = stage2(cfg, data, plan, held_out, bags, embedded.embeddings)
    return _finish(plan, *oof_tables(data, held_out, bags, mil_out, embedded.cell_probs), start)


def stage1(cfg: Config, data: TrainingSet, plan: FoldModel, held_out: HeldOut) -> nn.Module:
    """The cell model: cells learn from their (inherited) labels; the trained model, its weights loaded."""
    fold_targets = np.nan_to_num(data.cell_targets[held_out.train_cells])  # NaN: a pair refinement leaves out
    pos_weight = class_pos_weight(fold_targets) if cfg.train.class_weights == "sqrt_inverse" else None
    sample_weights = balanced_sample_weights(fold_targets) if cfg.train.sampler == "balanced" else None
    torch.manual_seed(plan.seed)
    cell_model = create_model("cell", cfg, data.n_classes, pos_weight=pos_weight)
    if plan.init is not None:
        cell_model.load_state_dict(load_state_dict(plan.init))
    train_cells = held_out.train_cells
    fit(
        cell_model,
        LabelledCrops(
            data.cache, train_cells, data.cell_targets, crop_augment(cfg.train.augment), sample_weights
        ),
        LabelledCrops(data.cache, held_out.cells, data.cell_targets, None),
        # tiny sets (a test's inner models learn from one fold of 9 images) still make one batch
        stage_config(cfg.train, batch_size=max(1, min(cfg.train.batch_size, len(train_cells)))),
        plan.folder / "cell",
        seed=plan.seed,
        evaluate=partial(score_held_out_cells, cfg, data, held_out),
        batch_keys=("index",),
        config=cfg.model_dump(mode="json"),
        force=cfg.force,
    )
    cell_model.load_state_dict(load_state_dict(plan.folder / "cell" / "model.pt"))
    return cell_model


def score_held_out_cells(
    cfg: Config, data: TrainingSet, held_out: HeldOut, outputs: dict[str, np.ndarray]
) -> dict[str, float]:
    """Stage 1's validation scores: image scores of the max over each held-out image's cells, and the cell
    mAP (the competition metric, ``CellTruth.score``) against the held-out folds' true cells where the set
    has them."""
    n_classes = data.n_classes
    order = pd.Index(outputs["index"]).get_indexer(held_out.cells)  # back to held_out.cells order
    probs = sigmoid(outputs["logits"])[order]
    image_probs = max_pool_images(held_out.table, probs, held_out.image_ids)
    scores = image_metrics(held_out.image_targets, image_probs, "max_")
    if data.cell_truth is not None:  # the competition metric on the held-out folds' true cells
        table = held_out.table[["image_id", "cell_id"]].assign(**dict(zip(prob_columns(n_classes), probs.T)))
        folds = set(held_out.images["fold"].tolist())
        rows = competition_rows(table, data.images)  # external sources have no truth
        scores["cell_map"] = data.cell_truth.score(rows, cfg.evaluate.verified, folds)["map"]
    return scores


def embed(
    cfg: Config, data: TrainingSet, plan: FoldModel, held_out: HeldOut, cell_model: nn.Module
) -> Embedded:
    """Embeddings + probabilities of every training-split cell from the fold's cell model (stage 2 trains
    on them), or of the held-out cells alone when no stage 2 follows; the held-out cells' embeddings are
    written as ``oof_embeddings.npz``."""
    every_cell = data.cells.index.to_numpy() if plan.stage2 else held_out.cells
    outputs = predict(
        cell_model,
        LabelledCrops(data.cache, every_cell, data.cell_targets, None),
        cfg.train,
        batch_keys=("index",),
    )
    embeddings = np.zeros((len(data.cache.cells), outputs["embeddings"].shape[1]), dtype=np.float32)
    embeddings[outputs["index"]] = outputs["embeddings"]
    cell_probs = np.zeros((len(data.cache.cells), data.n_classes), dtype=np.float64)
    cell_probs[outputs["index"]] = sigmoid(outputs["logits"])
    plan.folder.mkdir(parents=True, exist_ok=True)
    if is_main_process():  # the held-out cells' embeddings, keyed by (image_id, cell_id)
        atomic_write(
            plan.folder / "oof_embeddings.npz",
            partial(_write_embeddings, held_out.table, embeddings[held_out.cells].astype(np.float16)),
        )
    return Embedded(embeddings, cell_probs)


def _write_embeddings(table: pd.DataFrame, embeddings: np.ndarray, tmp: Path) -> None:
    """``oof_embeddings.npz`` (image_id, cell_id, embeddings) into ``tmp``, the temporary of an atomic write."""
    with open(tmp, "wb") as stream:  # a stream: np.savez would append .npz to a file name
        np.savez(
            stream,
            image_id=table["image_id"].to_numpy(str),
            cell_id=table["cell_id"].to_numpy(np.int64),
            embeddings=embeddings,
        )


def stage2(
    cfg: Config, data: TrainingSet, plan: FoldModel, held_out: HeldOut, bags: BagSplit, embeddings: np.ndarray
) -> dict[str, np.ndarray]:
    """Attention MIL over each image's cells (frozen embeddings or end to end); its predictions of the
    held-out bags (``predict``'s outputs: ``bag``, ``logits``, ``instance_logits``, ``attention``)."""
    mil_train = stage_config(
        cfg.train,
        epochs=cfg.mil.epochs,
        batch_size=min(cfg.mil.batch_size, len(bags.train)),  # tiny sets still make one batch
        lr=cfg.mil.lr,
        ema=None,
    )

    torch.manual_seed(plan.seed)
    stage2 = STAGE2[cfg.mil.mode]
    model = stage2.build(cfg, data.n_classes, embeddings.shape[1])
    stage2.start(model, plan.folder)
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
        plan.folder / "mil",
        seed=plan.seed,
        evaluate=partial(score_held_out_images, held_out),
        batch_keys=("bag",),
        config=cfg.model_dump(mode="json"),
        force=cfg.force,
    )
    model.load_state_dict(load_state_dict(plan.folder / "mil" / "model.pt"))
    return predict(model, val_bag_data, mil_train, batch_keys=("bag",))


def score_held_out_images(held_out: HeldOut, outputs: dict[str, np.ndarray]) -> dict[str, float]:
    """Stage 2's validation scores: image scores of the MIL head's probabilities of the held-out images."""
    probs = np.zeros((len(held_out.images), held_out.image_targets.shape[1]))
    probs[outputs["bag"]] = sigmoid(outputs["logits"])
    return image_metrics(held_out.image_targets, probs)


def oof_tables(
    data: TrainingSet,
    held_out: HeldOut,
    bags: BagSplit,
    mil_out: dict[str, np.ndarray],
    cell_probs: np.ndarray,
) -> Tables:
    """The out-of-fold tables of a model with stage 2, keyed by ID (never by row position): each held-out
    image's MIL probabilities; each of its cells' stage-1 probabilities, MIL instance probabilities and
    relative attention."""
    n_classes = data.n_classes
    order = np.argsort(mil_out["bag"])
    image_probs = sigmoid(mil_out["logits"][order])  # (n_val_images, C)
    oof_image = pd.DataFrame(image_probs, columns=prob_columns(n_classes)).assign(
        image_id=held_out.image_ids, fold=held_out.images["fold"].to_numpy()
    )
    oof_image = oof_image[["image_id", *prob_columns(n_classes), "fold"]]
    instance_probs = sigmoid(mil_out["instance_logits"][order])  # (n_val_images, N, C)
    attention = mil_out["attention"][order]  # (n_val_images, C, N)
    fold_of = dict(zip(held_out.images["image_id"], held_out.images["fold"]))
    pieces = []
    for position, rows in enumerate(bags.val):
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
    return oof_image, oof_cell


def stage1_tables(cells: pd.DataFrame, probs: np.ndarray, images: pd.DataFrame, n_classes: int) -> Tables:
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


def _finish(plan: FoldModel, oof_image: pd.DataFrame, oof_cell: pd.DataFrame, start: float) -> Tables:
    """Write a model's prediction tables (what makes it finished) and what it cost."""
    plan.folder.mkdir(parents=True, exist_ok=True)
    write_parquet(oof_cell, plan.folder / "oof_cell.parquet")
    write_parquet(oof_image, plan.folder / "oof_image.parquet")
    if is_main_process():  # a reused fold still reports what it cost (ablation wall times)
        atomic_write_json(plan.folder / "fold.json", {"seconds": time.perf_counter() - start}, indent=None)
    return oof_image, oof_cell


def fold_seconds(fold_dir: Path) -> float:
    """Wall seconds the fold took when it was trained (0 when not recorded)."""
    path = fold_dir / "fold.json"
    return float(json.loads(path.read_text())["seconds"]) if path.is_file() else 0.0


def write_parquet(table: pd.DataFrame, path: Path) -> None:
    """Write ``table`` atomically, from the main process alone."""
    if is_main_process():
        atomic_parquet(path, table)
