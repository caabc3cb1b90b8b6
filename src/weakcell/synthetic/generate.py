"""One synthetic HPA image with per-cell truth: ``generate_image(cfg, seed)``.

The story of an image: draw its classes with the real frequencies of its class table (hpa2021 by default,
``classes.CLASS_TABLES``), pick a cell line and lay out
its cells (some in mitosis), let each class be expressed by a random subset of the cells at varying
intensity, render the reference stains and the green protein channel cell by cell, then pass the whole
field through the microscope. A cell's truth is the set of classes it expresses, Negative (18) when
none (no class at all in a table without Negative, as in 2018); the image label is the union over its cells, so inheriting it is wrong for every non-expressing cell.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import cv2
import numpy as np

from weakcell.config import SyntheticConfig
from weakcell.synthetic.classes import BACKGROUND, HPA2021_TABLE, ClassTable
from weakcell.synthetic.geometry import Cell, get_cell_line, layout_cells
from weakcell.synthetic.patterns import CellView
from weakcell.synthetic.render import (
    apply_optics,
    er_stain,
    microtubule_stain,
    nucleus_stain,
    reticulum_field,
)

SPLITS: dict[str, int] = {"train": 0, "test": 1}  # split -> word mixed into the seed
# Mean cells per field is set for a field of 2048 real px (a whole HPA image).
REFERENCE_FIELD = 2048.0
MAX_CLASSES_PER_IMAGE = 6


@dataclass
class SyntheticImage:
    """A generated image and its truth. ``image`` (4, H, W) uint8 in R, G, B, Y order; ``cells`` and
    ``nuclei`` (H, W) uint16 instance masks (nucleus of cell k = k); labels per cell id."""

    image: np.ndarray
    cells: np.ndarray
    nuclei: np.ndarray
    cell_labels: dict[int, list[int]]
    image_labels: list[int]
    cell_line: str
    mitotic: dict[int, bool]
    image_id: str = ""


def image_seed(seed: int, split: str, index: int) -> np.random.SeedSequence:
    """The seed of image ``index`` of ``split``: independent of every other image, so a pool of workers
    makes the same set as one process and a larger ``n_train`` keeps the first images unchanged."""
    return np.random.SeedSequence([seed, SPLITS[split], index])


def image_id_for(seed_seq: np.random.SeedSequence) -> str:
    """An HPA-like UUID string drawn from its own stream of ``seed_seq`` (stable when knobs change)."""
    if seed_seq.entropy is None:
        raise ValueError("image_id_for needs a SeedSequence made from entropy (image_seed)")
    words = [*np.atleast_1d(np.asarray(seed_seq.entropy)).tolist(), *seed_seq.spawn_key, 0x1D]
    stream = np.random.default_rng(np.random.SeedSequence(words))
    return str(uuid.UUID(bytes=stream.bytes(16), version=1))


def class_probabilities(balance: float, table: ClassTable = HPA2021_TABLE) -> np.ndarray:
    """``(C,)`` probability of each class: the table's real frequencies flattened by ``balance`` (0 = real,
    1 = uniform), i.e. proportional to count ** (1 - balance)."""
    weights = np.asarray(table.counts, dtype=np.float64) ** (1.0 - balance)
    return weights / weights.sum()


def draw_image_classes(
    rng: np.random.Generator, cfg: SyntheticConfig, table: ClassTable = HPA2021_TABLE
) -> list[int]:
    """The classes one image shows, sorted; ``[]`` for a Negative image.

    The first class is drawn over all C (Negative, if the table has one, with its real rarity); a
    non-Negative image then gets K - 1 more, K = 1 + Poisson(mean - 1) so the mean number of labels is
    ``labels_per_image_mean``.
    """
    probabilities = class_probabilities(cfg.class_balance, table)
    first = int(rng.choice(len(probabilities), p=probabilities))
    if first == table.negative:
        return []
    k = min(1 + int(rng.poisson(cfg.labels_per_image_mean - 1.0)), MAX_CLASSES_PER_IMAGE)
    others = probabilities.copy()
    others[[first] if table.negative is None else [first, table.negative]] = 0
    extra: list[int] = []
    if k > 1:
        extra = rng.choice(len(others), size=k - 1, replace=False, p=others / others.sum()).tolist()
    return sorted({first, *map(int, extra)})


def _mitotic_flags(rng: np.random.Generator, n_cells: int, fraction: float, with_spindle: bool) -> np.ndarray:
    """Which requested cells are in mitosis: ``fraction`` of them at random, plus 1-2 when the image
    shows a mitotic-only class (the spindle; the 2018 cytokinetic bridge); at least one cell stays in
    interphase when there are several."""
    flags = rng.random(n_cells) < fraction
    if with_spindle:
        flags[rng.choice(n_cells, size=min(n_cells, int(rng.integers(1, 3))), replace=False)] = True
    if n_cells > 1 and flags.all():
        flags[rng.integers(n_cells)] = False
    return flags


def assign_expression(
    rng: np.random.Generator,
    cfg: SyntheticConfig,
    cells: list[Cell],
    classes: list[int],
    table: ClassTable = HPA2021_TABLE,
    touching: set[int] | None = None,
) -> dict[int, dict[int, float]]:
    """cell id -> {class: intensity}. Each image class goes to a random ``expressing_fraction`` of the
    cells that can show it (at least one); a class no cell can show is dropped from the image.
    ``touching``: ids of the cells that touch another (None = every cell; cell junctions need it)."""
    expression: dict[int, dict[int, float]] = {cell.cell_id: {} for cell in cells}
    for cls in classes:
        pattern = table.patterns[cls]
        eligible = [
            cell.cell_id
            for cell in cells
            if pattern.allowed(cell.mitotic, touching is None or cell.cell_id in touching)
        ]
        if not eligible:
            continue
        fraction = rng.uniform(*cfg.expressing_fraction)
        n = max(1, round(fraction * len(eligible)))
        for cell_id in rng.choice(eligible, size=n, replace=False):
            expression[int(cell_id)][cls] = float(rng.uniform(*cfg.intensity_range))
    return expression


def touching_cells(cells: list[Cell], cell_mask: np.ndarray, gap: int = 2) -> set[int]:
    """Ids of the cells that lie within ``gap`` px of another cell (they can show cell junctions)."""
    kernel = np.ones((2 * gap + 1, 2 * gap + 1), np.uint8)
    touching = set()
    for cell in cells:
        grown = cv2.dilate(cell.mask.astype(np.uint8), kernel) > 0
        box = cell_mask[cell.slices]
        if ((box != 0) & (box != cell.cell_id) & grown).any():
            touching.add(cell.cell_id)
    return touching


def generate_image(
    cfg: SyntheticConfig,
    seed: np.random.SeedSequence | int,
    classes: list[int] | None = None,
    table: ClassTable = HPA2021_TABLE,
) -> SyntheticImage:
    """Generate one image and its truth from ``seed``. ``classes`` forces the image classes (tests and
    the preview use it); by default they are drawn with ``table``'s frequencies (hpa2021 by default).

    A table without a Negative class has no image without a label: a field where no cell could show any
    drawn class (one mitotic cell, an interphase class) is laid out again from the same stream."""
    seed_seq = seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(seed)
    rng = np.random.default_rng(seed_seq)
    negatives = set() if table.negative is None else {table.negative}
    drawn = draw_image_classes(rng, cfg, table)
    classes = drawn if classes is None else sorted(set(classes) - negatives)
    for _ in range(MAX_LAYOUTS):
        sample = _render(cfg, rng, classes, table)
        if sample.image_labels or not classes:
            break
    sample.image_id = image_id_for(seed_seq)
    return sample


MAX_LAYOUTS = 20  # layouts tried for an image of a table without Negative before giving up on its classes


def _render(
    cfg: SyntheticConfig, rng: np.random.Generator, classes: list[int], table: ClassTable
) -> SyntheticImage:
    """Lay out, express and render one field showing ``classes``; ``image_labels`` is ``[]`` only when
    the table has no Negative and no cell could show any of them."""
    size, scale = cfg.image_size, cfg.cell_scale
    line = get_cell_line(cfg.cell_lines[int(rng.integers(len(cfg.cell_lines)))])
    field = (size / scale / REFERENCE_FIELD) ** 2
    n_cells = max(1, round(rng.uniform(*cfg.cells_per_image) * line.density * field))
    mitotic_only = any(table.patterns[c].mitotic_only for c in classes)
    mitotic = _mitotic_flags(rng, n_cells, cfg.mitotic_fraction, mitotic_only)
    layout = layout_cells(rng, size, line, n_cells, scale, mitotic)
    needs_contact = any(table.patterns[c].touching_only for c in classes)
    touching = touching_cells(layout.cells, layout.cell_mask) if needs_contact else None
    expression = assign_expression(rng, cfg, layout.cells, classes, table, touching)

    # (4, H, W) float signal in R, G, B, Y order; each cell paints only inside its own mask.
    planes = np.zeros((4, size, size), dtype=np.float32)
    reticulum = reticulum_field(rng, (size, size), mesh=max(2.0, 18.0 * scale))
    exposure = rng.uniform(0.6, 1.0, 4)  # per-channel brightness of this acquisition
    for cell in layout.cells:
        region = cell.slices
        red = microtubule_stain(rng, cell, scale)
        yellow = er_stain(cell, reticulum[region], scale)
        box = layout.cell_mask[region]
        neighbours = (box != 0) & (box != cell.cell_id) if needs_contact else None
        view = CellView(cell, red, yellow, scale, neighbours)
        green = BACKGROUND(view, rng)
        for cls, intensity in expression[cell.cell_id].items():
            green = green + intensity * table.patterns[cls](view, rng)
        stains = (
            red * rng.uniform(0.7, 1.0),
            green,
            nucleus_stain(rng, cell, scale),
            yellow * rng.uniform(0.8, 1.3),
        )
        for channel, stain in enumerate(stains):
            planes[channel][region] += stain * cell.mask * exposure[channel]
    image = apply_optics(planes, rng, scale, cfg.blur, cfg.noise, cfg.illumination)

    empty = [] if table.negative is None else [table.negative]
    cell_labels = {cell_id: sorted(expressed) or empty for cell_id, expressed in expression.items()}
    union = sorted({c for labels in cell_labels.values() for c in labels} - set(empty))
    return SyntheticImage(
        image=image,
        cells=layout.cell_mask,
        nuclei=layout.nucleus_mask,
        cell_labels=cell_labels,
        image_labels=union or empty,
        cell_line=line.name,
        mitotic={cell.cell_id: cell.mitotic for cell in layout.cells},
    )
