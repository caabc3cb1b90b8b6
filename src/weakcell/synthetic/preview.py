"""``make preview``: one picture to judge the synthetic benchmark by eye -> ``reports/preview_<dataset>.png``
(``preview_synthetic.png`` for the 2021 set, ``preview_synthetic2018.png`` for the 2018 one).

Top: the first train images of the configured set as RGB composites, cell outlines, each cell's own
labels written on it ("-" = Negative, or no class in a set without Negative). Middle: a real HPA image (when ``../shared/data/hpa2021/train``
exists) beside a synthetic one at the same scale. Bottom: one example cell per class, green emphasised.
Images are regenerated from their seeds, which reproduces the written set exactly.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import cv2
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from weakcell.config import Config, SyntheticConfig
from weakcell.data.images import composite_rgb, list_image_ids, read_image
from weakcell.outputs import atomic_savefig
from weakcell.synthetic.classes import HPA2021_TABLE, ClassTable, class_table
from weakcell.synthetic.generate import SyntheticImage, generate_image, image_seed

REAL_TRAIN = Path("../shared/data/hpa2021/train")  # relative to the project root, as the data README says
N_MONTAGE = 3
DISPLAY_GAIN = 1.6  # composites are dim at 8 bits; brighten for the eye only
TILES_PER_ROW = 10


def outlined(sample: SyntheticImage) -> np.ndarray:
    """``(H, W, 3)`` uint8 composite with white cell borders."""
    rgb = composite_rgb(sample.image, gain=DISPLAY_GAIN)
    cells = sample.cells
    border = np.zeros(cells.shape, dtype=bool)
    border[:-1] |= cells[:-1] != cells[1:]
    border[:, :-1] |= cells[:, :-1] != cells[:, 1:]
    rgb[border & (cells > 0)] = 230
    return rgb


def label_text(labels: list[int], negative: int | None = HPA2021_TABLE.negative) -> str:
    """A cell's labels as drawn on it: ``"0,9"``, or ``"-"`` for Negative (or no class at all)."""
    return "-" if labels in ([negative], []) else ",".join(map(str, labels))


def example_cell(
    synthetic: SyntheticConfig, cls: int, seed: int, table: ClassTable = HPA2021_TABLE
) -> np.ndarray:
    """``(S, S, 3)`` uint8 crop of the brightest cell expressing ``cls`` (any cell for Negative), the
    green channel at full strength and the reference stains dimmed so the pattern stands out."""
    vivid = synthetic.model_copy(update={"intensity_range": (0.9, 1.0), "expressing_fraction": (0.5, 0.5)})
    sample = generate_image(
        vivid,
        np.random.SeedSequence([seed, 7, cls]),
        classes=[] if cls == table.negative else [cls],
        table=table,
    )
    expressing = [cid for cid, labels in sample.cell_labels.items() if cls in labels]
    areas = np.bincount(sample.cells.ravel(), minlength=max(sample.cell_labels, default=0) + 1)
    cell_id = max(expressing or list(sample.cell_labels), key=lambda cid: areas[cid])
    ys, xs = np.nonzero(sample.cells == cell_id)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    # Green stretched so the cell's brightest pixel is near white (at most 6x, so the Negative cell's
    # autofluorescence stays dim); the reference stains at a third.
    green_top = max(float(sample.image[1][sample.cells == cell_id].max()), 1.0)
    gains = np.array([0.35, min(230.0 / green_top, 6.0), 0.35, 0.35], dtype=np.float32)[:, None, None]
    rgb = composite_rgb(np.clip(sample.image * gains, 0, 255).astype(np.uint8))
    crop = rgb[y0:y1, x0:x1] * (sample.cells[y0:y1, x0:x1] == cell_id)[..., None]
    side = max(crop.shape[:2])
    square = np.zeros((side, side, 3), dtype=np.uint8)
    oy, ox = (side - crop.shape[0]) // 2, (side - crop.shape[1]) // 2
    square[oy : oy + crop.shape[0], ox : ox + crop.shape[1]] = crop
    return square


def real_composite(size: int) -> tuple[str, int, np.ndarray] | None:
    """The first real HPA train image as (ID, original side, composite downscaled to ``size``²), or None
    when the folder is absent."""
    if not REAL_TRAIN.is_dir():
        return None
    ids = list_image_ids(REAL_TRAIN)
    if not ids:
        return None
    image = read_image(REAL_TRAIN, ids[0])
    small = np.stack([cv2.resize(plane, (size, size), interpolation=cv2.INTER_AREA) for plane in image])
    return ids[0], image.shape[-1], composite_rgb(small, gain=DISPLAY_GAIN)


def _show(ax: Axes, picture: np.ndarray, title: str) -> None:
    ax.imshow(picture)
    ax.set_title(title, fontsize=9)
    ax.axis("off")


def run(cfg: Config) -> Path:
    """Draw the preview of ``cfg.synthetic`` and write it to ``reports/preview_<dataset>.png``."""
    synthetic, table = cfg.synthetic, class_table(cfg.data.dataset)
    samples = [
        generate_image(synthetic, image_seed(synthetic.seed, "train", i), table=table)
        for i in range(N_MONTAGE)
    ]
    real = real_composite(synthetic.image_size)
    classes = table.spec.classes
    rows = -(-len(classes) // TILES_PER_ROW)
    row_height = 2.15  # inches per row of class tiles

    # A bare Figure renders with Agg and needs no pyplot state (safe in workers and headless).
    figure = Figure(figsize=(19, 14.2 + row_height * rows), facecolor="white")
    # matplotlib's stubs type subfigures() as one SubFigure or an array; 3 rows give an array of 3
    top, middle, bottom = figure.subfigures(3, 1, height_ratios=[5.6, 8.6, row_height * rows])  # type: ignore[misc]
    for ax, sample in zip(top.subplots(1, N_MONTAGE), samples):
        image_label = label_text(sample.image_labels, table.negative)
        _show(ax, outlined(sample), f"{sample.cell_line}  image label {image_label}")
        for cell_id, labels in sample.cell_labels.items():
            ys, xs = np.nonzero(sample.nuclei == cell_id)
            text = label_text(labels, table.negative)
            ax.text(xs.mean(), ys.mean(), text, color="white", fontsize=6, ha="center", va="center")
    meaning = "Negative" if table.negative is not None else "no class"
    top.suptitle(
        f"synthetic train images: outlines and each cell's own labels ('-' = {meaning})", fontsize=11
    )

    comparison = middle.subplots(1, 2)
    synthetic_rgb = composite_rgb(samples[0].image, gain=DISPLAY_GAIN)
    if real is None:
        comparison[0].text(0.5, 0.5, f"no real images at {REAL_TRAIN}", ha="center", va="center")
        comparison[0].axis("off")
    else:
        real_id, real_side, real_rgb = real
        _show(comparison[0], real_rgb, f"real HPA {real_id[:8]} ({real_side}² -> {synthetic.image_size}²)")
    _show(comparison[1], synthetic_rgb, f"synthetic {samples[0].image_id[:8]} ({synthetic.image_size}²)")

    # C tiles in rows of 10 so each cell is large enough to read its pattern.
    tiles = bottom.subplots(rows, TILES_PER_ROW).ravel()
    for ax in tiles[len(classes) :]:
        ax.axis("off")
    for cls, ax in zip(range(len(classes)), tiles):
        ax.imshow(example_cell(synthetic, cls, synthetic.seed, table))
        ax.axis("off")
        ax.text(
            0.5,
            -0.06,
            textwrap.fill(f"{cls} {classes[cls]}", 22),
            transform=ax.transAxes,
            ha="center",
            va="top",
            fontsize=8,
        )
    bottom.suptitle("one cell per class (green emphasised)", fontsize=11)

    target = cfg.path(cfg.paths.reports) / f"preview_{cfg.data.dataset}.png"
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_savefig(target, figure, dpi=100)
    print(f"preview -> {target}")
    return target
