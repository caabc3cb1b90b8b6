"""Where the cells and nuclei of one synthetic image lie: cell-line presets, seed placement, shapes.

Every length of a preset is in pixels of a real 2048² HPA image, where the HPA-Cell-Segmentation masks
of ``../shared/data/hpa2021`` measure a median cell equivalent diameter of 300-450 px per image and
nuclei of ~170-210 px; ``scale`` (``SyntheticConfig.cell_scale``) converts them to pixels of the image being made.
Cells are star-shaped blobs around their nucleus; where two blobs overlap the pixel goes to the cell it
is relatively deeper inside, which gives touching cells straight, shared borders as in a packed culture.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import cv2
import numpy as np

from weakcell.errors import UnknownName


@dataclass(frozen=True)
class CellLine:
    """Size and shape distribution of one cell line (lengths in px at 2048², real HPA scale)."""

    name: str
    cell_radius: tuple[float, float]  # mean, sd of the equivalent cell radius
    elongation: tuple[float, float]  # range of major/minor axis ratio of the cell
    irregularity: float  # amplitude of the low-order harmonics of the outline (protrusions)
    nucleus_ratio: tuple[float, float]  # range of nucleus radius / cell radius
    density: float  # cells per field relative to ``cells_per_image``
    spacing: float  # closest nucleus-to-nucleus distance, in mean cell radii
    clustering: float  # probability that a new cell grows next to an existing one (colonies)
    protrusions: tuple[int, int]  # range of long tapering arms (lamellipodia, tails) per cell


CELL_LINES: dict[str, CellLine] = {
    # Large, flat, spread osteosarcoma cells with long protrusions; sparse.
    "U-2 OS": CellLine("U-2 OS", (240.0, 45.0), (1.3, 2.8), 0.32, (0.34, 0.44), 0.8, 0.95, 0.1, (1, 4)),
    # Compact epidermoid carcinoma cells growing in tight islands.
    "A-431": CellLine("A-431", (180.0, 28.0), (1.0, 1.6), 0.14, (0.44, 0.54), 1.2, 1.05, 0.5, (0, 2)),
    # Medium, irregular, often spindle-like cervical carcinoma cells.
    "HeLa": CellLine("HeLa", (210.0, 40.0), (1.2, 2.4), 0.26, (0.38, 0.48), 1.0, 1.0, 0.2, (1, 3)),
    # Packed polygonal colorectal epithelium: cells tile the field and share their borders.
    "CACO-2": CellLine("CACO-2", (160.0, 18.0), (1.0, 1.4), 0.08, (0.44, 0.54), 1.6, 1.1, 0.8, (0, 1)),
}


def get_cell_line(name: str) -> CellLine:
    """The preset called ``name``; a clear error lists the known ones."""
    try:
        return CELL_LINES[name]
    except KeyError:
        raise UnknownName(
            f"unknown cell line {name!r} in synthetic.cell_lines; known: {', '.join(CELL_LINES)}"
        ) from None


@dataclass
class Cell:
    """One cell's geometry inside its bounding box ``box`` = (y0, y1, x0, x1) of the image.

    Masks are bool ``(y1 - y0, x1 - x0)``; points are (y, x) in box coordinates, lengths in image px.
    """

    cell_id: int
    box: tuple[int, int, int, int]
    mask: np.ndarray
    nucleus: np.ndarray
    nucleoli: np.ndarray
    nucleus_center: tuple[float, float]
    nucleus_radius: float
    radius: float
    angle: float  # radians, orientation of the cell's long axis
    mtoc: tuple[tuple[float, float], ...]  # microtubule organising centre(s): one, or two spindle poles
    mitotic: bool

    @property
    def slices(self) -> tuple[slice, slice]:
        """Index of the box in the full image."""
        y0, y1, x0, x1 = self.box
        return slice(y0, y1), slice(x0, x1)

    @property
    def area(self) -> int:
        return int(self.mask.sum())


@dataclass
class Layout:
    """All cells of one image plus the full-size instance masks (uint16, 0 = background)."""

    cells: list[Cell]
    cell_mask: np.ndarray
    nucleus_mask: np.ndarray


ANGLE_BINS = 720  # angular resolution of an outline lookup table


@dataclass(frozen=True)
class _Blob:
    """A star-shaped outline: radius(θ) = base · ellipse(θ) · exp(Σ a_k cos(kθ + φ_k) + Σ arms), an arm
    being A·exp(-(Δθ / w)²) around its direction: a long protrusion that tapers to a point."""

    center: tuple[float, float]
    radius: float
    elongation: float
    angle: float
    harmonics: tuple[tuple[int, float, float], ...]  # (order k, amplitude a_k, phase φ_k)
    arms: tuple[tuple[float, float, float], ...] = ()  # (direction rad, log-length A, half-width w rad)

    def outline(self, theta: np.ndarray) -> np.ndarray:
        """Radius of the outline (px) at angles ``theta`` (radians, image frame)."""
        relative = theta - self.angle
        # Ellipse of equal area to the circle of ``radius``: semi-axes r·√e and r/√e.
        major, minor = self.radius * np.sqrt(self.elongation), self.radius / np.sqrt(self.elongation)
        ellipse = major * minor / np.sqrt((minor * np.cos(relative)) ** 2 + (major * np.sin(relative)) ** 2)
        log_radius = sum(a * np.cos(k * relative + phase) for k, a, phase in self.harmonics)
        for direction, length, width in self.arms:
            offset = (relative - direction + np.pi) % (2 * np.pi) - np.pi  # wrapped to [-π, π)
            log_radius = log_radius + length * np.exp(-((offset / width) ** 2))
        return ellipse * np.exp(log_radius)

    @cached_property
    def _table(self) -> np.ndarray:
        """The outline sampled every 0.5° (``ANGLE_BINS``,): per-pixel lookups replace per-pixel trig."""
        return self.outline(np.arange(ANGLE_BINS) * (2 * np.pi / ANGLE_BINS) - np.pi).astype(np.float32)

    @property
    def reach(self) -> float:
        """Largest radius of the outline, px."""
        return float(self._table.max()) * 1.02

    def depth(self, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
        """Normalised radial distance of each point: < 1 inside the outline, 0 at the centre."""
        dy, dx = ys - np.float32(self.center[0]), xs - np.float32(self.center[1])
        bins = ((np.arctan2(dy, dx) + np.pi) * (ANGLE_BINS / (2 * np.pi))).astype(np.int32) % ANGLE_BINS
        return np.hypot(dy, dx) / self._table[bins]


def _random_blob(
    rng: np.random.Generator,
    center: tuple[float, float],
    radius: float,
    elongation: float,
    angle: float,
    irregularity: float,
    n_arms: int = 0,
) -> _Blob:
    # Order 1 makes a tear-drop, orders 2-5 lobes; arms add thin tapering protrusions.
    orders = (1, 2, 3, 4, 5)
    harmonics = tuple(
        (k, irregularity * rng.uniform(0.2, 1.0) / k**0.5, rng.uniform(0, 2 * np.pi)) for k in orders
    )
    arms = tuple(
        (rng.uniform(0, 2 * np.pi), rng.uniform(0.4, 0.9), rng.uniform(0.15, 0.35)) for _ in range(n_arms)
    )
    return _Blob(center, radius, elongation, angle, harmonics, arms)


def place_seeds(
    rng: np.random.Generator, size: int, n_cells: int, spacing: float, clustering: float
) -> np.ndarray:
    """Up to ``n_cells`` nucleus positions ``(N, 2)`` (y, x) in ``[0, size)²``, none closer than
    ``spacing`` px; with probability ``clustering`` a new seed grows beside an existing one."""
    seeds: list[np.ndarray] = []
    for _ in range(n_cells * 40):
        if len(seeds) == n_cells:
            break
        if seeds and rng.random() < clustering:
            parent = seeds[rng.integers(len(seeds))]
            direction = rng.uniform(0, 2 * np.pi)
            candidate = parent + rng.uniform(1.0, 1.5) * spacing * np.array(
                [np.sin(direction), np.cos(direction)]
            )
        else:
            candidate = rng.uniform(0, size, 2)
        if not (0 <= candidate[0] < size and 0 <= candidate[1] < size):
            continue
        if seeds and np.min(np.hypot(*(np.asarray(seeds) - candidate).T)) < spacing:
            continue
        seeds.append(candidate)
    return np.asarray(seeds, dtype=np.float64).reshape(-1, 2)


def _box_around(center: tuple[float, float], reach: float, size: int) -> tuple[int, int, int, int]:
    y0, x0 = (max(0, int(np.floor(c - reach)) - 1) for c in center)
    y1, x1 = (min(size, int(np.ceil(c + reach)) + 2) for c in center)
    return y0, y1, x0, x1


def _grid(box: tuple[int, int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Row ``(h, 1)`` and column ``(1, w)`` coordinates of a box; they broadcast to the box."""
    y0, y1, x0, x1 = box
    return np.arange(y0, y1, dtype=np.float32)[:, None], np.arange(x0, x1, dtype=np.float32)[None, :]


def _interphase_shapes(
    rng: np.random.Generator, seed: tuple[float, float], radius: float, line: CellLine
) -> tuple[_Blob, list[_Blob]]:
    """A spread cell of ``line`` around the nucleus at ``seed``: the outline and the nucleus."""
    angle = rng.uniform(0, np.pi)
    elongation = rng.uniform(*line.elongation)
    # The nucleus sits off-centre along the long axis, as in spread cells.
    shift = rng.uniform(-0.15, 0.15) * radius * np.sqrt(elongation)
    cell_center = (seed[0] + shift * np.sin(angle), seed[1] + shift * np.cos(angle))
    n_arms = int(rng.integers(line.protrusions[0], line.protrusions[1] + 1))
    cell = _random_blob(rng, cell_center, radius, elongation, angle, line.irregularity, n_arms)
    nucleus_radius = rng.uniform(*line.nucleus_ratio) * radius
    nucleus_elongation = rng.uniform(1.0, min(1.8, 0.6 + elongation))
    nucleus = _random_blob(rng, seed, nucleus_radius, nucleus_elongation, angle + rng.normal(0, 0.3), 0.05)
    return cell, [nucleus]


def _mitotic_shapes(
    rng: np.random.Generator, seed: tuple[float, float], radius: float, line: CellLine
) -> tuple[_Blob, list[_Blob]]:
    """A rounded, detached cell in mitosis: condensed chromatin as one metaphase plate or two
    anaphase plates pulled apart (the plates are the cell's "nucleus" in the truth masks)."""
    angle = rng.uniform(0, np.pi)
    cell = _random_blob(rng, seed, 0.6 * radius, 1.05, angle, 0.03)
    length, width = 0.40 * radius, 0.10 * radius
    offsets = [0.0] if rng.random() < 0.6 else [-0.16 * radius, 0.16 * radius]
    normal = angle + np.pi / 2
    plates = [
        _Blob(
            (seed[0] + d * np.sin(normal), seed[1] + d * np.cos(normal)),
            np.sqrt(length * width),
            length / width,
            angle,
            ((3, 0.08, rng.uniform(0, 2 * np.pi)),),
        )
        for d in offsets
    ]
    return cell, plates


def _owners(cell_blobs: list[_Blob], boxes: list[tuple[int, int, int, int]], size: int) -> np.ndarray:
    """(size, size) int32: the 1-based index of the blob each pixel is deepest inside (smallest normalised
    radius < 1), 0 where none reaches."""
    depth = np.full((size, size), np.inf, dtype=np.float32)
    owner = np.zeros((size, size), dtype=np.int32)
    for index, (blob, box) in enumerate(zip(cell_blobs, boxes), start=1):
        if box[0] >= box[1] or box[2] >= box[3]:
            continue
        here = blob.depth(*_grid(box))
        region = (slice(box[0], box[1]), slice(box[2], box[3]))
        wins = (here < 1.0) & (here < depth[region])
        depth[region][wins] = here[wins]
        owner[region][wins] = index
    return owner


def layout_cells(
    rng: np.random.Generator, size: int, line: CellLine, n_cells: int, scale: float, mitotic: np.ndarray
) -> Layout:
    """Lay out up to ``n_cells`` cells of ``line`` on a ``size``² image at ``scale`` (image px per real
    2048² px). ``mitotic`` (bool per requested cell) makes those cells round with condensed chromatin.
    Cells whose nucleus falls outside the image are dropped; ids are 1..N in placement order."""
    mean_radius = line.cell_radius[0] * scale
    seeds = place_seeds(rng, size, n_cells, line.spacing * mean_radius, line.clustering)
    shapes = [
        (_mitotic_shapes if mitotic[index] else _interphase_shapes)(
            rng, (float(seed[0]), float(seed[1])), max(3.0, rng.normal(*line.cell_radius) * scale), line
        )
        for index, seed in enumerate(seeds)
    ]
    cell_blobs = [cell for cell, _ in shapes]
    nucleus_blobs = [nuclei for _, nuclei in shapes]

    boxes = [_box_around(blob.center, blob.reach, size) for blob in cell_blobs]
    owner = _owners(cell_blobs, boxes, size)

    cells: list[Cell] = []
    cell_mask = np.zeros((size, size), dtype=np.uint16)
    nucleus_mask = np.zeros((size, size), dtype=np.uint16)
    for index, (blob, nuclei, box) in enumerate(zip(cell_blobs, nucleus_blobs, boxes), start=1):
        region = (slice(box[0], box[1]), slice(box[2], box[3]))
        mask = owner[region] == index
        if not mask.any():
            continue
        # Shrink the box to the cell (plus a 1 px frame, so distance maps see the cell's edge).
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        box = (
            box[0] + max(0, rows[0] - 1),
            box[0] + min(mask.shape[0], rows[-1] + 2),
            box[2] + max(0, cols[0] - 1),
            box[2] + min(mask.shape[1], cols[-1] + 2),
        )
        region = (slice(box[0], box[1]), slice(box[2], box[3]))
        mask = owner[region] == index
        ys, xs = _grid(box)
        nucleus = np.zeros_like(mask)
        for nucleus_blob in nuclei:
            nucleus |= nucleus_blob.depth(ys, xs) < 1.0
        nucleus &= mask
        # Keep cells of a workable size whose nucleus is visible; a cut nucleus is fine, none is not.
        if nucleus.sum() < 4 or mask.sum() < 4 * nucleus.sum() ** 0.5:
            continue
        cell_id = len(cells) + 1
        y0, _, x0, _ = box
        center = (float(nuclei[0].center[0] - y0), float(nuclei[0].center[1] - x0))
        is_mitotic = bool(mitotic[index - 1])
        nucleus_radius = float(np.sqrt(sum(b.radius**2 for b in nuclei)))
        cells.append(
            Cell(
                cell_id=cell_id,
                box=box,
                mask=mask,
                nucleus=nucleus,
                nucleoli=np.zeros_like(mask)
                if is_mitotic
                else _nucleoli(rng, nucleus, center, nucleus_radius),
                nucleus_center=center,
                nucleus_radius=nucleus_radius,
                radius=float(blob.radius),
                angle=float(blob.angle),
                mtoc=_mtoc(rng, mask, nucleus, center, blob, is_mitotic),
                mitotic=is_mitotic,
            )
        )
        cell_mask[region][mask] = cell_id
        nucleus_mask[region][nucleus] = cell_id
    return Layout(cells, cell_mask, nucleus_mask)


def _nucleoli(
    rng: np.random.Generator, nucleus: np.ndarray, center: tuple[float, float], nucleus_radius: float
) -> np.ndarray:
    """1-4 small elliptical nucleoli inside the nucleus, bool in box coordinates."""
    canvas = np.zeros(nucleus.shape, dtype=np.uint8)
    for _ in range(rng.integers(1, 5)):
        distance = rng.uniform(0, 0.55) * nucleus_radius
        direction = rng.uniform(0, 2 * np.pi)
        y, x = center[0] + distance * np.sin(direction), center[1] + distance * np.cos(direction)
        axes = (
            max(1, round(rng.uniform(0.12, 0.22) * nucleus_radius)),
            max(1, round(rng.uniform(0.09, 0.17) * nucleus_radius)),
        )
        cv2.ellipse(canvas, (round(x), round(y)), axes, rng.uniform(0, 180), 0, 360, 1, -1)
    nucleoli = (canvas > 0) & nucleus
    if not nucleoli.any():  # a nucleus cut by the border: put one nucleolus where it is visible
        ys, xs = np.nonzero(nucleus)
        nucleoli[ys[len(ys) // 2], xs[len(xs) // 2]] = True
    return nucleoli


def _mtoc(
    rng: np.random.Generator,
    mask: np.ndarray,
    nucleus: np.ndarray,
    center: tuple[float, float],
    blob: _Blob,
    mitotic: bool,
) -> tuple[tuple[float, float], ...]:
    """Interphase: one centrosome just outside the nucleus, inside the cell. Mitosis: two spindle poles
    on either side of the chromatin plate."""
    if mitotic:
        normal = blob.angle + np.pi / 2
        reach = 0.55 * blob.radius
        return tuple(
            (center[0] + sign * reach * np.sin(normal), center[1] + sign * reach * np.cos(normal))
            for sign in (-1, 1)
        )
    outside = (~nucleus).astype(np.uint8)
    distance = cv2.distanceTransform(outside, cv2.DIST_L2, 3)
    ring = mask & ~nucleus & (distance > 0.5) & (distance < max(2.0, 0.12 * blob.radius))
    if not ring.any():
        ring = mask & ~nucleus
    if not ring.any():
        return (center,)
    ys, xs = np.nonzero(ring)
    pick = rng.integers(len(ys))
    return ((float(ys[pick]), float(xs[pick])),)
