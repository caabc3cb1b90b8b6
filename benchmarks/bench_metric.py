"""What the one metric path costs: out-of-fold cell scoring through the competition engine, and the
out-of-fold Kaggle file ``make evaluate`` writes. One core, CPU seconds (``time.process_time``).

Run from the repository root after ``make data folds cache`` (the demo config):

    python benchmarks/bench_metric.py [--config configs/demo.yaml] [--repeats 15] [--real-images 8]

1. Training set: building ``cell_truth.CellTruth`` once (every training image's true label image read
   and overlapped with the cache's), then one epoch's ``cell_map`` of the validation fold 0 (what
   ``train``'s ``score_cells`` computes after every epoch, random probabilities for every (cell, class)):
   from the precomputed IoU tables, and, for comparison, recomputing the IoU tables from both label
   images every epoch (``competition_metric.label_detections``).
2. ``oof_cell_level.csv`` of the demo's training split: written (cache masks read, every cell's mask
   RLE-encoded, 19 confidences per cell, validated) and scored as ``weakcell score --split train`` does.
3. The same file at real scale: 2048² label images with 22 cells (a Voronoi tiling with background)
   written as a cache's masks, 19 classes per cell: seconds per image of ``submission.write_cell_level``
   and the projection to 22,000 training images.

Prints the figures and writes ``benchmarks/metric.md``.
"""

from __future__ import annotations

import os

os.environ["OMP_NUM_THREADS"] = "1"  # one core, as promised: before numpy / OpenCV load their pools
os.environ["OPENBLAS_NUM_THREADS"] = "1"

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from scipy import ndimage

from weakcell.cache.store import read_masks
from weakcell.cell_truth import build_cell_truth, read_true_mask
from weakcell.competition_metric import TrueCells, label_detections, score_found
from weakcell.config import load_config
from weakcell.constants import prob_columns
from weakcell.folds import read_folds
from weakcell.score import score_file
from weakcell.submission import write_cell_level
from weakcell.synthetic.truth import TRUTH
from weakcell.train import load_training_set

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from bench_cache import median_seconds  # noqa: E402  (CPU seconds, median after a warm-up call)

OUTPUT = REPO / "benchmarks" / "metric.md"
clock = time.process_time
# Measured on the base commit 3886263 (the IoU-0.5 proxy, ``cell_truth.cell_level_ap``) with the same
# inputs on the same machine: kept for the before/after line of the report.
PROXY_EPOCH_SECONDS = 0.0094


def voronoi_cells(rng: np.random.Generator, size: int, n_cells: int) -> np.ndarray:
    """A ``size``² label image of ``n_cells`` cells: nearest-seed regions within 0.9 x the mean seed
    spacing of their seed, background beyond."""
    seeds = np.zeros((size, size), bool)
    seeds[rng.integers(0, size, n_cells), rng.integers(0, size, n_cells)] = True
    distance, (rows, cols) = ndimage.distance_transform_edt(~seeds, return_indices=True)
    labels = np.zeros((size, size), np.int32)
    labels[seeds] = np.arange(1, int(seeds.sum()) + 1)
    cells = labels[rows, cols]
    cells[distance > 0.9 * size / np.sqrt(n_cells)] = 0
    return cells


def training_set_section(cfg, repeats: int) -> tuple[list[str], dict[str, float]]:
    data = load_training_set(cfg)
    n = data.n_classes
    folds = read_folds(cfg.folds_file)
    fold_of = dict(zip(folds["ID"].astype(str), folds["fold"].astype(int)))
    ok = set(data.cache.images.loc[data.cache.images["status"] == "ok", "image_id"])
    start = clock()
    truth = build_cell_truth(
        cfg.data_dir / TRUTH, n, lambda i: data.cache.masks(i).cells if i in ok else None, fold_of
    )
    build_seconds = clock() - start
    val = data.cells[data.cells["fold"] == 0][["image_id", "cell_id"]].reset_index(drop=True)
    rng = np.random.default_rng(0)
    table = val.assign(**dict(zip(prob_columns(n), rng.random((len(val), n)).T)))
    precomputed = median_seconds(lambda: truth.score(table, cfg.evaluate.verified, {0}), repeats)
    val_ids = sorted(set(val["image_id"]))

    def from_masks() -> float:
        """The same score, reading both label images and overlapping them again (no precomputation)."""
        fold0 = {
            i: TrueCells(read_true_mask(cfg.data_dir / TRUTH / f"{i}_cells.png"), c.ids, c.classes)
            for i, c in truth.truth({0}).items()
        }
        masks = {i: data.cache.masks(i).cells for i in val_ids}
        found = label_detections(masks, table, fold0, n)
        return score_found(found, fold0, n, cfg.evaluate.verified)["map"]

    recomputed = median_seconds(from_masks, max(3, repeats // 5))
    same = abs(from_masks() - truth.score(table, cfg.evaluate.verified, {0})["map"]) < 1e-12
    figures = {
        "build": build_seconds,
        "images": len(truth.images),
        "val_cells": len(val),
        "val_images": len(val_ids),
        "epoch": precomputed,
        "epoch_from_masks": recomputed,
    }
    lines = [
        f"- building `CellTruth` for the {len(truth.images)} training images (true label images read, "
        f"overlapped with the cache's): {build_seconds:.2f} CPU s, once per training set",
        f"- one epoch's `cell_map` of the validation fold 0 ({len(val_ids)} images, {len(val)} cells x {n} "
        f"classes): {precomputed * 1000:.1f} ms from the precomputed IoU tables; "
        f"{recomputed * 1000:.0f} ms recomputing them from both label images every epoch (same mAP: {same}); "
        f"the IoU-0.5 proxy it replaces took {PROXY_EPOCH_SECONDS * 1000:.1f} ms (base commit 3886263)",
    ]
    return lines, figures


def demo_file_section(cfg) -> list[str]:
    data = load_training_set(cfg)
    n = data.n_classes
    rng = np.random.default_rng(1)
    cells = data.cells[["image_id", "cell_id"]].reset_index(drop=True)
    scores = cells.assign(**dict(zip(prob_columns(n), rng.random((len(cells), n)).T)))
    images = data.cache.images[data.cache.images["split"] == "train"].sort_values("image_id")
    sample = pd.DataFrame(
        {"ID": images["image_id"], "ImageWidth": images["width"], "ImageHeight": images["height"]}
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "oof_cell_level.csv"
        start = clock()
        write_cell_level(scores, lambda i: data.cache.masks(i).cells, sample, path)
        written = clock() - start
        start = clock()
        score_file(path, cfg.data_dir / TRUTH, n, "train", ("image", "all"))
        scored = clock() - start
        size = path.stat().st_size / 2**20
    per = len(sample)
    return [
        f"- demo training split ({per} images of {int(images['width'].iloc[0])}², {len(cells)} cells, "
        f"{n} classes, {size:.1f} MB): written in {written:.2f} CPU s ({written / per * 1000:.1f} ms per "
        f"image), scored under both readings in {scored:.2f} CPU s ({scored / per * 1000:.1f} ms per image)"
    ]


def real_scale_section(n_images: int, n_classes: int = 19) -> tuple[list[str], float]:
    rng = np.random.default_rng(2)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "masks").mkdir()
        ids = [f"img{k}" for k in range(n_images)]
        rows = []
        for image_id in ids:
            labels = voronoi_cells(rng, 2048, 22)
            nuclei = np.where(ndimage.binary_erosion(labels > 0, iterations=60), labels, 0)
            cv2.imwrite(str(folder / "masks" / f"{image_id}_cells.png"), labels.astype(np.uint16))
            cv2.imwrite(str(folder / "masks" / f"{image_id}_nuclei.png"), nuclei.astype(np.uint16))
            present = np.unique(labels)[1:]
            rows.append(pd.DataFrame({"image_id": image_id, "cell_id": present}))
        cells = pd.concat(rows, ignore_index=True)
        scores = cells.assign(**dict(zip(prob_columns(n_classes), rng.random((len(cells), n_classes)).T)))
        sample = pd.DataFrame({"ID": ids, "ImageWidth": 2048, "ImageHeight": 2048})
        start = clock()
        read = [read_masks(folder, i) for i in ids]
        reading = (clock() - start) / n_images
        del read
        start = clock()
        write_cell_level(scores, lambda i: read_masks(folder, i).cells, sample, folder / "oof.csv")
        per_image = (clock() - start) / n_images
    hours = per_image * 22_000 / 3600
    return [
        f"- real scale ({n_images} label images of 2048², {len(cells) / n_images:.1f} cells each, "
        f"{n_classes} classes): {per_image:.3f} CPU s per image written, of which {reading:.3f} s read the "
        f"cache's two mask PNGs; 22,000 training images: {hours:.2f} CPU hours on one core"
    ], per_image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--real-images", type=int, default=8)
    args = parser.parse_args()
    cfg = load_config(args.config, [])
    lines, _ = training_set_section(cfg, args.repeats)
    lines += demo_file_section(cfg)
    real, _ = real_scale_section(args.real_images)
    lines += real
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    text = (
        "# The one metric path: what out-of-fold scoring and the OOF file cost "
        "(`python benchmarks/bench_metric.py`)\n\n"
        f"{args.config}; one core, CPU seconds (medians of {args.repeats} repeats for the epoch figure); "
        f"{cpu}, a 2-core machine shared with other jobs.\n\n" + "\n".join(lines) + "\n"
    )
    OUTPUT.write_text(text)
    print("\n".join(lines))
    print(f"bench_metric: -> {OUTPUT}")


if __name__ == "__main__":
    main()
