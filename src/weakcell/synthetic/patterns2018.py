"""The green channel of the 2018 competition's 28 classes (``human-protein-atlas-image-classification``).

Seventeen 2018 classes are 2021 classes under other indices and reuse their renderers; the eleven 2018-only
ones get their own, each tied to the expressing cell's geometry the way the HPA cell atlas describes them:

- peroxisomes, endosomes, lysosomes: cytoplasmic puncta that differ in size, number and placement (many
  tiny even dots; medium dots spread to the periphery; few large ones clustered around the nucleus);
- focal adhesion sites: short radial streaks at the cell edge; microtubule ends: faint comets near the edge;
- cytokinetic bridge: the thin intercellular bridge with its bright midbody between the two daughter halves
  of a dividing cell; microtubule organizing center: a diffuse aster around the centrosome;
- lipid droplets: bright rings; cell junctions: the membrane only where the cell touches another cell;
- cytoplasmic bodies: a few sharp round bodies anywhere in the cytoplasm (an aggresome is one big one by
  the nucleus); rods & rings: a few thick straight rods and hollow rings.
"""

from __future__ import annotations

from dataclasses import replace

import cv2
import numpy as np

from weakcell.constants import HPA2018_CLASSES
from weakcell.synthetic.patterns import (
    PATTERNS,
    CellView,
    Pattern,
    _canvas,
)
from weakcell.synthetic.render import draw_curves, draw_dots, sample_points, smooth_noise

# 2018 index -> 2021 index of the same compartment (the renderer is shared).
SHARED_WITH_2021: dict[int, int] = {
    0: 0,  # Nucleoplasm
    1: 1,  # Nuclear membrane
    2: 2,  # Nucleoli
    3: 3,  # Nucleoli fibrillar center
    4: 4,  # Nuclear speckles
    5: 5,  # Nuclear bodies
    6: 6,  # Endoplasmic reticulum
    7: 7,  # Golgi apparatus
    11: 8,  # Intermediate filaments
    12: 9,  # Actin filaments
    14: 10,  # Microtubules
    17: 11,  # Mitotic spindle
    19: 12,  # Centrosome
    21: 13,  # Plasma membrane
    23: 14,  # Mitochondria
    24: 15,  # Aggresome
    25: 16,  # Cytosol
}


def _puncta(
    view: CellView,
    rng: np.random.Generator,
    per_area: float,
    count: tuple[int, int],
    radius: tuple[float, float],
    weight: np.ndarray | None,
    gain: float,
) -> np.ndarray:
    """Dots in the cytoplasm: one per ``per_area``² real px (clipped to ``count``), radii in real px."""
    n = int(np.clip(view.cytoplasm.sum() / view.px(per_area) ** 2, *count))
    canvas = _canvas(view)
    draw_dots(
        canvas,
        sample_points(rng, view.cytoplasm, n, weight=weight),
        rng.uniform(view.px(radius[0]), view.px(radius[1]), n),
        rng.uniform(0.6, 1.0, n),
    )
    return view.blur(canvas, 1.0) * view.cytoplasm * gain


def peroxisomes(view: CellView, rng: np.random.Generator) -> np.ndarray:
    """Many tiny, evenly bright dots spread evenly over the whole cytoplasm."""
    return _puncta(view, rng, 16, (40, 260), (1.5, 2.5), None, 1.5)


def endosomes(view: CellView, rng: np.random.Generator) -> np.ndarray:
    """Medium dots of mixed brightness, biased towards the cell periphery."""
    weight = 1.0 - np.exp(-view.to_nucleus / view.px(60))
    return _puncta(view, rng, 34, (15, 80), (3.5, 6.0), weight, 1.3)


def lysosomes(view: CellView, rng: np.random.Generator) -> np.ndarray:
    """Few large dots clustered around the nucleus."""
    weight = np.exp(-view.to_nucleus / view.px(30))
    return _puncta(view, rng, 60, (6, 30), (6.0, 10.0), weight, 1.2)


def _radial_streaks(
    view: CellView, rng: np.random.Generator, where: np.ndarray, n: int, length: float, thickness: float
) -> np.ndarray:
    """``n`` straight streaks starting in ``where``, pointing away from the nucleus centre."""
    starts = sample_points(rng, where, n)
    canvas = _canvas(view)
    if len(starts) == 0:
        return canvas
    heading = np.arctan2(*(starts - np.asarray(view.cell.nucleus_center)).T)
    # start a little inside so each streak ends at ``where``
    starts = starts - 0.5 * view.px(length) * np.stack([np.sin(heading), np.cos(heading)], 1)
    draw_curves(
        canvas,
        rng,
        starts,
        heading,
        view.px(length),
        view.px(length) / 3,
        0.0,
        max(1, round(view.px(thickness))),
        rng.uniform(0.6, 1.0, n),
    )
    return canvas


def focal_adhesions(view: CellView, rng: np.random.Generator) -> np.ndarray:
    """Short, bright, radially oriented streaks right at the cell edge."""
    edge = view.cell.mask & (view.to_membrane < view.px(12)) & ~view.cell.nucleus
    n = int(np.clip(view.cell.area / view.px(45) ** 2, 8, 40))
    return view.blur(_radial_streaks(view, rng, edge, n, 28, 4), 1.0) * view.cell.mask * 1.4


def microtubule_ends(view: CellView, rng: np.random.Generator) -> np.ndarray:
    """Many faint comets (plus-end tips) near the periphery over a faint cytosolic pool."""
    rim = view.cytoplasm & (view.to_membrane < view.px(30))
    n = int(np.clip(view.cytoplasm.sum() / view.px(22) ** 2, 20, 150))
    comets = _radial_streaks(view, rng, rim, n, 10, 2.5)
    return view.blur(comets, 1.0) * view.cell.mask + 0.1 * view.cytoplasm


def cytokinetic_bridge(view: CellView, rng: np.random.Generator) -> np.ndarray:
    """A thin bridge along the division axis with a bright midbody halfway between the daughter nuclei."""
    poles = np.asarray(view.cell.mtoc)
    if len(poles) < 2:
        return _canvas(view)
    middle, axis = poles.mean(0), poles[1] - poles[0]
    heading = float(np.arctan2(*axis))
    half = 0.9 * float(np.hypot(*axis))
    start = middle - half * np.array([np.sin(heading), np.cos(heading)])
    canvas = _canvas(view)
    draw_curves(
        canvas, rng, start[None], np.array([heading]), 2 * half, view.px(8), 0.02, max(1, round(view.px(3)))
    )
    canvas *= 0.6
    draw_dots(canvas, middle[None], np.array([view.px(9)]))
    return view.blur(canvas, 1.2) * view.cell.mask * 1.5


def microtubule_organizing_center(view: CellView, rng: np.random.Generator) -> np.ndarray:
    """A diffuse aster around the centrosome: a soft cloud with short fibres radiating from it."""
    center = np.asarray(view.cell.mtoc[:1])
    canvas = _canvas(view)
    n = 18
    draw_curves(
        canvas,
        rng,
        np.repeat(center, n, 0),
        rng.uniform(0, 2 * np.pi, n),
        view.px(45),
        view.px(6),
        0.15,
        1,
        rng.uniform(0.3, 0.6, n),
    )
    cloud = _canvas(view)
    draw_dots(cloud, center, np.array([view.px(22)]))
    return (view.blur(canvas, 1.5) + 0.8 * view.blur(cloud, 8)) * view.cell.mask * 1.3


def lipid_droplets(view: CellView, rng: np.random.Generator) -> np.ndarray:
    """A few to a dozen bright rings (the droplet's coat) in the cytoplasm."""
    n = int(rng.integers(3, 14))
    centers = sample_points(rng, view.cytoplasm, n)
    canvas = _canvas(view)
    for (y, x), radius in zip(centers, rng.uniform(view.px(6), view.px(12), len(centers))):
        cv2.circle(
            canvas,
            (round(x * 16), round(y * 16)),
            max(16, round(radius * 16)),
            1.0,
            max(1, round(view.px(3))),
            cv2.LINE_AA,
            shift=4,
        )
    return view.blur(canvas, 1.0) * view.cytoplasm * 1.5


def cell_junctions(view: CellView, rng: np.random.Generator) -> np.ndarray:
    """The membrane only where this cell touches another: a bright line on the shared border."""
    if view.neighbours is None or not view.neighbours.any():
        return _canvas(view)
    rim = np.exp(-view.to_membrane / view.px(3.5)) * view.cell.mask
    near = cv2.dilate(view.neighbours.astype(np.uint8), np.ones((3, 3), np.uint8), iterations=2) > 0
    contact = view.blur(near.astype(np.float32), 4) > 0.05
    return rim * contact * (0.85 + 0.15 * smooth_noise(rng, rim.shape, view.px(10)))


def cytoplasmic_bodies(view: CellView, rng: np.random.Generator) -> np.ndarray:
    """One to four sharp, round, evenly bright bodies anywhere in the cytoplasm."""
    n = int(rng.integers(1, 5))
    canvas = _canvas(view)
    draw_dots(canvas, sample_points(rng, view.cytoplasm, n), rng.uniform(view.px(7), view.px(11), n))
    return view.blur(canvas, 1.0) * view.cytoplasm * 1.5


def rods_and_rings(view: CellView, rng: np.random.Generator) -> np.ndarray:
    """One to four thick straight rods and hollow rings in the cytoplasm."""
    n = int(rng.integers(1, 5))
    centers = sample_points(rng, view.cytoplasm, n)
    canvas = _canvas(view)
    thickness = max(1, round(view.px(5)))
    for (y, x), is_ring in zip(centers, rng.random(len(centers)) < 0.5):
        if is_ring:
            cv2.circle(
                canvas, (round(x * 16), round(y * 16)), max(16, round(view.px(11) * 16)), 1.0, thickness,
                cv2.LINE_AA, shift=4,
            )  # fmt: skip
        else:
            heading, half = rng.uniform(0, np.pi), view.px(rng.uniform(15, 30))
            dy, dx = half * np.sin(heading), half * np.cos(heading)
            ends = [
                (round((x - dx) * 16), round((y - dy) * 16)),
                (round((x + dx) * 16), round((y + dy) * 16)),
            ]
            cv2.line(canvas, ends[0], ends[1], 1.0, thickness, cv2.LINE_AA, shift=4)
    return view.blur(canvas, 1.0) * view.cytoplasm * 1.5


OWN_2018: dict[int, Pattern] = {
    8: Pattern(HPA2018_CLASSES[8], peroxisomes),
    9: Pattern(HPA2018_CLASSES[9], endosomes),
    10: Pattern(HPA2018_CLASSES[10], lysosomes),
    13: Pattern(HPA2018_CLASSES[13], focal_adhesions, interphase_only=True),
    15: Pattern(HPA2018_CLASSES[15], microtubule_ends, interphase_only=True),
    16: Pattern(HPA2018_CLASSES[16], cytokinetic_bridge, mitotic_only=True),
    18: Pattern(HPA2018_CLASSES[18], microtubule_organizing_center, interphase_only=True),
    20: Pattern(HPA2018_CLASSES[20], lipid_droplets),
    22: Pattern(HPA2018_CLASSES[22], cell_junctions, touching_only=True),
    26: Pattern(HPA2018_CLASSES[26], cytoplasmic_bodies),
    27: Pattern(HPA2018_CLASSES[27], rods_and_rings),
}

PATTERNS_2018: dict[int, Pattern] = dict(
    sorted(
        {
            **{
                c: replace(PATTERNS[shared], name=HPA2018_CLASSES[c])
                for c, shared in SHARED_WITH_2021.items()
            },
            **OWN_2018,
        }.items()
    )
)
