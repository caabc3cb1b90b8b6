"""The green channel: one renderer per HPA 2021 class (2018-only classes: ``patterns2018``), each tied to the expressing cell's own geometry.

A renderer takes a ``CellView`` (the cell's masks, its red and yellow stains, distance maps, all in the
cell's box) and a generator, and returns a float32 map of the box in [0, ~1]; the caller multiplies it
by the cell's expression intensity. ``PATTERNS[c](view, rng)`` renders class ``c`` masked to the cell.
Negative (18) is the faint autofluorescence every cell shows; it is added to all cells.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import cv2
import numpy as np

from weakcell.constants import HPA2021_CLASSES, NEGATIVE
from weakcell.synthetic.geometry import Cell
from weakcell.synthetic.render import (
    distance_inside,
    distance_outside,
    draw_curves,
    draw_dots,
    sample_points,
    smooth_noise,
)


@dataclass
class CellView:
    """What a pattern may look at: the cell, its reference stains (box arrays) and image scale."""

    cell: Cell
    red: np.ndarray
    yellow: np.ndarray
    scale: float  # image px per real 2048² px
    neighbours: np.ndarray | None = None  # bool box: pixels of the other cells (cell junctions need them)

    @cached_property
    def cytoplasm(self) -> np.ndarray:
        """The cell without its nucleus (bool, box)."""
        return self.cell.mask & ~self.cell.nucleus

    @cached_property
    def to_membrane(self) -> np.ndarray:
        """Distance to the cell edge, px (0 on the outermost pixels)."""
        return np.maximum(distance_inside(self.cell.mask) - 1.0, 0.0)

    @cached_property
    def to_nucleus(self) -> np.ndarray:
        """Distance from the nucleus (0 inside it), px."""
        return distance_outside(self.cell.nucleus)

    @cached_property
    def to_nuclear_edge(self) -> np.ndarray:
        """Distance to the nuclear envelope from inside the nucleus, px (0 on its outermost pixels)."""
        return np.maximum(distance_inside(self.cell.nucleus) - 1.0, 0.0)

    def px(self, real: float) -> float:
        """A length in real 2048² px, in this image's px (at least 0.5)."""
        return max(0.5, real * self.scale)

    def blur(self, signal: np.ndarray, real_sigma: float) -> np.ndarray:
        """Gaussian blur with sigma in real px."""
        return cv2.GaussianBlur(signal.astype(np.float32), (0, 0), self.px(real_sigma))


Renderer = Callable[[CellView, np.random.Generator], np.ndarray]


@dataclass(frozen=True)
class Pattern:
    """A class's renderer and which cells can express it (mitotic cells have no nucleoli or envelope)."""

    name: str
    render: Renderer
    interphase_only: bool = False
    mitotic_only: bool = False
    touching_only: bool = False  # shown only by a cell that touches another (cell junctions)

    def __call__(self, view: CellView, rng: np.random.Generator) -> np.ndarray:
        """The pattern on ``view``'s cell: float32 box array, zero outside the cell."""
        return (self.render(view, rng) * view.cell.mask).astype(np.float32)

    def allowed(self, mitotic: bool, touching: bool = True) -> bool:
        """Whether a cell in (or out of) mitosis, touching another cell or not, can show this pattern."""
        return (
            not (self.mitotic_only and not mitotic)
            and not (self.interphase_only and mitotic)
            and (touching or not self.touching_only)
        )


def _canvas(view: CellView) -> np.ndarray:
    return np.zeros(view.cell.mask.shape, dtype=np.float32)


def nucleoplasm(view: CellView, rng: np.random.Generator) -> np.ndarray:
    """Grainy fill of the nucleus, sparing the nucleoli."""
    grain = 0.8 + 0.2 * smooth_noise(rng, view.cell.mask.shape, view.px(3))
    return 0.7 * view.blur(grain * (view.cell.nucleus & ~view.cell.nucleoli), 2)


def nuclear_membrane(view: CellView, rng: np.random.Generator) -> np.ndarray:
    """A thin bright rim along the nuclear envelope."""
    rim = np.exp(-view.to_nuclear_edge / view.px(4)) * view.cell.nucleus
    rim += np.exp(-view.to_nucleus / view.px(3)) * (view.to_nucleus > 0)
    return rim * (0.85 + 0.15 * smooth_noise(rng, rim.shape, view.px(8)))


def nucleoli(view: CellView, rng: np.random.Generator) -> np.ndarray:
    """The nucleoli themselves, bright and slightly granular."""
    grain = 0.85 + 0.15 * smooth_noise(rng, view.cell.mask.shape, view.px(2))
    return view.blur(grain * view.cell.nucleoli, 2)


def fibrillar_center(view: CellView, rng: np.random.Generator) -> np.ndarray:
    """Small dots inside the nucleoli (2-6 per nucleolus area unit)."""
    n = int(np.clip(view.cell.nucleoli.sum() / view.px(12) ** 2, 2, 12))
    canvas = _canvas(view)
    draw_dots(canvas, sample_points(rng, view.cell.nucleoli, n), np.full(n, view.px(3)))
    return view.blur(canvas, 1.5) * 1.5


def nuclear_speckles(view: CellView, rng: np.random.Generator) -> np.ndarray:
    """Many irregular speckles over a faint nucleoplasm, absent from the nucleoli."""
    region = view.cell.nucleus & ~view.cell.nucleoli
    n = int(np.clip(region.sum() / view.px(14) ** 2, 12, 60))
    canvas = _canvas(view)
    draw_dots(
        canvas,
        sample_points(rng, region, n),
        rng.uniform(view.px(3), view.px(7), n),
        rng.uniform(0.6, 1.0, n),
    )
    return view.blur(canvas, 2) * region + 0.15 * region


def nuclear_bodies(view: CellView, rng: np.random.Generator) -> np.ndarray:
    """A few (1-6) bright round bodies in the nucleoplasm."""
    region = view.cell.nucleus & ~view.cell.nucleoli
    n = int(rng.integers(1, 7))
    canvas = _canvas(view)
    draw_dots(
        canvas, sample_points(rng, region if region.any() else view.cell.nucleus, n), np.full(n, view.px(6))
    )
    return view.blur(canvas, 1.5) * 1.3


def endoplasmic_reticulum(view: CellView, rng: np.random.Generator) -> np.ndarray:
    """The cell's own ER network (its yellow channel)."""
    return view.yellow * view.cytoplasm


def golgi(view: CellView, rng: np.random.Generator) -> np.ndarray:
    """A compact ribbon of vesicles capping one side of the nucleus (an arc just outside it)."""
    near = view.cytoplasm & (view.to_nucleus < view.px(15))
    anchor = sample_points(rng, near if near.any() else view.cytoplasm, 1)
    if len(anchor) == 0:
        return _canvas(view)
    center = np.asarray(view.cell.nucleus_center)
    side = np.arctan2(*(anchor[0] - center))  # direction from the nucleus centre to the Golgi
    n = 40
    angles = side + rng.normal(0, 0.5, n)
    distance = np.hypot(*(anchor[0] - center)) + np.abs(rng.normal(0, view.px(14), n))
    points = center + distance[:, None] * np.stack([np.sin(angles), np.cos(angles)], 1)
    canvas = _canvas(view)
    draw_dots(canvas, points, rng.uniform(view.px(5), view.px(9), n), rng.uniform(0.6, 1.0, n))
    return view.blur(canvas, 2) * view.cytoplasm * 1.4


def intermediate_filaments(view: CellView, rng: np.random.Generator) -> np.ndarray:
    """A wavy, curving network through the cytoplasm, denser around the nucleus."""
    n = int(np.clip(view.cytoplasm.sum() / view.px(30) ** 2, 15, 70))
    canvas = _canvas(view)
    starts = sample_points(rng, view.cytoplasm, n, weight=np.exp(-view.to_nucleus / view.px(60)))
    draw_curves(
        canvas,
        rng,
        starts,
        rng.uniform(0, 2 * np.pi, n),
        view.px(150),
        view.px(6),
        0.35,
        max(1, round(view.px(2.5))),
        rng.uniform(0.5, 1.0, n),
    )
    return view.blur(canvas, 1) * view.cytoplasm


def actin_filaments(view: CellView, rng: np.random.Generator) -> np.ndarray:
    """Cortical actin under the membrane plus straight, roughly parallel stress fibres."""
    cortex = np.exp(-view.to_membrane / view.px(5)) * view.cell.mask
    n = int(np.clip(view.cell.area / view.px(70) ** 2, 4, 16))
    canvas = _canvas(view)
    heading = view.cell.angle + rng.normal(0, 0.12, n)
    starts = sample_points(rng, view.cell.mask, n) - view.px(200) * np.stack(
        [np.sin(heading), np.cos(heading)], 1
    )
    draw_curves(
        canvas,
        rng,
        starts,
        heading,
        view.px(400),
        view.px(20),
        0.0,
        max(1, round(view.px(2))),
        rng.uniform(0.5, 1.0, n),
    )
    return 0.7 * cortex + 0.6 * canvas * view.cell.mask * (view.to_membrane > view.px(4))


def microtubules(view: CellView, rng: np.random.Generator) -> np.ndarray:
    """The cell's own microtubule array (its red channel), without the diffuse tubulin pool."""
    filaments = np.clip(view.red - cv2.GaussianBlur(view.red, (0, 0), view.px(8)), 0, None)
    return np.clip(3.0 * filaments + 0.3 * view.red, 0, 1.2) * view.cell.mask


def mitotic_spindle(view: CellView, rng: np.random.Generator) -> np.ndarray:
    """A bipolar fan of fibres between the two poles, over the chromatin plate."""
    poles = np.asarray(view.cell.mtoc)
    if len(poles) < 2:
        return _canvas(view)
    canvas = _canvas(view)
    for pole, target in ((poles[0], poles[1]), (poles[1], poles[0])):
        n = 24
        heading = np.arctan2(*(target - pole)) + rng.normal(0, 0.3, n)
        draw_curves(
            canvas,
            rng,
            np.repeat(pole[None], n, 0),
            heading,
            float(np.hypot(*(target - pole))) * 0.55,
            view.px(6),
            0.03,
            1,
        )
    draw_dots(canvas, poles, np.full(2, view.px(4)))
    return view.blur(canvas, 1.5) * view.cell.mask * 1.5


def centrosome(view: CellView, rng: np.random.Generator) -> np.ndarray:
    """One or two bright dots at the microtubule organising centre next to the nucleus."""
    mtoc = np.asarray(view.cell.mtoc[:1])
    n = int(rng.integers(1, 3))
    points = np.repeat(mtoc, n, 0) + rng.normal(0, view.px(6), (n, 2))
    canvas = _canvas(view)
    draw_dots(canvas, points, np.full(n, view.px(7)))
    return view.blur(canvas, 1.5) * 1.6


def plasma_membrane(view: CellView, rng: np.random.Generator) -> np.ndarray:
    """A sharp rim at the cell edge, patchy along its length."""
    rim = np.exp(-view.to_membrane / view.px(3.5)) * view.cell.mask
    return 0.7 * rim * np.clip(0.8 + 0.25 * smooth_noise(rng, rim.shape, view.px(15)), 0.3, None)


def mitochondria(view: CellView, rng: np.random.Generator) -> np.ndarray:
    """Many short curved tubules (worms), denser around the nucleus."""
    n = int(np.clip(view.cytoplasm.sum() / view.px(14) ** 2, 30, 300))
    canvas = _canvas(view)
    starts = sample_points(rng, view.cytoplasm, n, weight=np.exp(-view.to_nucleus / view.px(50)))
    draw_curves(
        canvas,
        rng,
        starts,
        rng.uniform(0, 2 * np.pi, n),
        view.px(rng.uniform(10, 25)),
        view.px(3),
        0.4,
        max(1, round(view.px(3))),
        rng.uniform(0.5, 1.0, n),
    )
    return view.blur(canvas, 1) * view.cytoplasm


def aggresome(view: CellView, rng: np.random.Generator) -> np.ndarray:
    """One bright, dense, granular inclusion beside the nucleus."""
    near = view.cytoplasm & (view.to_nucleus > view.px(20)) & (view.to_nucleus < view.px(45))
    anchor = sample_points(rng, near if near.any() else view.cytoplasm, 1)
    canvas = _canvas(view)
    if len(anchor):
        draw_dots(canvas, anchor, np.array([view.px(rng.uniform(25, 40))]))
    grain = 0.8 + 0.2 * smooth_noise(rng, canvas.shape, view.px(2))
    return view.blur(canvas * grain, 2) * view.cell.mask * 1.5


def cytosol(view: CellView, rng: np.random.Generator) -> np.ndarray:
    """Even, diffuse fill of the cytoplasm, a little brighter where the cell is thick (near the nucleus)."""
    thickness = 0.6 + 0.4 * np.exp(-view.to_nucleus / view.px(80))
    return (
        view.blur(
            thickness * view.cytoplasm * (0.9 + 0.1 * smooth_noise(rng, thickness.shape, view.px(6))), 2
        )
        * 0.7
    )


def vesicles(view: CellView, rng: np.random.Generator) -> np.ndarray:
    """Many small round dots scattered through the cytoplasm."""
    n = int(np.clip(view.cytoplasm.sum() / view.px(22) ** 2, 25, 200))
    canvas = _canvas(view)
    draw_dots(
        canvas,
        sample_points(rng, view.cytoplasm, n),
        rng.uniform(view.px(2), view.px(4), n),
        rng.uniform(0.5, 1.0, n),
    )
    return view.blur(canvas, 1.2) * view.cytoplasm * 1.3


def autofluorescence(view: CellView, rng: np.random.Generator) -> np.ndarray:
    """Negative: only the faint, unspecific glow every cell has (cytoplasm a little above the nucleus)."""
    return (0.03 * view.cell.mask + 0.015 * view.cytoplasm).astype(np.float32)


PATTERNS: dict[int, Pattern] = {
    0: Pattern(HPA2021_CLASSES[0], nucleoplasm),
    1: Pattern(HPA2021_CLASSES[1], nuclear_membrane, interphase_only=True),
    2: Pattern(HPA2021_CLASSES[2], nucleoli, interphase_only=True),
    3: Pattern(HPA2021_CLASSES[3], fibrillar_center, interphase_only=True),
    4: Pattern(HPA2021_CLASSES[4], nuclear_speckles, interphase_only=True),
    5: Pattern(HPA2021_CLASSES[5], nuclear_bodies, interphase_only=True),
    6: Pattern(HPA2021_CLASSES[6], endoplasmic_reticulum),
    7: Pattern(HPA2021_CLASSES[7], golgi, interphase_only=True),
    8: Pattern(HPA2021_CLASSES[8], intermediate_filaments),
    9: Pattern(HPA2021_CLASSES[9], actin_filaments),
    10: Pattern(HPA2021_CLASSES[10], microtubules, interphase_only=True),
    11: Pattern(HPA2021_CLASSES[11], mitotic_spindle, mitotic_only=True),
    12: Pattern(HPA2021_CLASSES[12], centrosome, interphase_only=True),
    13: Pattern(HPA2021_CLASSES[13], plasma_membrane),
    14: Pattern(HPA2021_CLASSES[14], mitochondria),
    15: Pattern(HPA2021_CLASSES[15], aggresome, interphase_only=True),
    16: Pattern(HPA2021_CLASSES[16], cytosol),
    17: Pattern(HPA2021_CLASSES[17], vesicles),
    NEGATIVE: Pattern(HPA2021_CLASSES[NEGATIVE], autofluorescence),
}
