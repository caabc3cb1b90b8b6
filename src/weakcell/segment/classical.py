"""The CPU default segmentation backend: no weights, tens of milliseconds per 2048² image on one core.

1. Downscale the four channels to ``working_scale`` (area averaging; 2048 -> 256 px at the default 0.125,
   where an HPA nucleus is still ~22 px across).
2. Nuclei (``segment_nuclei``): smooth the blue channel, Otsu threshold on LOG intensity (dim nuclei next to
   bright ones survive), then a local-contrast cut: a pixel must also rise a fraction of the way from the
   background level to the brightest pixel within one nucleus radius. The log threshold alone sits low in
   the halo, so it fattens every nucleus and bridges touching ones through their dim seam; the local cut
   puts the edge near each nucleus' own half-maximum whatever its brightness, and cuts most such bridges.
   Fill holes, then split only clearly touching nuclei. Markers are the domes of (distance to background
   + a brightness term) that rise more than a large fraction of the nucleus radius above the saddle to
   their neighbour, so HPA's big, lobed nuclei stay whole while pairs joined by a deep neck or a dark seam
   split.
3. Cells (``segment_cells``): foreground = Otsu on the LOG of the smoothed cytoplasm signal (weighted
   red + yellow + green). Cytoplasm intensity spans two orders of magnitude between a cell's centre and its
   thin edges, so a linear threshold cuts cells short; the log scale keeps the dim periphery. Cell bodies
   grow from the nuclei by watershed over the inverted log intensity (dim valleys between cells become
   borders), tilted a little by the distance to the nearest nucleus so that flat regions split halfway.
   Background enclosed by several cells (the dark gaps of a dense field) stays background.
4. The post-processing rules run on the small labels, each pixel weighted by the full-resolution pixels it
   becomes, so they decide exactly as on the full-resolution masks; the labels then go back to full
   resolution by nearest-neighbour upscaling (whole-row repeats, cell k still holds nucleus k), and the
   result is marked so that ``segment_image`` does not run the rules over the full-resolution masks again.
"""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np
from scipy import ndimage as ndi
from skimage.filters import threshold_otsu
from skimage.segmentation import watershed

from weakcell.config import ClassicalSegmentConfig, SegmentConfig
from weakcell.segment import Segmentation
from weakcell.segment.postprocess import mark_postprocessed, postprocess

BLUE, RED, GREEN, YELLOW = 2, 0, 1, 3  # indices in the (4, H, W) image, CHANNELS order R, G, B, Y
# Nucleus diameter (pixels) of the grid that markers are searched on; finer grids add cost, not accuracy.
MARKER_DIAMETER = 24.0


def _smooth(plane: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of a float32 plane (sigma in pixels; 0 = unchanged)."""
    return cv2.GaussianBlur(plane, (0, 0), sigma) if sigma > 0 else plane


def fill_binary_holes(
    mask: np.ndarray, gather: Callable[[np.ndarray, np.ndarray], np.ndarray] = np.take
) -> np.ndarray:
    """``ndi.binary_fill_holes`` (holes = 4-connected background not reaching the border) by one cv2
    labelling, several times faster than scipy's iterated erosions. ``gather(table, regions)`` looks a
    table up per pixel (``label_cell`` passes its compiled one)."""
    n_regions, regions = cv2.connectedComponents((~mask).view(np.uint8), connectivity=4, ltype=cv2.CV_32S)
    kept = np.ones(n_regions, dtype=bool)  # label 0 is the foreground itself
    for edge in (regions[0], regions[-1], regions[:, 0], regions[:, -1]):
        kept[edge] = False
    kept[0] = True
    return gather(kept, regions)


def _otsu(values: np.ndarray) -> float:
    """Otsu threshold of a plane; a constant plane has none and returns its value (nothing above it)."""
    low, high = float(values.min()), float(values.max())
    return high if high <= low else float(threshold_otsu(values))


def segment_nuclei(
    plane: np.ndarray,
    diameter: float,
    smoothing: float = 0.03,
    threshold_scale: float = 1.0,
    split_depth: float = 0.3,
    min_area_fraction: float = 0.05,
    intensity_weight: float = 1.0,
    local_contrast: float = 0.4,
) -> np.ndarray:
    """Instance labels ``(H, W)`` int32 (0 background, 1..n) of the nuclei in one nuclear-stain plane.

    ``diameter`` is the typical nucleus diameter in pixels of ``plane``; every other knob is relative to it:
    ``smoothing`` (Gaussian sigma / diameter), ``split_depth`` (how much deeper, as a fraction of the radius,
    each distance-transform peak must be than the saddle to another one to become its own nucleus; larger =
    fewer splits), ``min_area_fraction`` (objects under this fraction of a disc of ``diameter`` are noise),
    ``intensity_weight`` (how many radii the brightness, 0 at the threshold to 1 at the local maximum, adds
    to the distance transform: a dark seam between two touching nuclei then deepens their saddle).
    ``threshold_scale`` multiplies the Otsu threshold of the log intensity. ``local_contrast`` (0 = off)
    keeps only pixels above ``background + local_contrast * (local peak - background)``, the local peak
    being the brightest pixel within one radius and the background the median below the Otsu threshold.
    Any pixel type.
    """
    linear = _smooth(plane.astype(np.float32), smoothing * diameter)
    smoothed = np.log1p(linear)
    threshold = _otsu(smoothed) * threshold_scale
    foreground = smoothed > threshold
    # Brightest pixel within one radius (a disc one diameter wide).
    size = max(3, int(diameter) | 1)
    peak = cv2.dilate(linear, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size)))
    if local_contrast > 0 and foreground.any() and not foreground.all():
        # Relative to the local peak, so a dim nucleus beside a bright one keeps its own edge; the window is
        # one radius, so the bright one's peak reaches little beyond its own area.
        background = float(np.median(linear[~foreground]))
        foreground &= linear > background + local_contrast * (peak - background)
    foreground = fill_binary_holes(foreground)
    components, n_components = ndi.label(foreground)
    if n_components == 0:
        return np.zeros(plane.shape, dtype=np.int32)
    min_area = min_area_fraction * np.pi * diameter**2 / 4
    keep = np.bincount(components.ravel(), minlength=n_components + 1) >= min_area
    keep[0] = False
    foreground = keep[components]
    # Distance to the background in pixels; touching nuclei show one peak each with a saddle at the neck.
    distance = cv2.distanceTransform(foreground.view(np.uint8), cv2.DIST_L2, 5)
    # Brightness relative to the brightest pixel within one radius, so dim nuclei count as much as bright.
    local_max = np.log1p(peak)  # log1p is increasing, so this is the dilation of ``smoothed``
    brightness = np.clip((smoothed - threshold) / np.maximum(local_max - threshold, 1e-6), 0, 1)
    height = distance + intensity_weight * diameter / 2 * brightness
    markers = _markers(height, foreground, split_depth * diameter / 2, diameter)
    labels = watershed(-height, markers, mask=foreground)
    # A component too small to hold any h-maximum is still one nucleus.
    orphans, _ = ndi.label(foreground & (labels == 0))
    labels = np.where(orphans > 0, orphans + labels.max(), labels)
    return _consecutive(labels)


def _reconstruct(seed: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Grey reconstruction by dilation of float32 ``seed`` under ``mask`` (seed <= mask), by repeated 3x3
    geodesic dilation. It takes as many passes as the longest path a value floods along (about one nucleus
    diameter in working pixels), each a fraction of a millisecond with cv2, which beats skimage's
    sort-based version several times over at these sizes."""
    kernel = np.ones((3, 3), np.uint8)
    mask = mask.astype(np.float32, copy=False)
    current = seed.astype(np.float32)
    grown = np.empty_like(current)
    while True:
        # Four geodesic dilations per convergence test: the test costs about as much as a dilation, and
        # passes after convergence change nothing.
        for step in range(4):
            cv2.dilate(current, kernel, dst=grown)
            np.minimum(grown, mask, out=grown)
            if step == 3 and np.array_equal(grown, current):
                return grown
            current, grown = grown, current


def _markers(height: np.ndarray, foreground: np.ndarray, depth: float, diameter: float) -> np.ndarray:
    """Nucleus markers (``_deep_peaks``) found on a copy shrunk so that a nucleus is at most
    ``MARKER_DIAMETER`` px across, then mapped back onto ``height``'s grid. Reconstruction needs about one
    pass per pixel of nucleus diameter, each over the whole image, so at full detail its cost would grow
    with the cube of the working scale; markers need no fine detail, only the watershed that follows."""
    factor = MARKER_DIAMETER / diameter
    if factor >= 1:
        return _deep_peaks(height, foreground, depth)
    shape = (max(1, round(height.shape[0] * factor)), max(1, round(height.shape[1] * factor)))
    small_height = _resize(height, shape, cv2.INTER_AREA) * factor  # heights in small-grid pixels
    # Height is > 0 exactly on the foreground; area averaging keeps every foreground pixel's trace, so the
    # shrunk foreground never breaks a nucleus into pieces that would each get a marker.
    small_markers = _deep_peaks(small_height, small_height > 0, depth * factor)
    return np.where(foreground, _resize(small_markers, height.shape, cv2.INTER_NEAREST), 0)


def _deep_peaks(height: np.ndarray, foreground: np.ndarray, depth: float) -> np.ndarray:
    """Marker labels: one per dome of ``height`` that rises at least ``depth`` above its saddles.

    The domes are ``height - reconstruction(height - depth, height)``, connected by construction; peaks
    joined by a saddle shallower than ``depth`` share one dome. Domes lower than ``depth`` are side bumps
    of a bigger one and are dropped (their pixels are flooded from the neighbour). Labelling whole domes,
    not the maximal pixels, matters: round-off ripples on the flat top of a round nucleus would otherwise
    become separate maxima and cut it like a pie.
    """
    dome = height - _reconstruct(height - depth, height)
    markers, n_markers = ndi.label(foreground & (dome > 1e-3))
    if n_markers == 0:
        return markers
    # Domes whose top reaches ``depth``: the labels found under a pixel that high (no per-label sort).
    keep = np.zeros(n_markers + 1, dtype=bool)
    keep[markers[dome >= depth - 1e-3]] = True
    keep[0] = False
    return np.where(keep[markers], markers, 0)


def _consecutive(labels: np.ndarray) -> np.ndarray:
    """Relabel present labels to 1..n in increasing order (0 stays 0), int32."""
    present = np.flatnonzero(np.bincount(labels.ravel()))
    lut = np.zeros(int(labels.max(initial=0)) + 1, dtype=np.int32)
    present = present[present > 0]
    lut[present] = np.arange(1, present.size + 1, dtype=np.int32)
    return lut[labels]


def cytoplasm_signal(image: np.ndarray, cfg: ClassicalSegmentConfig) -> np.ndarray:
    """``(H, W)`` float32 weighted sum of the red, yellow and green planes of a ``(4, H, W)`` image."""
    signal = np.zeros(image.shape[1:], dtype=np.float32)
    for index, weight in ((RED, cfg.red_weight), (YELLOW, cfg.yellow_weight), (GREEN, cfg.green_weight)):
        if weight:
            signal += weight * image[index].astype(np.float32)
    return signal


def segment_cells(
    image: np.ndarray, nuclei: np.ndarray, cfg: ClassicalSegmentConfig, diameter: float
) -> np.ndarray:
    """Cell labels ``(H, W)`` int32 grown from ``nuclei`` (cell k holds nucleus k) over a ``(4, H, W)``
    image at working resolution; ``diameter`` is the nucleus diameter in working pixels."""
    signal = np.log1p(_smooth(cytoplasm_signal(image, cfg), cfg.cell_smoothing * diameter))
    # Enclosed background is not flooded here: in dense fields the dark gaps between cell bodies are
    # enclosed by several cells, and flooding them handed each gap to whichever front reached it first.
    # A hole inside one cell is dim cytoplasm, and the ``fill_holes`` rule gives it to that cell.
    foreground = (signal > _otsu(signal) * cfg.cell_threshold_scale) | (nuclei > 0)
    elevation = cell_elevation(signal, nuclei, cfg.distance_weight, diameter)
    cells = watershed(elevation, nuclei, mask=foreground).astype(np.int32)
    return smooth_borders(cells, nuclei, cfg.cell_border_smoothing * diameter)


def cell_elevation(
    signal: np.ndarray, nuclei: np.ndarray, distance_weight: float, diameter: float
) -> np.ndarray:
    """Watershed relief for growing cells from ``nuclei`` over the log cytoplasm ``signal``: bright
    cytoplasm is low and the dim gaps between cell bodies are ridges, so two fronts meet on a gap, not
    where they happen to collide. The distance to the nearest nucleus (in nucleus diameters, times
    ``distance_weight``) only tilts the relief, so that flat cytoplasm still splits about halfway; kept
    small, since one diameter of it outweighs the few tenths of the normalised log signal a real gap dips.
    """
    scale = max(float(signal.max()), 1e-6)
    distance = cv2.distanceTransform((nuclei == 0).view(np.uint8), cv2.DIST_L2, 5) / diameter
    return (distance_weight * distance - signal / scale).astype(np.float32)


def smooth_borders(cells: np.ndarray, nuclei: np.ndarray, sigma: float) -> np.ndarray:
    """Each pixel goes to the label (background included) whose Gaussian-blurred indicator is highest there.

    A watershed border follows single-pixel texture of the cytoplasm (microtubule fibres, ER mesh), so it
    zig-zags on the scale of a working pixel; that is noise, not cell shape. The majority vote under a
    Gaussian of ``sigma`` working pixels (0 = off) straightens it, a plurality filter for labels: at most
    a few pixels move, always to a label present nearby. Each cell is blurred inside its own box plus a
    3-sigma margin, and the background's blurred indicator is one minus the sum of the cells' (blurring
    is linear and keeps a constant), so the cost grows with the cells' area, not with their number times
    the image. Nucleus pixels keep their cell, so nucleus k stays inside cell k.
    """
    if sigma <= 0 or not cells.any():
        return cells
    margin = int(np.ceil(3 * sigma))
    best = np.zeros(cells.shape, dtype=np.float32)  # highest blurred cell indicator so far
    total = np.zeros(cells.shape, dtype=np.float32)  # sum of every cell's blurred indicator
    smoothed = np.zeros_like(cells)
    for label, box in enumerate(ndi.find_objects(cells), start=1):
        if box is None:
            continue
        window = tuple(
            slice(max(0, side.start - margin), min(size, side.stop + margin))
            for side, size in zip(box, cells.shape, strict=True)
        )
        # Reflecting at the window's edge equals reflecting at the image's where the window reaches it,
        # and adds nothing elsewhere (the indicator is zero over the 3-sigma margin).
        blurred = cv2.GaussianBlur((cells[window] == label).astype(np.float32), (0, 0), sigma)
        total[window] += blurred
        wins = blurred > best[window]
        best[window][wins] = blurred[wins]
        smoothed[window][wins] = label
    smoothed[1 - total > best] = 0
    return np.where(nuclei > 0, nuclei, smoothed)


def _resize(plane: np.ndarray, shape: tuple[int, int], interpolation: int) -> np.ndarray:
    return cv2.resize(plane, (shape[1], shape[0]), interpolation=interpolation)


def _upscale_weights(small: int, full: int) -> np.ndarray:
    """``(small,)`` int64: how many of the ``full`` output rows (or columns) nearest-neighbour upscaling
    fills from each of the ``small`` input rows, with cv2's own rounding (taken from ``cv2.resize`` of one
    column of indices)."""
    if small == full:
        return np.ones(small, dtype=np.int64)
    index = np.arange(small, dtype=np.int32).reshape(small, 1)
    mapped = cv2.resize(index, (1, full), interpolation=cv2.INTER_NEAREST).ravel()
    return np.bincount(mapped, minlength=small).astype(np.int64)


def _upscale_labels(labels: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Nearest-neighbour upscaling of labels to int32, small row i repeated ``rows[i]`` times and column j
    ``cols[j]`` times (``_upscale_weights``): the same pixels as ``cv2.resize(..., INTER_NEAREST)``, about
    4x faster at 2048², since only the final repeat of whole rows touches the full-resolution array."""
    return np.repeat(np.repeat(labels.astype(np.int32, copy=False), cols, axis=1), rows, axis=0)


def configured_nuclei(plane: np.ndarray, diameter: float, params: ClassicalSegmentConfig) -> np.ndarray:
    """``segment_nuclei`` with every knob taken from the config (``diameter`` in pixels of ``plane``)."""
    return segment_nuclei(
        plane,
        diameter,
        smoothing=params.nucleus_smoothing,
        threshold_scale=params.nucleus_threshold_scale,
        split_depth=params.nucleus_split_depth,
        min_area_fraction=params.min_nucleus_area_fraction,
        intensity_weight=params.nucleus_intensity_weight,
        local_contrast=params.nucleus_local_contrast,
    )


def segment(image: np.ndarray, cfg: SegmentConfig) -> Segmentation:
    """Segment one ``(4, H, W)`` uint8 image into cells and nuclei at full resolution (see module doc)."""
    if image.ndim != 3 or image.shape[0] != 4:
        raise ValueError(f"expected a (4, H, W) image, got shape {image.shape}")
    params = cfg.classical
    full_shape = image.shape[1:]
    scale = params.working_scale
    work_shape = (max(1, round(full_shape[0] * scale)), max(1, round(full_shape[1] * scale)))
    small = (
        np.stack([_resize(plane, work_shape, cv2.INTER_AREA) for plane in image])
        if work_shape != full_shape
        else image
    )
    diameter = params.nucleus_diameter * scale  # working pixels
    nuclei = configured_nuclei(small[BLUE], diameter, params)
    cells = segment_cells(small, nuclei, params, diameter)
    # Post-process at working scale, each small pixel weighted by the full-resolution pixels it becomes, so
    # that areas and therefore every rule come out as they would on the upscaled labels; repeated until
    # nothing changes (dropping a cell can leave a hole for ``fill_holes``). The upscaled result is then
    # marked as post-processed, and ``segment_image``'s own pass over the full-resolution masks is skipped.
    rows, cols = (
        _upscale_weights(work_shape[0], full_shape[0]),
        _upscale_weights(work_shape[1], full_shape[1]),
    )
    small_seg, fixed = Segmentation(cells=cells, nuclei=nuclei), False
    for _ in range(4):
        processed = postprocess(small_seg, cfg.postprocess, rows, cols)
        fixed = np.array_equal(processed.cells, small_seg.cells) and np.array_equal(
            processed.nuclei, small_seg.nuclei
        )
        small_seg = processed
        if fixed:
            break
    if work_shape != full_shape:
        # Watershed keeps every marker pixel, so nucleus k lies inside cell k at working scale; nearest-
        # neighbour upscaling samples both on the same grid and keeps that true at full resolution.
        small_seg = Segmentation(
            cells=_upscale_labels(small_seg.cells, rows, cols),
            nuclei=_upscale_labels(small_seg.nuclei, rows, cols),
        )
    return mark_postprocessed(small_seg, cfg.postprocess) if fixed else small_seg
