"""One synthetic HPA image with per-cell truth: ``generate_image(cfg, seed)``.

The story of an image: draw its classes with the real hpa2021 frequencies, pick a cell line and lay out
its cells (some in mitosis), let each class be expressed by a random subset of the cells at varying
intensity, render the reference stains and the green protein channel cell by cell, then pass the whole
field through the microscope. A cell's truth is the set of classes it expresses, Negative (18) when
none; the image label is the union over its cells, so inheriting it is wrong for every non-expressing cell.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import numpy as np

from weakcell.config import SyntheticConfig
from weakcell.constants import HPA2021_CLASS_COUNTS, NEGATIVE
from weakcell.synthetic.geometry import Cell, get_cell_line, layout_cells
from weakcell.synthetic.patterns import PATTERNS, CellView
from weakcell.synthetic.render import (
    apply_optics,
    er_stain,
    microtubule_stain,
    nucleus_stain,
    reticulum_field,
)

SPLITS: dict[str, int] = {"train": 0, "test": 1}  # split -> word mixed into the seed
SPINDLE = 11
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


def class_probabilities(balance: float) -> np.ndarray:
    """``(19,)`` probability of each class: the hpa2021 frequencies flattened by ``balance`` (0 = real,
    1 = uniform), i.e. proportional to count ** (1 - balance)."""
    weights = np.asarray(HPA2021_CLASS_COUNTS, dtype=np.float64) ** (1.0 - balance)
    return weights / weights.sum()


def draw_image_classes(rng: np.random.Generator, cfg: SyntheticConfig) -> list[int]:
    """The classes one image shows, sorted; ``[]`` for a Negative image.

    The first class is drawn over all 19 (Negative with its real rarity); a non-Negative image then gets
    K - 1 more, K = 1 + Poisson(mean - 1) so the mean number of labels is ``labels_per_image_mean``.
    """
    probabilities = class_probabilities(cfg.class_balance)
    first = int(rng.choice(len(probabilities), p=probabilities))
    if first == NEGATIVE:
        return []
    k = min(1 + int(rng.poisson(cfg.labels_per_image_mean - 1.0)), MAX_CLASSES_PER_IMAGE)
    others = probabilities.copy()
    others[[first, NEGATIVE]] = 0
    extra: list[int] = []
    if k > 1:
        extra = rng.choice(len(others), size=k - 1, replace=False, p=others / others.sum()).tolist()
    return sorted({first, *map(int, extra)})


def _mitotic_flags(rng: np.random.Generator, n_cells: int, fraction: float, with_spindle: bool) -> np.ndarray:
    """Which requested cells are in mitosis: ``fraction`` of them at random, plus 1-2 when the image
    shows the spindle class; at least one cell stays in interphase when there are several."""
    flags = rng.random(n_cells) < fraction
    if with_spindle:
        flags[rng.choice(n_cells, size=min(n_cells, int(rng.integers(1, 3))), replace=False)] = True
    if n_cells > 1 and flags.all():
        flags[rng.integers(n_cells)] = False
    return flags


def assign_expression(
    rng: np.random.Generator, cfg: SyntheticConfig, cells: list[Cell], classes: list[int]
) -> dict[int, dict[int, float]]:
    """cell id -> {class: intensity}. Each image class goes to a random ``expressing_fraction`` of the
    cells that can show it (at least one); a class no cell can show is dropped from the image."""
    expression: dict[int, dict[int, float]] = {cell.cell_id: {} for cell in cells}
    for cls in classes:
        eligible = [cell.cell_id for cell in cells if PATTERNS[cls].allowed(cell.mitotic)]
        if not eligible:
            continue
        fraction = rng.uniform(*cfg.expressing_fraction)
        n = max(1, round(fraction * len(eligible)))
        for cell_id in rng.choice(eligible, size=n, replace=False):
            expression[int(cell_id)][cls] = float(rng.uniform(*cfg.intensity_range))
    return expression


def generate_image(
    cfg: SyntheticConfig, seed: np.random.SeedSequence | int, classes: list[int] | None = None
) -> SyntheticImage:
    """Generate one image and its truth from ``seed``. ``classes`` forces the image classes (tests and
    the preview use it); by default they are drawn with the hpa2021 frequencies."""
    seed_seq = seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(seed)
    rng = np.random.default_rng(seed_seq)
    size, scale = cfg.image_size, cfg.cell_scale
    drawn = draw_image_classes(rng, cfg)
    classes = drawn if classes is None else sorted(set(classes) - {NEGATIVE})
    line = get_cell_line(cfg.cell_lines[int(rng.integers(len(cfg.cell_lines)))])
    field = (size / scale / REFERENCE_FIELD) ** 2
    n_cells = max(1, round(rng.uniform(*cfg.cells_per_image) * line.density * field))
    mitotic = _mitotic_flags(rng, n_cells, cfg.mitotic_fraction, SPINDLE in classes)
    layout = layout_cells(rng, size, line, n_cells, scale, mitotic)
    expression = assign_expression(rng, cfg, layout.cells, classes)

    # (4, H, W) float signal in R, G, B, Y order; each cell paints only inside its own mask.
    planes = np.zeros((4, size, size), dtype=np.float32)
    reticulum = reticulum_field(rng, (size, size), mesh=max(2.0, 18.0 * scale))
    exposure = rng.uniform(0.6, 1.0, 4)  # per-channel brightness of this acquisition
    for cell in layout.cells:
        region = cell.slices
        red = microtubule_stain(rng, cell, scale)
        yellow = er_stain(cell, reticulum[region], scale)
        view = CellView(cell, red, yellow, scale)
        green = PATTERNS[NEGATIVE](view, rng)
        for cls, intensity in expression[cell.cell_id].items():
            green = green + intensity * PATTERNS[cls](view, rng)
        stains = (
            red * rng.uniform(0.7, 1.0),
            green,
            nucleus_stain(rng, cell, scale),
            yellow * rng.uniform(0.8, 1.3),
        )
        for channel, stain in enumerate(stains):
            planes[channel][region] += stain * cell.mask * exposure[channel]
    image = apply_optics(planes, rng, scale, cfg.blur, cfg.noise, cfg.illumination)

    cell_labels = {cell_id: sorted(expressed) or [NEGATIVE] for cell_id, expressed in expression.items()}
    union = sorted({c for labels in cell_labels.values() for c in labels if c != NEGATIVE})
    return SyntheticImage(
        image=image,
        cells=layout.cell_mask,
        nuclei=layout.nucleus_mask,
        cell_labels=cell_labels,
        image_labels=union or [NEGATIVE],
        cell_line=line.name,
        mitotic={cell.cell_id: cell.mitotic for cell in layout.cells},
        image_id=image_id_for(seed_seq),
    )
