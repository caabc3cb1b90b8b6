"""``make image-model``: a whole-image model beside the cell model, the 2018 winners' kind of model and the
image term several top 2021 teams multiplied their cell scores by.

A 4-channel timm backbone (``weakcell.models``' one factory: ``in_chans=4``, local weight files only,
weights-only loading) with a linear head reads the whole field of view, downscaled once to
``image_model.size`` (``weakcell.image_cache``), and learns the image labels with BCE. One model per fold
of the run's folds file (the images of fold k held out, so its out-of-fold predictions are honest), all
trained through the one engine (``weakcell.engine.fit``: checkpoints and exact resume, epoch logs, EMA,
bf16 and channels_last as ``train`` sets them), with the D4 flips and transposes (and a channel gain) of
``image_model.augment``. Out of fold and at inference, each image is the mean over the ``infer.tta``
views. Writes ``runs/<name>/image_model/``::

    fold<k>/model.pt, last.pt, epochs.csv, curves.png   the engine's
    fold<k>/images.json     the image IDs the fold model trained on and those it held out
    fold<k>/oof_image.parquet                           what makes a fold finished (reused)
    oof_image.parquet       image_id, p_*, fold (every training image once, out of fold)
    metrics.json            OOF macro-F1 at 0.5 and image mAP, images, seconds
    lineage.json            settings, the downscaled images, the folds and label files

``make thresholds`` tunes ``thresholds.json`` here when ``infer.image_level=image_model``; ``make infer``
(``image_model.enabled``) writes the fold ensemble's test probabilities (``pred_image_model.parquet``)
and combines them with the cell model (``weakcell.combine``).

What it costs at real scale (arithmetic, not measured here): the 21,806 images of the 2021 training set at
512² are 21,806 x 4 x 512² bytes = 22.9 GB of uint8 on disk (about 90 GB at 1024²); downscaling reads
every 2048² image once (about 0.1 CPU s of PNG decoding each, the README's hashing figure: some 40 CPU
minutes, spread over ``cache.workers``). An epoch of a ResNet-50-class backbone at 512² on a T4 is an
*estimate* of 5 to 7 minutes for the 17,400 training images of a 5-fold model (fp16; a T4 trains
ResNet-50 at about 250 images/s at 224², and a 512² image has 5.2x the pixels: 40-60 images/s);
mobilenetv3_small_100 is several times faster. The 2018 set's 31,072 images are 512² already (32.6 GB).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from weakcell.cache.augment import crop_augment
from weakcell.config import Config, ConfigError, TrainConfig
from weakcell.config.lineage import reads
from weakcell.constants import prob_columns
from weakcell.data.datasets import get_dataset
from weakcell.data.labels import read_label_file, to_multi_hot
from weakcell.data.manifest import table_hash
from weakcell.distributed import is_main_process
from weakcell.engine import fit
from weakcell.errors import StageError
from weakcell.folds_record import load_folds
from weakcell.image_cache import ImageCache, build_split
from weakcell.labelled_crops import LabelledCrops
from weakcell.lineage import Lineage, read_lineage, stale, write_lineage
from weakcell.metrics import sigmoid
from weakcell.models import create_model, resolve_weights_file
from weakcell.outputs import atomic_parquet, atomic_write_json, folder_lock, read_json
from weakcell.scoring import image_metrics
from weakcell.tta import predict_views
from weakcell.weights import load_state_dict

OOF_FILE = "oof_image.parquet"
MODEL_FILE = "model.pt"
# The settings that shape the network inference builds to load a fold's weights into.
NETWORK = ("image_model.backbone", "image_model.size", "image_model.channel_", "image_model.drop_rate")


@dataclass(frozen=True)
class LabelledImages:
    """The labelled training images in the image cache: ``images`` (image_id, labels, fold, row) and the
    0/1 ``targets`` of every cache row (C columns)."""

    cache: ImageCache
    images: pd.DataFrame
    targets: np.ndarray

    @property
    def n_classes(self) -> int:
        return self.targets.shape[1]

    @property
    def folds(self) -> list[int]:
        return sorted(f for f in self.images["fold"].unique().tolist() if f >= 0)


def labelled_images(cfg: Config, cache: ImageCache) -> LabelledImages:
    """Join the image cache's training split with the label file and the folds file (every image needs a
    fold: folds made from another label file stop here, as they stop training)."""
    spec = get_dataset(cfg.data.dataset)
    labels = read_label_file(cfg.data_dir / spec.label_file, spec)[["ID", "labels"]]
    folds, _ = load_folds(cfg)
    images = cache.index[["image_id", "row"]].merge(labels.rename(columns={"ID": "image_id"}), how="left")
    images = images.merge(folds.rename(columns={"ID": "image_id"}), how="left")
    without = images.loc[images["fold"].isna(), "image_id"].tolist()
    if without:
        raise StageError(
            f"{len(without)} labelled images have no fold in {cfg.folds_file} (e.g. {without[0]}): it was "
            "made from another label file; rebuild it (make folds FORCE=1)"
        )
    images = images.astype({"fold": np.int64})
    targets = np.zeros((len(cache), spec.n_classes), dtype=np.float32)
    targets[images["row"].to_numpy()] = to_multi_hot(images["labels"].tolist(), spec.n_classes)
    return LabelledImages(cache, images, targets)


def image_model_lineage(cfg: Config, cache: ImageCache) -> Lineage:
    """What the image model is made from: its settings, the downscaled images, the folds and label files."""
    recorded = read_lineage(cache.folder)
    return Lineage.of(
        "image_model",
        cfg,
        image_cache=recorded.fingerprint if recorded is not None else None,
        folds=load_folds(cfg)[1],
        labels=table_hash(cfg.data_dir / get_dataset(cfg.data.dataset).label_file),
    )


def run(cfg: Config) -> dict[str, float]:
    """Train (or reuse) every fold of the whole-image model, holding its folder's lock; the OOF summary."""
    if not cfg.image_model.enabled:
        raise ConfigError(
            "image_model.enabled is false: set image_model.enabled=true (in the config or as an override) to "
            "train the whole-image model; make infer then uses it"
        )
    with folder_lock(cfg.image_model_dir, "image-model", cfg.checks.lock_wait_s):
        return _train(cfg)


def _train(cfg: Config) -> dict[str, float]:
    start = time.perf_counter()
    out_dir = cfg.image_model_dir
    section = cfg.image_model
    if section.pretrained_file is not None:  # a missing file stops before any image is read
        resolve_weights_file(str(cfg.rooted_weights().image_model.pretrained_file), section.backbone)
    cache = build_split(cfg, "train")
    data = labelled_images(cfg, cache)
    lineage = image_model_lineage(cfg, cache)
    differ = [] if cfg.force else stale(out_dir, lineage, cfg)
    if differ:
        raise StageError(
            f"the whole-image model in {out_dir} was trained from other settings or data "
            f"({', '.join(differ[:6])}); retrain it with FORCE=1 or give the run another name (name=...)"
        )
    if is_main_process():  # before the folds: a killed run resumes under the same record
        write_lineage(out_dir, lineage)
    oof = pd.concat([train_fold(cfg, data, fold) for fold in data.folds], ignore_index=True)
    if oof["image_id"].duplicated().any():
        raise AssertionError("an image is out of fold in two folds: the folds file is inconsistent")
    if not is_main_process():  # torchrun: rank 0 writes and reports
        return {}
    atomic_parquet(out_dir / OOF_FILE, oof)
    by_id = data.images.set_index("image_id").loc[oof["image_id"]]
    y_true = to_multi_hot(by_id["labels"].tolist(), data.n_classes)
    metrics = {
        **image_metrics(y_true, oof[prob_columns(data.n_classes)].to_numpy()),
        "images": len(oof),
        "folds": len(data.folds),
        "seconds": sum(fold_seconds(out_dir / f"fold{fold}") for fold in data.folds),
        "wall_seconds": time.perf_counter() - start,
    }
    atomic_write_json(out_dir / "metrics.json", metrics)
    print(
        f"image-model: {cfg.image_model.backbone} at {cfg.image_model.size} px, {len(data.folds)} folds, "
        f"OOF macro-F1 @0.5 {metrics['f1_at_05']:.3f}, image mAP {metrics['image_map']:.3f} on {len(oof)} "
        f"images ({metrics['seconds']:.0f} s of training) -> {out_dir / OOF_FILE}, metrics.json"
    )
    return metrics


def image_train_config(cfg: Config, n_train: int) -> TrainConfig:
    """The engine's settings for the image model: ``train``'s optimiser, precision, EMA and checkpoints with
    the image model's own epochs, batch, learning rate and augmentations."""
    section = cfg.image_model
    return cfg.train.model_copy(
        update={
            "epochs": section.epochs,
            "batch_size": max(1, min(section.batch_size, n_train)),  # a tiny fold still makes one batch
            "lr": section.lr,
            "augment": section.augment,
        }
    )


def train_fold(cfg: Config, data: LabelledImages, fold: int) -> pd.DataFrame:
    """Fold ``fold``'s model, trained on the other folds' images; its out-of-fold table (reused when
    finished)."""
    folder = cfg.image_model_dir / f"fold{fold}"
    oof_path = folder / OOF_FILE
    if oof_path.is_file() and not cfg.force:
        print(f"image-model: fold {fold} is finished in {folder}, skipping (FORCE=1 redoes it)")
        return pd.read_parquet(oof_path)
    start = time.perf_counter()
    held_out = data.images["fold"].eq(fold).to_numpy()
    train_rows = data.images.loc[~held_out, "row"].to_numpy()
    val = data.images.loc[held_out]
    val_rows = val["row"].to_numpy()
    folder.mkdir(parents=True, exist_ok=True)
    if is_main_process():  # the record a reader checks the split by
        trained_on = data.images.loc[~held_out, "image_id"].tolist()
        record = {"trained_on": trained_on, "held_out": val["image_id"].tolist()}
        atomic_write_json(folder / "images.json", record)
    train_cfg = image_train_config(cfg, len(train_rows))
    seed = cfg.seed + fold
    torch.manual_seed(seed)
    model = create_model("image", cfg, data.n_classes)
    fit(
        model,
        LabelledCrops(data.cache, train_rows, data.targets, crop_augment(cfg.image_model.augment)),
        LabelledCrops(data.cache, val_rows, data.targets, None),
        train_cfg,
        folder,
        seed=seed,
        evaluate=partial(score_rows, data.targets),
        batch_keys=("index",),
        config=cfg.model_dump(mode="json"),
        force=cfg.force,
    )
    model.load_state_dict(load_state_dict(folder / MODEL_FILE))
    probs, _ = predict_views(model, data.cache, val_rows, cfg.infer.tta, train_cfg)
    oof = pd.DataFrame(probs, columns=prob_columns(data.n_classes))
    oof = oof.assign(image_id=val["image_id"].to_numpy(), fold=fold)
    oof = oof[["image_id", *prob_columns(data.n_classes), "fold"]]  # the MIL head's OOF layout
    if is_main_process():
        atomic_write_json(folder / "fold.json", {"seconds": time.perf_counter() - start}, indent=None)
        atomic_parquet(oof_path, oof)  # last: what makes the fold finished
    return oof


def score_rows(targets: np.ndarray, outputs: dict[str, np.ndarray]) -> dict[str, float]:
    """The engine's validation scores of a fold: image mAP and macro-F1 at 0.5 of the held-out images."""
    return image_metrics(targets[outputs["index"]], sigmoid(outputs["logits"]))


def fold_seconds(fold_dir: Path) -> float:
    """Seconds the fold took when it was trained (0 when not recorded)."""
    path = fold_dir / "fold.json"
    return float(read_json(path)["seconds"]) if path.is_file() else 0.0


# -- inference ---------------------------------------------------------------------------------------------


def trained_folds(cfg: Config) -> list[Path]:
    """The fold folders of this run's whole-image model, checked to be the network this config builds;
    a missing model is one line naming the command that trains it."""
    out_dir = cfg.image_model_dir
    folds = sorted(p.parent for p in out_dir.glob(f"fold*/{MODEL_FILE}") if (p.parent / OOF_FILE).is_file())
    if not folds:
        raise FileNotFoundError(
            f"no trained whole-image model in {out_dir} (image_model.enabled=true); run `make image-model`"
        )
    recorded = read_lineage(out_dir)
    if recorded is not None:
        current = Lineage("image_model", reads("image_model", cfg))
        differ = [c for c in current.setting_changes(recorded) if c.startswith(NETWORK)]
        if differ:
            raise StageError(
                f"the whole-image model in {out_dir} was trained as another network ({', '.join(differ)}); "
                "infer with its settings or retrain it (make image-model FORCE=1)"
            )
    return folds


def predict_images(cfg: Config, folds: list[Path], image_ids: list[str], split: str) -> pd.DataFrame:
    """``image_id, p_*``: the fold ensemble's probabilities of ``image_ids`` of ``split`` (each fold's
    mean over the ``infer.tta`` views, then the mean over folds)."""
    n_classes = get_dataset(cfg.data.dataset).n_classes
    cache = build_split(cfg, split)
    rows = cache.rows(image_ids)
    total = np.zeros((len(image_ids), n_classes))
    predict_cfg = image_train_config(cfg, len(rows))
    for fold_dir in folds:
        model = create_model("image", cfg, n_classes)
        model.load_state_dict(load_state_dict(fold_dir / MODEL_FILE))
        total += predict_views(model, cache, rows, cfg.infer.tta, predict_cfg)[0]
    table = pd.DataFrame(total / len(folds), columns=prob_columns(n_classes))
    return table.assign(image_id=image_ids)[["image_id", *prob_columns(n_classes)]]


if __name__ == "__main__":
    from weakcell.cli import stage_main

    raise SystemExit(stage_main(run))
