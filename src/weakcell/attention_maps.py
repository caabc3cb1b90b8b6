"""Attention maps of the MIL head: where, inside an image, the model found each class it predicts.

One PNG per chosen image (``{out_dir}/{image_id}.png``): the RGB composite, then one panel per predicted
class (image probability >= ``threshold``, at most ``max_classes``, always at least the most likely one)
in which every segmented cell is filled with its attention for that class (``att_{c}`` of the OOF cell
table: attention x n cells, so 1 = an average share), normalised per panel, with the cells' outlines.
The panel title names the class and the image probability; the suptitle names the image and, when
given, its true labels. Images without cells get the composite and a note.

The figures are drawn at display size (``DISPLAY`` pixels on the longer side): the full-resolution masks
are downscaled with nearest neighbours so that cells never blend.

    ids = pick_images(oof_image, labels, n=8, seed=cfg.seed)
    draw_attention_maps(cfg.data_dir, spec.train_dir, cache, oof_cell, oof_image, ids,
                        run_dir / "attention", spec.classes, labels=labels)
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeAlias

import cv2
import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from weakcell.data.ids import inside
from weakcell.data.images import composite_rgb, read_image
from weakcell.outputs import atomic_savefig

DISPLAY = 384  # pixels of the longer side of every panel
GAIN = 1.6  # brighten the dim HPA stains for display only
PANEL_INCHES = 3.2  # width of one panel (the figure is PANEL_INCHES x panels wide)
HEADER_INCHES = 0.9  # suptitle + panel titles above the square panels
DPI = 100
CMAP = "magma"
BACKGROUND = (0.32, 0.32, 0.32, 1.0)  # pixels outside every cell in an attention panel
OUTLINE = (0.55, 0.85, 1.0, 1.0)  # cell borders, cyan: apart from every magma colour

Labels: TypeAlias = Mapping[str, Sequence[int]] | pd.DataFrame | None


class MaskSource(Protocol):
    """What is read from the cache: ``masks(image_id).cells`` (H, W) int instance labels."""

    def masks(self, image_id: str) -> Any: ...


@dataclass(frozen=True)
class PanelPlan:
    """What one image's figure shows: the classes of its attention panels and their image probabilities."""

    image_id: str
    classes: list[int]
    probs: list[float]
    has_cells: bool

    @property
    def n_panels(self) -> int:
        """Composite + one panel per class, or the composite alone (with a note) without cells."""
        return 1 + len(self.classes) if self.has_cells else 1


def figure_width_px(n_panels: int) -> int:
    """Width in pixels of a saved figure of ``n_panels`` panels."""
    return round(PANEL_INCHES * n_panels * DPI)


def chosen_classes(probs: np.ndarray, threshold: float = 0.5, max_classes: int = 4) -> list[int]:
    """Classes with probability >= threshold, most likely first, at most ``max_classes``; at least the top
    class (so that every image shows where its best guess comes from)."""
    order = np.argsort(-np.asarray(probs, dtype=np.float64), kind="stable")
    picked = [int(c) for c in order if probs[c] >= threshold][: max(max_classes, 1)]
    return picked or [int(order[0])]


def _prob_columns(frame: pd.DataFrame, prefix: str) -> list[str]:
    columns = [c for c in frame.columns if c.startswith(prefix) and c[len(prefix) :].isdigit()]
    return sorted(columns, key=lambda c: int(c[len(prefix) :]))


def plan_panels(
    oof_image: pd.DataFrame,
    oof_cell: pd.DataFrame,
    image_id: str,
    threshold: float = 0.5,
    max_classes: int = 4,
) -> PanelPlan:
    """The panels of ``image_id``'s figure (raises KeyError when the image has no OOF prediction)."""
    rows = oof_image[oof_image["image_id"] == image_id]
    if rows.empty:
        raise KeyError(f"{image_id} has no row in the OOF image table (not out of fold in this run?)")
    probs = rows[_prob_columns(oof_image, "p_")].to_numpy(np.float64)[0]
    classes = chosen_classes(probs, threshold, max_classes)
    has_cells = bool((oof_cell["image_id"] == image_id).any())
    return PanelPlan(image_id, classes, [float(probs[c]) for c in classes], has_cells)


def pick_images(oof_image: pd.DataFrame, labels: Labels, n: int = 8, seed: int = 0) -> list[str]:
    """A fixed sample of ``n`` validation (out-of-fold) images: about half of them multi-label when the
    set has that many, the rest drawn from the others; multi-label ones first, then by draw order.

    labels: image ID -> class list, or a table with ``image_id`` (or ``ID``) and ``labels``; None draws
    from every OOF image alike.
    """
    ids = oof_image["image_id"].astype(str).drop_duplicates().sort_values().to_numpy()
    rng = np.random.default_rng(seed)
    if labels is None or not len(ids):
        return [str(i) for i in rng.permutation(ids)[:n]]
    lookup = _label_lookup(labels)
    multi = np.array([len(lookup.get(i, ())) >= 2 for i in ids])
    n_multi = min(int(multi.sum()), max(n // 2, 1) if n > 0 else 0)
    first = rng.permutation(ids[multi])[:n_multi]
    rest = rng.permutation(np.setdiff1d(ids, first))[: max(n - len(first), 0)]
    return [str(i) for i in [*first, *rest]]


def _label_lookup(labels: Labels) -> dict[str, list[int]]:
    if labels is None:
        return {}
    if isinstance(labels, pd.DataFrame):
        key = "image_id" if "image_id" in labels.columns else "ID"
        return {str(k): [int(c) for c in v] for k, v in zip(labels[key], labels["labels"])}
    return {str(k): [int(c) for c in v] for k, v in labels.items()}


# -- drawing --------------------------------------------------------------------------------------------


def _display_size(height: int, width: int) -> tuple[int, int]:
    scale = DISPLAY / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def _borders(labels: np.ndarray) -> np.ndarray:
    """(h, w) bool: pixels where the instance label changes to the right or below, inside some cell."""
    padded = np.pad(labels, 1, mode="edge")
    centre = padded[1:-1, 1:-1]
    border = np.zeros(labels.shape, dtype=bool)
    for neighbour in (padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]):
        border |= (centre != neighbour) & (centre > 0)
    return border


def attention_image(small_cells: np.ndarray, cell_ids: np.ndarray, values: np.ndarray) -> np.ndarray:
    """(h, w) float: each cell's value painted over its pixels, NaN outside every listed cell."""
    top = int(max(small_cells.max(initial=0), cell_ids.max(initial=0)))
    lut = np.full(top + 1, np.nan)
    lut[cell_ids.astype(np.int64)] = values
    painted = lut[small_cells]
    painted[small_cells == 0] = np.nan
    return painted


def _read_cells(cache: MaskSource, image_id: str, shape: tuple[int, int]) -> np.ndarray:
    try:
        return np.asarray(cache.masks(image_id).cells, dtype=np.int32)
    except FileNotFoundError:  # an image the cache kept no mask for: no cells to draw
        return np.zeros(shape, dtype=np.int32)


def draw_one(
    image: np.ndarray,
    cells: np.ndarray,
    cell_table: pd.DataFrame,
    plan: PanelPlan,
    class_names: Sequence[str],
    true_labels: Sequence[int] | None,
    path: Path,
) -> Path:
    """Draw and save the figure of one image: ``image`` (4, H, W) uint8, ``cells`` (H, W) instance labels
    at full resolution, ``cell_table`` its OOF cell rows (``cell_id``, ``att_*``)."""
    height, width = _display_size(*image.shape[1:])
    small = np.stack([cv2.resize(p, (width, height), interpolation=cv2.INTER_AREA) for p in image])
    rgb = composite_rgb(small, gain=GAIN)
    small_cells = cv2.resize(cells.astype(np.int32), (width, height), interpolation=cv2.INTER_NEAREST)
    border = _borders(small_cells)

    n_panels = plan.n_panels
    figure = Figure(figsize=(PANEL_INCHES * n_panels, PANEL_INCHES + HEADER_INCHES))
    top = PANEL_INCHES / (PANEL_INCHES + HEADER_INCHES)
    layout = {"left": 0.01, "right": 0.99, "bottom": 0.01, "top": top, "wspace": 0.04}
    axes = figure.subplots(1, n_panels, squeeze=False, gridspec_kw=layout)[0]
    for ax in axes:
        ax.set_axis_off()

    outlined = rgb.copy()
    outlined[border] = (255, 255, 255)
    axes[0].imshow(outlined if plan.has_cells else rgb, interpolation="nearest")
    if plan.has_cells:
        axes[0].set_title(f"composite, {len(cell_table)} cells", fontsize=9)
    else:
        axes[0].set_title("composite", fontsize=9)
        axes[0].text(
            0.5,
            0.5,
            "no segmented cells:\nno attention to show",
            transform=axes[0].transAxes,
            ha="center",
            va="center",
            color="white",
            fontsize=10,
            bbox={"facecolor": "black", "alpha": 0.6, "edgecolor": "none"},
        )

    cmap = colormaps[CMAP]
    cell_ids = cell_table["cell_id"].to_numpy(np.int64)
    for ax, cls, prob in zip(axes[1:], plan.classes, plan.probs):
        values = cell_table[f"att_{cls}"].to_numpy(np.float64)
        low, high = float(np.nanmin(values)), float(np.nanmax(values))
        norm = Normalize(vmin=low, vmax=high if high > low else low + 1e-6)
        painted = attention_image(small_cells, cell_ids, values)
        colours = cmap(norm(np.nan_to_num(painted, nan=low)))
        colours[np.isnan(painted)] = BACKGROUND
        colours[border] = OUTLINE
        ax.imshow(colours, interpolation="nearest")
        name = class_names[cls] if cls < len(class_names) else str(cls)
        ax.set_title(f"{cls} {name}\np = {prob:.2f}, attention x n {low:.2f}-{high:.2f}", fontsize=8)

    title = plan.image_id
    if true_labels is not None:
        names = ", ".join(
            f"{c} {class_names[c]}" if c < len(class_names) else str(c) for c in sorted(true_labels)
        )
        title += f"\ntrue: {names or '-'}"
    figure.suptitle(title, fontsize=9, y=0.995, va="top")
    atomic_savefig(path, figure, dpi=DPI)
    return path


def draw_attention_maps(
    data_dir: str | os.PathLike[str],
    split_dir_name: str,
    cache: MaskSource,
    oof_cell: pd.DataFrame,
    oof_image: pd.DataFrame,
    image_ids: Sequence[str],
    out_dir: str | os.PathLike[str],
    class_names: Sequence[str],
    threshold: float = 0.5,
    max_classes: int = 4,
    labels: Labels = None,
) -> list[Path]:
    """Write ``out_dir/{image_id}.png`` for each of ``image_ids`` (see the module docstring); returns the
    paths in ``image_ids`` order. Images are read from ``data_dir/split_dir_name``, cell masks from
    ``cache`` (a ``CellCache``, full resolution). ``labels`` (image ID -> true classes, or a table with
    ``image_id``/``ID`` and ``labels``) adds the truth to each suptitle."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    folder = Path(data_dir) / split_dir_name
    lookup = _label_lookup(labels) if labels is not None else None
    cells_of = {str(k): v for k, v in oof_cell.groupby("image_id", sort=False).indices.items()}
    paths = []
    for image_id in image_ids:
        plan = plan_panels(oof_image, oof_cell, image_id, threshold, max_classes)
        image = read_image(folder, image_id)
        rows = cells_of.get(image_id, np.zeros(0, np.int64))
        table = oof_cell.iloc[rows]
        cells = _read_cells(cache, image_id, image.shape[1:]) if plan.has_cells else None
        if cells is None or not cells.any():
            plan = PanelPlan(plan.image_id, plan.classes, plan.probs, has_cells=False)
            cells = np.zeros(image.shape[1:], dtype=np.int32)
        truth = lookup.get(image_id) if lookup is not None else None
        paths.append(
            draw_one(image, cells, table, plan, class_names, truth, inside(out_dir, f"{image_id}.png"))
        )
    return paths
