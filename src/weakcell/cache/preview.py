"""``weakcell preview-cells``: look at what the cache holds before training on it.

Writes ``{paths.reports}/preview_cells.png``: cell outlines from the cache's own masks on a few cached
images; when ``../shared/data/hpa2021/train`` exists (relative to the working directory), real 2048² images
segmented with the configured backend, with the HPA-Cell-Segmentation reference outlines beside ours;
and a grid of random crops as RGB composites, exactly as the training stage will read them.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and Kaggle
import matplotlib.pyplot as plt
import numpy as np

from weakcell.cache.build import split_folder
from weakcell.cache.store import CellCache
from weakcell.config import Config, SegmentConfig
from weakcell.data.datasets import get_dataset
from weakcell.data.images import composite_rgb, list_image_ids, read_image
from weakcell.outputs import atomic_savefig
from weakcell.segment import segment_image

REAL_DATA = Path("../shared/data/hpa2021")  # beside the repository; never part of a clone
DISPLAY = 512  # pixels of the longer side of an image panel
GAIN = 1.6  # brighten the dim HPA stains for display only
OURS, REFERENCE = (255, 255, 255), (255, 0, 255)


def draw_outlines(rgb: np.ndarray, labels: np.ndarray, color: tuple[int, int, int]) -> np.ndarray:
    """Paint the borders of every instance of ``labels`` (H, W) onto ``rgb`` (H', W', 3), resizing the
    labels with nearest neighbours so that instances never blend."""
    height, width = rgb.shape[:2]
    small = cv2.resize(labels.astype(np.int32), (width, height), interpolation=cv2.INTER_NEAREST)
    padded = np.pad(small, 1, mode="edge")
    border = (padded[1:-1, 1:-1] != padded[:-2, 1:-1]) | (padded[1:-1, 1:-1] != padded[1:-1, :-2])
    out = rgb.copy()
    out[border & ((small > 0) | (padded[:-2, 1:-1] > 0) | (padded[1:-1, :-2] > 0))] = color
    return out


def display_composite(image: np.ndarray) -> np.ndarray:
    """(4, H, W) uint8 -> (h, w, 3) composite with the longer side ``DISPLAY``."""
    scale = DISPLAY / max(image.shape[1:])
    small = np.stack([cv2.resize(p, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA) for p in image])
    return composite_rgb(small, gain=GAIN)


def crop_montage(crops: np.ndarray, columns: int) -> np.ndarray:
    """(n, 4, S, S) crops -> one RGB picture of ``columns`` per row, 2-pixel grey gutters."""
    size = crops.shape[-1]
    rows = -(-len(crops) // columns)
    step = size + 2
    montage = np.full((rows * step, columns * step, 3), 64, dtype=np.uint8)
    for i, crop in enumerate(crops):
        top, left = (i // columns) * step, (i % columns) * step
        montage[top : top + size, left : left + size] = composite_rgb(crop, gain=GAIN)
    return montage


def run(cfg: Config) -> Path:
    """Write ``preview_cells.png`` for the cache of ``cfg``; returns its path."""
    cache = CellCache(cfg.cache_dir)
    spec = get_dataset(cfg.data.dataset)
    cached = cache.images[(cache.images["status"] == "ok") & (cache.images["n_cells"] > 0)].head(3)
    real_ids = list_image_ids(REAL_DATA / "train")[:2] if (REAL_DATA / "train").is_dir() else []

    figure = plt.figure(figsize=(15, 16 if real_ids else 11))
    rows = 3 if real_ids else 2
    grid = figure.add_gridspec(rows, 3, height_ratios=[1] * (rows - 1) + [1.3])
    for column, image in enumerate(cached.itertuples()):
        source = read_image(split_folder(cfg.data_dir, spec, image.split), image.image_id)
        axis = figure.add_subplot(grid[0, column])
        axis.imshow(draw_outlines(display_composite(source), cache.masks(image.image_id).cells, OURS))
        axis.set_title(f"{cfg.data.dataset} {image.image_id[:12]}: {image.n_cells} cells", fontsize=9)
        axis.axis("off")
    # The real images are full-size HPA: a synthetic config's nucleus size (cells scaled down) does not
    # fit them, so they get the backend's real-HPA defaults unless the config is for real data already.
    real_segment = cfg.segment if not spec.has_truth else SegmentConfig(backend=cfg.segment.backend)
    for column, image_id in enumerate(real_ids):
        source = read_image(REAL_DATA / "train", image_id)
        ours = segment_image(source, real_segment).cells
        picture = draw_outlines(display_composite(source), ours, OURS)
        title = f"real {image_id[:8]}: {int(ours.max())} cells ({cfg.segment.backend}, white)"
        reference_path = REAL_DATA / "hpacellseg_masks" / f"{image_id}_predictedmask.png"
        reference = cv2.imread(str(reference_path), cv2.IMREAD_UNCHANGED)
        if reference is not None:
            picture = draw_outlines(picture, reference, REFERENCE)
            title += f", HPA-Cell-Segmentation {len(np.unique(reference)) - 1} (magenta)"
        axis = figure.add_subplot(grid[1, column])
        axis.imshow(picture)
        axis.set_title(title, fontsize=9)
        axis.axis("off")

    rng = np.random.default_rng(cfg.seed)
    chosen = np.sort(rng.choice(len(cache), min(len(cache), 96), replace=False))
    axis = figure.add_subplot(grid[rows - 1, :])
    axis.imshow(crop_montage(cache.crops(chosen), columns=16), interpolation="nearest")
    axis.set_title(
        f"{len(chosen)} random crops of {len(cache)} ({cache.crop_size} px, own mask only, R/G/B/Y composite)",
        fontsize=10,
    )
    axis.axis("off")
    target = cfg.path(cfg.paths.reports) / "preview_cells.png"
    target.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    atomic_savefig(target, figure, dpi=90)
    plt.close(figure)
    print(
        f"preview-cells: {len(cached)} cached + {len(real_ids)} real images, {len(chosen)} crops -> {target}"
    )
    return target


if __name__ == "__main__":
    from weakcell.cli import stage_main

    raise SystemExit(stage_main(run))
