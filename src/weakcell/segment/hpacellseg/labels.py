"""HPA-Cell-Segmentation's post-processing (``hpacellseg.utils.label_cell``), same labels, a fraction of
the time, at any resolution.

Upstream turns the two U-Nets' outputs (uint8 ``(H, W, 3)``: channel 1 the touching border, channel 2 the
foreground) into nuclei and cells in five steps:

1. nuclei: seeds where the nucleus foreground is confident and no border is predicted, flooded over the
   nucleus mask with watershed lines; objects under 2,500 px go;
2. cells: the nuclei flooded over the cell foreground (above max(0.22, Otsu / 2)) by the foreground
   intensity; cells under 5,500 px go;
3. a grey closing with ``disk(6)`` and hole filling (every label boundary is erased first);
4. the cells flooded once more into the predicted touching borders, holes filled again;
5. cells relabelled, small ones dropped; each nucleus takes its cell's label.

Here every step gives the same pixels as upstream's scikit-image / SciPy calls on the same input (the
tests hold it against a step-by-step reference), with these changes of method, not of result:

- thresholds are 256-entry lookup tables of upstream's own float expressions, applied to the uint8 maps;
- connected components, areas, hole filling and morphology are OpenCV passes (the closing's disk as the
  union of a few rectangles, each separable); labels that upstream numbers in raster order are renumbered
  so (``measure.label`` / ``ndi.label`` order matters: the closing takes the max / min of label values);
- the watersheds flood only what is undecided. A mask component holding one marker label becomes that
  label entirely (every pixel of it is reached from that marker and from no other), and markers with no
  unlabelled neighbour never push anything; scikit-image's watershed runs only on the rest, inside the
  bounding box of each contested component. The nuclei flood (flat: the image is the mask) never leaves
  a mask component, so it is decided per component of the mask itself. The first cell flood also settles
  its bright low ground up front (components of foreground >= ``SETTLE_LEVEL`` reached by one nucleus
  alone, see ``_settle_low_ground``): on the densest test image scikit-image floods 0.44 M pixels, not
  2.43 M. The only freedom left is the order in which markers of equal priority leave scikit-image's
  heap, which depends on the heap's whole content: pixels at exactly equal flooding cost from two markers
  may go to the other one (a handful of pixels per image);
- where numba is installed (the ``numba`` extra; Kaggle's image has none), ``compiled.py``'s kernels
  take over: a bucket queue floods the cells over the whole mask in one pass, in scikit-image's order up
  to ties between markers of equal height (no contested-ground search, no settling); the nuclei keep
  their per-component split (most nucleus-mask components hold one seed), the queue flooding the
  contested ones; labelling statistics, per-label lookups, small-label removal, boundary erasing and
  label boxes are one compiled pass each. ``USE_COMPILED = False`` forces the numpy / scikit-image path
  (``benchmarks/segmentation.md``: 10.7x the step-by-step reference with numba, 4.5x without);
- labels are never cast to uint8: upstream wraps above 255 cells (cell 256 becomes background, 257 merges
  with cell 1 in the closing); here they stay distinct.

``scale`` runs the same procedure on maps at another resolution: ``scale`` pixels of these maps per pixel
of the full-resolution maps upstream's constants are for (its thresholds are for HPA's 2048² images; a
2048² image labelled at 1024² has ``scale=0.5``). Areas scale with ``scale²``, the closing radius with
``scale``.

About 580 lines: the five steps share the OpenCV passes and the contested-only flooding above them,
each a few lines, and choose between the compiled kernels and numpy in one place each; kept with
``label_cell`` so the equivalence with upstream reads in one file.

Not used, measured (issue 27): ``scipy.ndimage.watershed_ift`` costs a path by its largest *difference*
between neighbours (not its highest pixel) and takes an equal-cost object pixel last-in first-out, so it
is another watershed; a numpy replay of scikit-image's queue (one vectorised step per breadth-first wave
and height) gives the same labels but needs 300-4,500 waves per flood and is slower than the heap.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from types import ModuleType

import cv2
import numpy as np
from scipy import ndimage as ndi
from skimage.filters import threshold_otsu
from skimage.segmentation import watershed

from weakcell.segment.classical import fill_binary_holes  # ndi.binary_fill_holes by one cv2 labelling

BORDER, FOREGROUND = 1, 2  # channels of the network outputs (channel 0, the background, is unused)
# Upstream's constants, at the full resolution of an HPA 2048² image.
NUCLEUS_THRESHOLD = 0.4  # nucleus mask: foreground above this
SEED_ADJUSTMENT = -0.25  # nucleus seeds: foreground above NUCLEUS_THRESHOLD + this, away from borders
BORDER_CUTOFF = 0.05  # a pixel is "border" where the touching-border probability exceeds this
CELL_FLOOR = 0.22  # cell mask: foreground above max(this, Otsu / 2)
MIN_SEED_AREA = 500
MIN_HOLE_AREA = 1000  # holes of the nucleus mask under this are filled
MIN_MASK_AREA = 8
MIN_NUCLEUS_AREA = 2500
MIN_CELL_AREA = 5500
CLOSING_RADIUS = 6
# The first cell flood labels up front what one nucleus alone reaches through foreground >= this (uint8;
# any value keeps the watershed's labels, see _settle_low_ground; 240 settles the cells' bright interiors).
SETTLE_LEVEL = 240


@dataclass(frozen=True)
class Sizes:
    """Upstream's pixel sizes at one resolution: areas in pixels (an object under ``x`` pixels goes),
    the closing's disk radius in pixels."""

    seed: float
    hole: float
    mask: float
    nucleus: float
    cell: float
    closing_radius: int

    @classmethod
    def at(cls, scale: float) -> Sizes:
        """The sizes on maps with ``scale`` pixels per full-resolution pixel (1 = upstream's)."""
        area = scale * scale
        return cls(
            seed=MIN_SEED_AREA * area,
            hole=MIN_HOLE_AREA * area,
            mask=MIN_MASK_AREA * area,
            nucleus=MIN_NUCLEUS_AREA * area,
            cell=MIN_CELL_AREA * area,
            closing_radius=max(1, round(CLOSING_RADIUS * scale)),
        )


# -- lookup tables of upstream's float expressions on uint8 values -------------------------------------------

_LEVELS = np.arange(256, dtype=np.float64)
_NUCLEUS_MASK = _LEVELS / 255.0 > NUCLEUS_THRESHOLD
_SEED = _LEVELS / 255 > NUCLEUS_THRESHOLD + SEED_ADJUSTMENT
# Upstream adds the two border maps as uint8 (the sum wraps above 255) and keeps pixels where 1 - sum / 255
# exceeds the cutoff; the table is indexed by the wrapped sum, as upstream computes it.
_NOT_BORDER = 1 - _LEVELS / 255.0 > BORDER_CUTOFF
_BORDER = _LEVELS / 255 > BORDER_CUTOFF
_FLAT = np.zeros(256)  # the nuclei flood's heights: the image is the mask, one height inside


def _lookup(table: np.ndarray, plane: np.ndarray) -> np.ndarray:
    """bool ``table[plane]`` for a uint8 plane (cv2.LUT: one pass, no int64 index array)."""
    return cv2.LUT(plane, table.astype(np.uint8)).view(bool)


# -- the compiled kernels (numba, optional) ---------------------------------------------------------------------

# compiled.py's kernels run where numba is installed (the numba extra); False forces the numpy /
# scikit-image path everywhere (Kaggle's image has no numba; tests and benchmarks compare the two).
USE_COMPILED = True


@functools.cache
def _compiled_kernels() -> ModuleType | None:
    """``compiled.py``, or None where numba is not installed."""
    try:
        from weakcell.segment.hpacellseg import compiled
    except ImportError:
        return None
    return compiled


def kernels() -> ModuleType | None:
    """The numba kernels label_cell uses now: None on the numpy / scikit-image path."""
    return _compiled_kernels() if USE_COMPILED else None


def _gather(table: np.ndarray, index: np.ndarray) -> np.ndarray:
    """``table[index]`` for an int32 label image: compiled where numba is installed (4x numpy's)."""
    compiled = kernels()
    return table[index] if compiled is None else compiled.gather(table, index)


# -- connected components and areas ---------------------------------------------------------------------------


def _components(mask: np.ndarray, connectivity: int) -> tuple[int, np.ndarray, np.ndarray]:
    """``(n, labels, stats)`` of cv2's connected components of a bool mask (label 0 = background).

    How, by speed (one thread, 2048²): 8-connected, BBDT computes the statistics while labelling (2.5x
    cv2's default algorithm); 4-connected, where numba is installed, a plain labelling and the compiled
    statistics (2.3x ``connectedComponentsWithStats``, which spends three times its labelling on them)."""
    plane = mask.view(np.uint8)
    if connectivity == 8:
        return cv2.connectedComponentsWithStatsWithAlgorithm(plane, 8, cv2.CV_32S, cv2.CCL_BBDT)[:3]
    compiled = kernels()
    if compiled is not None:
        n, regions = cv2.connectedComponents(plane, connectivity=4, ltype=cv2.CV_32S)
        return n, regions, compiled.component_stats(regions, n)
    return cv2.connectedComponentsWithStats(plane, connectivity=4, ltype=cv2.CV_32S)[:3]


def _remove_small_regions(mask: np.ndarray, min_area: float, connectivity: int = 4) -> np.ndarray:
    """``mask`` without its connected components of fewer than ``min_area`` pixels (4-connected, as
    ``remove_small_objects`` of a bool array)."""
    _, regions, stats = _components(mask, connectivity)
    keep = stats[:, cv2.CC_STAT_AREA] >= min_area
    keep[0] = False
    if keep[1:].all():
        return mask
    return _gather(keep, regions)


def _remove_small_labels(labels: np.ndarray, min_area: float) -> np.ndarray:
    """``labels`` with every label of fewer than ``min_area`` pixels set to 0 (``remove_small_objects`` of
    an int array: each value one object, however many pieces it has)."""
    compiled = kernels()
    if compiled is not None:  # in place: the callers' arrays are their own
        compiled.remove_small_labels(labels, min_area)
        return labels
    counts = np.bincount(labels.ravel(), minlength=1)
    small = counts < min_area
    small[0] = False
    if not small.any():
        return labels
    lut = np.arange(counts.size, dtype=labels.dtype)
    lut[small] = 0
    return lut[labels]  # one gather, not a gather and a select


def _first_pixel(regions: np.ndarray, stats: np.ndarray, k: int) -> tuple[int, int]:
    """(row, column) of cv2 component ``k``'s first pixel in a raster scan: in its top row, the first
    column of that row holding it."""
    top, left, span = stats[k, cv2.CC_STAT_TOP], stats[k, cv2.CC_STAT_LEFT], stats[k, cv2.CC_STAT_WIDTH]
    return int(top), int(left + np.argmax(regions[top, left : left + span] == k))


def _raster_order(regions: np.ndarray, stats: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """LUT renumbering the ``kept`` cv2 components 1.. in the order of their first pixel in a raster scan,
    the order of ``ndi.label`` and ``skimage.measure.label`` (cv2's parallel labelling numbers otherwise);
    the others map to 0."""
    components = np.flatnonzero(kept)
    first = [_first_pixel(regions, stats, int(k)) for k in components]
    lut = np.zeros(len(stats), dtype=np.int32)
    lut[components[sorted(range(components.size), key=first.__getitem__)]] = np.arange(
        1, components.size + 1, dtype=np.int32
    )
    return lut


def _label_large(mask: np.ndarray, connectivity: int, min_area: float) -> np.ndarray:
    """int32 connected components of a bool mask of at least ``min_area`` pixels, numbered 1.. in raster
    order: ``measure.label`` (8-connectivity; ``ndi.label`` with 4), ``remove_small_objects`` and
    ``measure.label`` again, in one labelling and one lookup (the areas are cv2's statistics)."""
    _, regions, stats = _components(mask, connectivity)
    small = stats[:, cv2.CC_STAT_AREA] < min_area
    small[0] = True
    lut = _raster_order(regions, stats, ~small)
    return _gather(lut, regions)


def _label_boxes(labels: np.ndarray) -> list[tuple[slice, slice] | None]:
    """``ndi.find_objects(labels)``: the bounding box of each label 1..max, None where absent (from the
    compiled statistics where numba is installed: one pass, 3x SciPy's)."""
    compiled = kernels()
    if compiled is None:
        return ndi.find_objects(labels)
    stats = compiled.component_stats(labels, int(labels.max(initial=0)) + 1)[1:].tolist()
    return [
        (slice(top, top + height), slice(left, left + width)) if area else None
        for left, top, width, height, area in stats
    ]


def _relabel_pieces(labels: np.ndarray) -> np.ndarray:
    """``skimage.measure.label`` of a label image: each 8-connected piece of one value becomes its own
    label (neighbouring values stay apart), numbered in raster order of the pieces' first pixels. Works
    inside each label's bounding box."""
    pieces: list[tuple[tuple[int, int], tuple[slice, slice], np.ndarray, int]] = []  # first pixel, box, piece
    for value, box in enumerate(_label_boxes(labels), start=1):
        if box is None:
            continue
        n, regions, stats = _components(labels[box] == value, 8)
        for k in range(1, n):
            row, column = _first_pixel(regions, stats, k)
            pieces.append(((box[0].start + row, box[1].start + column), box, regions, k))
    relabelled = np.zeros(labels.shape, dtype=np.int32)
    for new, (_, box, regions, k) in enumerate(sorted(pieces, key=lambda piece: piece[0]), start=1):
        relabelled[box][regions == k] = new
    return relabelled


def _fill_small_holes(mask: np.ndarray, max_area: float) -> np.ndarray:
    """``remove_small_holes(mask, max_area)``: 4-connected background regions of fewer than ``max_area``
    pixels become foreground, wherever they are (one touching the image edge too)."""
    _, regions, stats = _components(~mask, 4)
    small = stats[:, cv2.CC_STAT_AREA] < max_area
    small[0] = False
    return mask | _gather(small, regions) if small.any() else mask


# -- morphology ------------------------------------------------------------------------------------------------

_CROSS = cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))


def _disk_rectangles(radius: int) -> list[np.ndarray]:
    """``skimage.morphology.disk(radius)`` (x² + y² <= r²) as a union of centred rectangles, one per
    distinct half-width: a max (min) over the disk is the max (min) of the maxima over them, and cv2 runs
    each rectangle as two 1-D passes."""
    half_widths = [math.isqrt(radius * radius - dy * dy) for dy in range(radius + 1)]
    rectangles = []
    for dy, half in enumerate(half_widths):
        if dy == radius or half > half_widths[dy + 1]:
            rectangles.append(np.ones((2 * dy + 1, 2 * half + 1), np.uint8))
    return rectangles


def _morphology(labels: np.ndarray, operation: int, kernels: list[np.ndarray]) -> np.ndarray:
    """Grey dilation / erosion of a label image over the union of ``kernels``, borders reflected like
    SciPy's default ``mode='reflect'``."""
    result = None
    combine = np.maximum if operation == cv2.MORPH_DILATE else np.minimum
    for kernel in kernels:
        part = cv2.morphologyEx(labels, operation, kernel, borderType=cv2.BORDER_REFLECT)
        result = part if result is None else combine(result, part, out=result)
    assert result is not None
    return result


def _as_morphology_type(labels: np.ndarray) -> np.ndarray:
    """uint16 for cv2's morphology (exact up to 65,535 labels), float32 beyond (exact up to 2^24)."""
    return labels.astype(np.uint16 if labels.max(initial=0) <= np.iinfo(np.uint16).max else np.float32)


def _closing(labels: np.ndarray, radius: int) -> np.ndarray:
    """``skimage.morphology.closing(labels, disk(radius))`` on label values, in cv2's type for them
    (``_as_morphology_type``: the values exactly)."""
    kernels = _disk_rectangles(radius)
    plane = _as_morphology_type(labels)
    return _morphology(_morphology(plane, cv2.MORPH_DILATE, kernels), cv2.MORPH_ERODE, kernels)


def _filled_interior(labels: np.ndarray) -> np.ndarray:
    """bool: upstream's ``__fill_holes`` up to its labelling: ``find_boundaries`` erased (pixels whose
    4-neighbourhood holds another value, background included), the holes of what is left filled."""
    compiled = kernels()
    if compiled is not None:
        interior = compiled.interior(labels)
    else:
        plane = labels if labels.dtype in (np.uint16, np.float32) else _as_morphology_type(labels)
        grown = cv2.dilate(plane, _CROSS, borderType=cv2.BORDER_REFLECT)
        shrunk = cv2.erode(plane, _CROSS, borderType=cv2.BORDER_REFLECT)
        interior = (labels > 0) & (grown == shrunk)
    return fill_binary_holes(interior, _gather)


def _erase_boundaries_fill_holes(labels: np.ndarray) -> np.ndarray:
    """Upstream's ``__fill_holes``: ``_filled_interior``, its 4-connected components labelled."""
    return cv2.connectedComponents(_filled_interior(labels).view(np.uint8), connectivity=4, ltype=cv2.CV_32S)[
        1
    ]


# -- watersheds -------------------------------------------------------------------------------------------------


def _flood_whole(
    queue: ModuleType,
    levels: np.ndarray,
    heights: np.ndarray,
    markers: np.ndarray,
    mask: np.ndarray,
    lines: bool,
) -> np.ndarray:
    """``watershed(heights[levels], markers, mask=mask, watershed_line=lines)`` over the whole mask in one
    compiled pass: the heights enter as the rank of each level's height (the queue compares nothing else).
    An int32 ``markers`` is flooded in place (the callers' markers are their own) and returned."""
    ranks = np.unique(heights, return_inverse=True)[1].astype(np.uint8)
    output = np.ascontiguousarray(markers, dtype=np.int32)
    levels = np.ascontiguousarray(levels)
    if lines:
        queue.flood_with_lines(levels, ranks, output, mask.astype(np.uint8))  # a copy: lines leave it
    else:
        queue.flood(levels, ranks, output, np.ascontiguousarray(mask).view(np.uint8))
    return output


def _neighbour_pairs(
    frontier: np.ndarray, regions: np.ndarray, labels: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """``(region, label)`` of every 4-neighbour pair of a ``frontier`` pixel (labelled) and a pixel of a
    region (``regions > 0``): which labels touch which regions. Flat, with repeats."""
    height, width = regions.shape
    index = np.flatnonzero(frontier)
    rows, cols = np.divmod(index, width)
    flat_regions, flat_labels = regions.ravel(), labels.ravel()
    found_regions, found_labels = [], []
    for offset, inside in (
        (-width, rows > 0),
        (width, rows < height - 1),
        (-1, cols > 0),
        (1, cols < width - 1),
    ):
        source = index[inside]
        region = flat_regions[source + offset]
        touching = region > 0
        found_regions.append(region[touching])
        found_labels.append(flat_labels[source[touching]])
    return np.concatenate(found_regions), np.concatenate(found_labels)


def _single_labels(regions_of: np.ndarray, labels_of: np.ndarray, n_regions: int) -> np.ndarray:
    """``(n_regions,)``: the one label touching each region, 0 where none or several do."""
    first = np.zeros(n_regions, dtype=np.int32)
    first[regions_of] = labels_of  # one of them, whichever numpy writes last
    several = np.zeros(n_regions, dtype=bool)
    several[regions_of[labels_of != first[regions_of]]] = True
    first[several] = 0
    first[0] = 0
    return first


def _box(stats: np.ndarray, k: int, shape: tuple[int, int], margin: int = 1) -> tuple[slice, slice]:
    """Bounding box of cv2 component ``k`` grown by ``margin`` (its touching markers lie in it)."""
    top, left = stats[k, cv2.CC_STAT_TOP], stats[k, cv2.CC_STAT_LEFT]
    bottom, right = top + stats[k, cv2.CC_STAT_HEIGHT], left + stats[k, cv2.CC_STAT_WIDTH]
    return (
        slice(max(0, top - margin), min(shape[0], bottom + margin)),
        slice(max(0, left - margin), min(shape[1], right + margin)),
    )


def _flood(
    levels: np.ndarray,
    heights: np.ndarray,
    markers: np.ndarray,
    mask: np.ndarray,
    watershed_line: bool = False,
    settle_at: float | None = None,
) -> np.ndarray:
    """``skimage.segmentation.watershed(heights[levels], markers, mask=mask, watershed_line=...)``
    (4-connected) for a uint8 plane ``levels`` and a 256-entry float64 table ``heights``, flooding only what
    is undecided (see the module doc). ``markers`` int32, zero outside ``mask``; the compiled flood fills
    it in place (pass an array of your own).

    Labels spread only through unlabelled mask pixels, so each 4-connected region of them is flooded on
    its own from the labelled pixels around it: none, and it stays 0; one label, and it all takes it;
    several, and scikit-image floods it inside its bounding box from the labelled pixels touching it.
    ``settle_at`` (no watershed lines): first label the low ground, see ``_settle_low_ground``.

    Where numba is installed the compiled bucket queue floods the whole mask instead, as scikit-image
    would (no contested-ground search, no settling)."""
    queue = kernels()
    if queue is not None:
        return _flood_whole(queue, levels, heights, markers, mask, watershed_line)
    if settle_at is not None and not watershed_line:
        markers = _settle_low_ground(_lookup(heights <= settle_at, levels) & mask, mask, markers)
    output = markers.copy()
    open_ground = mask & (markers == 0)
    n, regions, stats = _components(open_ground, 4)
    if n == 1:
        return output
    frontier = (markers > 0) & cv2.dilate(open_ground.view(np.uint8), _CROSS).view(bool)
    regions_of, labels_of = _neighbour_pairs(frontier, regions, markers)
    single = _single_labels(regions_of, labels_of, n)
    filled = _gather(single, regions)
    np.copyto(output, filled, where=filled > 0)
    touched = np.zeros(n, dtype=bool)
    touched[regions_of] = True
    for region in np.flatnonzero(touched & (single == 0)).tolist():
        box = _box(stats, region, regions.shape)
        inside = regions[box] == region
        seeds = np.where(inside, 0, markers[box])  # the labels around it (and others in the box)
        if not watershed_line:  # labels not touching the region push nothing into it
            seeds = np.where(cv2.dilate(inside.view(np.uint8), _CROSS).view(bool), seeds, 0)
        flood_mask = inside | (seeds > 0)  # with lines, every labelled neighbour is read
        flooded = watershed(heights[levels[box]], seeds, mask=flood_mask, watershed_line=watershed_line)
        np.copyto(output[box], flooded, where=inside)
    return output


def _flood_inside(inside: np.ndarray, markers: np.ndarray) -> np.ndarray:
    """``watershed(inside, markers, mask=inside, watershed_line=True)``: the flat flood of one nucleus
    mask component (by the compiled queue where numba is installed: on the whole nucleus mask it would
    cost more than the per-component split, most components hold one seed)."""
    queue = kernels()
    if queue is None:
        return watershed(inside.view(np.uint8), markers, mask=inside, watershed_line=True)
    return _flood_whole(queue, inside.view(np.uint8), _FLAT, markers, inside, lines=True)


def _settle_low_ground(low: np.ndarray, mask: np.ndarray, markers: np.ndarray) -> np.ndarray:
    """``markers`` plus the low ground that one label alone can reach: each 4-connected component of
    ``low`` (mask pixels at or under a height h) holding markers of one label takes that label, unless it
    borders another component at a pass.

    Why this is the watershed's own answer: scikit-image floods by the highest height met on the way (a
    pixel is reached when the flood's level rises to its minimax cost from the markers), so a pixel of such
    a component is reached by its label at a level <= h and by any other label only above h. What changes
    is when the settled pixels leave the heap: as markers at their own height, not at their cost (between
    their height and h). That order matters at one place only, a pixel above h touching two components
    (a pass between them: which component reaches it first decides its label, and the flood goes on from
    it), so components touching such a pass stay unsettled and are flooded as before. Everywhere else the
    settled pixels push their neighbours at those neighbours' own heights (above h) either way, and only
    the order of equal-height pushes changes: ties, as with the markers' order in scikit-image's heap."""
    n, components, _ = _components(low, 4)
    if n == 1:
        return markers
    seeded = np.flatnonzero(markers)
    single = _single_labels(components.ravel()[seeded], markers.ravel()[seeded], n)
    # passes: mask pixels above h with two different components among their 4-neighbours
    plane = components.astype(np.float32)  # exact up to 2^24 components
    highest = cv2.dilate(plane, _CROSS)
    lowest = cv2.erode(np.where(low, plane, np.float32(np.inf)), _CROSS)
    passes = mask & ~low & (highest > 0) & (highest != lowest)
    single[_neighbour_pairs(passes, components, components)[0]] = 0
    settled = _gather(single, components)
    return np.where(settled > 0, settled, markers)


def _nuclei(nuclei_pred: np.ndarray, cell_pred: np.ndarray, sizes: Sizes) -> np.ndarray:
    """Step 1: int32 nuclei, numbered as upstream's ``measure.label`` numbers them."""
    border_sum = np.add(
        nuclei_pred[..., BORDER], cell_pred[..., BORDER], dtype=np.uint8
    )  # wraps, as upstream
    foreground = np.ascontiguousarray(nuclei_pred[..., FOREGROUND])
    seeds = _lookup(_SEED, foreground) & _lookup(_NOT_BORDER, border_sum)
    # Seed components (4-connected, as ndi.label) under the seed area go; the markers' numbering does not
    # matter (the flood compares labels, the nuclei are renumbered below).
    _, seed_labels, seed_stats = _components(seeds, 4)
    small = seed_stats[:, cv2.CC_STAT_AREA] < sizes.seed
    mask = _fill_small_holes(_lookup(_NUCLEUS_MASK, foreground), sizes.hole)
    # The flooded image is the mask itself (1 inside), so a flood never leaves its 4-connected mask
    # component: one holding a single seed label becomes that label whole, one holding several is flooded
    # (with watershed lines) on its own. Components under the mask area go first, with their seeds.
    n, regions, stats = _components(mask, 4)
    kept = stats[:, cv2.CC_STAT_AREA] >= sizes.mask
    kept[0] = False
    index = np.flatnonzero(seeds & mask)
    seed_of, region_of = seed_labels.ravel()[index], regions.ravel()[index]
    marker = ~small[seed_of] & kept[region_of]
    seed_of, region_of = seed_of[marker], region_of[marker]
    single = _single_labels(region_of, seed_of, n)
    nuclei = _gather(single, regions)
    several = np.zeros(n, dtype=bool)
    several[region_of] = True
    for region in np.flatnonzero(several & (single == 0)).tolist():
        box = _box(stats, region, regions.shape, margin=0)
        inside = regions[box] == region
        markers = np.where(inside & ~small[seed_labels[box]], seed_labels[box], 0)
        np.copyto(nuclei[box], _flood_inside(inside, markers), where=inside)
    return _relabel_pieces(_remove_small_labels(nuclei, sizes.nucleus))


def _cell_threshold(foreground: np.ndarray) -> float:
    """``max(0.22, threshold_otsu(foreground / 255) * 0.5)``: scikit-image's 256-bin histogram of the
    float image, computed from the 256 uint8 counts (each distinct value lands in the bin it would)."""
    if foreground.size < 1 << 24:  # float32 counts exact; cv2's histogram is one pass, no int64 copy
        counts = cv2.calcHist([foreground], [0], None, [256], [0, 256]).ravel().astype(np.int64)
    else:
        counts = np.bincount(foreground.ravel(), minlength=256)
    present = np.flatnonzero(counts)
    values = _LEVELS[present] / 255
    if present.size == 1:
        return max(CELL_FLOOR, float(values[0]) * 0.5)
    hist, edges = np.histogram(values, bins=256, range=(values[0], values[-1]), weights=counts[present])
    centres = (edges[:-1] + edges[1:]) / 2
    return max(CELL_FLOOR, float(threshold_otsu(hist=(hist, centres))) * 0.5)


def _cells(nuclei: np.ndarray, cell_pred: np.ndarray, sizes: Sizes) -> np.ndarray:
    """Steps 2-5 for the cells: int32 labels numbered as upstream's final ``measure.label``."""
    foreground = np.ascontiguousarray(cell_pred[..., FOREGROUND])
    threshold = _cell_threshold(foreground)
    mask = _lookup(_LEVELS / 255 > threshold, foreground)
    # Flooded by -foreground: upstream's np.clip(foreground, 255 * threshold, foreground) clips nothing
    # (where the foreground is under the floor, min(max(x, floor), x) is x again).
    heights = -_LEVELS
    cells = _flood(foreground, heights, np.where(mask, nuclei, 0), mask, settle_at=-SETTLE_LEVEL)
    cells = _remove_small_labels(cells, sizes.cell)
    cells = _erase_boundaries_fill_holes(_closing(cells, sizes.closing_radius))
    grown_mask = (cells > 0) | _lookup(_BORDER, np.ascontiguousarray(cell_pred[..., BORDER]))
    # upstream labels the filled cells, then keeps only cell_label > 0: the labelling is skipped
    return _label_large(_filled_interior(_flood(foreground, heights, cells, grown_mask)), 8, sizes.cell)


def label_cell(
    nuclei_pred: np.ndarray, cell_pred: np.ndarray, scale: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """``(nuclei_labels, cell_labels)``, int32 ``(H, W)``, of upstream's network outputs: uint8 ``(H, W, 3)``
    maps, channel 1 the touching border, channel 2 the foreground, of the nuclei and the cell model.

    Cell k holds nucleus k (0 = background). At ``scale=1`` the labels are upstream's on the same maps
    (see the module doc); other scales run its procedure with sizes scaled to these maps.
    """
    for name, pred in (("nuclei_pred", nuclei_pred), ("cell_pred", cell_pred)):
        if pred.ndim != 3 or pred.shape[2] != 3 or pred.dtype != np.uint8:
            raise ValueError(f"{name} must be a uint8 (H, W, 3) array, got {pred.dtype} {pred.shape}")
    if nuclei_pred.shape != cell_pred.shape:
        raise ValueError(f"nuclei_pred {nuclei_pred.shape} and cell_pred {cell_pred.shape} differ in shape")
    sizes = Sizes.at(scale)
    nuclei = _nuclei(nuclei_pred, cell_pred, sizes)
    cells = _cells(nuclei, cell_pred, sizes)
    # Each nucleus piece inside a cell (8-connected), small pieces dropped, takes its cell's label.
    inside = _remove_small_regions((cells > 0) & (nuclei > 0), sizes.nucleus, connectivity=8)
    return np.where(inside, cells, 0), cells
