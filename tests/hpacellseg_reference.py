"""An upstream-equivalent reference of HPA-Cell-Segmentation's post-processing, and network-like inputs for it.

``label_cell_reference`` follows ``hpacellseg.utils.label_cell`` (CellProfiling/HPA-Cell-Segmentation v0.1.8)
step by step with the scikit-image / SciPy operations it calls, written independently of
``weakcell.segment.hpacellseg`` (it shares no helper with it), so that the kit's fast version can be held
against it. Only what newer libraries removed is adapted: ``np.bool`` is ``bool``, and scikit-image 0.26's
``max_size`` (objects of at most that many pixels go) stands in for the older ``min_size`` (fewer than that
many go) with the same cut. Upstream's quirks are kept on purpose, since they decide its labels:

- the two touching-border maps are added as uint8, which wraps above 255;
- ``np.invert`` of the int8 border test is -1 or -2, never 0, so the cell mask ignores the border map;
- cell labels are cast to uint8 after the first cell watershed, which merges labels 256 apart.

``network_like_maps`` builds what the two U-Nets would output for an image whose cells are known: the
foreground and touching-border probabilities blurred and noised at the network's scale (a quarter of the
image side), quantised to uint8 and brought back to full resolution the way upstream's ``CellSegmentator``
does (``cv2.resize`` with ``INTER_AREA``, channel 0 zeroed).
"""

from __future__ import annotations

import inspect
import warnings

import cv2
import numpy as np
from scipy import ndimage as ndi
from skimage import filters, measure, morphology, segmentation

NEW_SIZE_API = "max_size" in inspect.signature(morphology.remove_small_objects).parameters


def remove_small_objects(labels: np.ndarray, min_size: int) -> np.ndarray:
    """``skimage.morphology.remove_small_objects(labels, min_size)`` as upstream called it: objects with
    fewer than ``min_size`` pixels go (4-connected components of a bool array, labels of an int array)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Only one label was provided": upstream's inputs, upstream's call
        if NEW_SIZE_API:
            return morphology.remove_small_objects(labels, max_size=min_size - 1)
        return morphology.remove_small_objects(labels, min_size)


def remove_small_holes(mask: np.ndarray, area_threshold: int) -> np.ndarray:
    """``skimage.morphology.remove_small_holes(mask, area_threshold)``: holes under that area are filled."""
    if NEW_SIZE_API:
        return morphology.remove_small_holes(mask, max_size=area_threshold - 1)
    return morphology.remove_small_holes(mask, area_threshold)


def fill_holes_reference(labels: np.ndarray) -> np.ndarray:
    """Upstream's ``__fill_holes``: erase every label boundary, fill holes, label 4-connected components."""
    boundaries = segmentation.find_boundaries(labels)
    labels = np.multiply(labels, np.invert(boundaries))
    filled = ndi.binary_fill_holes(labels > 0)
    return ndi.label(filled)[0]


def watershed_from_seeds(
    mask_img: np.ndarray,
    threshold: float,
    border_img: np.ndarray,
    seeds: np.ndarray,
    threshold_adjustment: float,
    small_object_size_cutoff: int,
) -> np.ndarray:
    """Upstream's inner ``__wsh``: markers where seeds x border-free rise above the adjusted threshold,
    flooded over the thresholded mask with watershed lines."""
    img_copy = np.copy(mask_img)
    m = seeds * border_img
    img_copy[m <= threshold + threshold_adjustment] = 0
    img_copy[m > threshold + threshold_adjustment] = 1
    img_copy = remove_small_objects(img_copy.astype(bool), small_object_size_cutoff).astype(np.uint8)

    mask_img[mask_img <= threshold] = 0
    mask_img[mask_img > threshold] = 1
    mask_img = mask_img.astype(bool)
    mask_img = remove_small_holes(mask_img, 1000)
    mask_img = remove_small_objects(mask_img, 8).astype(np.uint8)
    markers = ndi.label(img_copy, output=np.uint32)[0]
    return segmentation.watershed(mask_img, markers, mask=mask_img, watershed_line=True)


def label_cell_reference(nuclei_pred: np.ndarray, cell_pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nuclei and cell labels of two ``(H, W, 3)`` uint8 network outputs, as upstream's ``label_cell``."""
    nuclei_label = watershed_from_seeds(
        nuclei_pred[..., 2] / 255.0,
        0.4,
        1 - (nuclei_pred[..., 1] + cell_pred[..., 1]) / 255.0 > 0.05,  # uint8 sum: wraps, as upstream
        nuclei_pred[..., 2] / 255,
        threshold_adjustment=-0.25,
        small_object_size_cutoff=500,
    )
    nuclei_label = remove_small_objects(nuclei_label, 2500)
    nuclei_label = measure.label(nuclei_label)
    threshold_value = max(0.22, filters.threshold_otsu(cell_pred[..., 2] / 255) * 0.5)
    cell_region = np.multiply(
        cell_pred[..., 2] / 255 > threshold_value,
        np.invert(np.asarray(cell_pred[..., 1] / 255 > 0.05, dtype=np.int8)),
    )
    sk = np.asarray(cell_region, dtype=np.int8)
    distance = np.clip(cell_pred[..., 2], 255 * threshold_value, cell_pred[..., 2])
    cell_label = segmentation.watershed(-distance, nuclei_label, mask=sk)
    cell_label = remove_small_objects(cell_label, 5500).astype(np.uint8)
    cell_label = morphology.closing(cell_label, morphology.disk(6))
    cell_label = fill_holes_reference(cell_label)
    sk = np.asarray(
        np.add(
            np.asarray(cell_label > 0, dtype=np.int8),
            np.asarray(cell_pred[..., 1] / 255 > 0.05, dtype=np.int8),
        )
        > 0,
        dtype=np.int8,
    )
    cell_label = segmentation.watershed(-distance, cell_label, mask=sk)
    cell_label = fill_holes_reference(cell_label)
    cell_label = np.asarray(cell_label > 0, dtype=np.uint8)
    cell_label = measure.label(cell_label)
    cell_label = remove_small_objects(cell_label, 5500)
    cell_label = measure.label(cell_label)
    cell_label = np.asarray(cell_label, dtype=np.uint16)
    nuclei_label = np.multiply(cell_label > 0, nuclei_label) > 0
    nuclei_label = measure.label(nuclei_label)
    nuclei_label = remove_small_objects(nuclei_label, 2500)
    nuclei_label = np.multiply(cell_label, nuclei_label > 0)
    return nuclei_label, cell_label


# -- network-like inputs ------------------------------------------------------------------------------------


def touching_borders(labels: np.ndarray, width: int) -> np.ndarray:
    """bool: pixels within ``width`` of a contact between two different nonzero labels (8-neighbours)."""
    plane = labels.astype(np.float32)
    box = np.ones((3, 3), np.uint8)
    highest = cv2.dilate(plane, box)  # largest label around each pixel
    lowest = cv2.erode(np.where(labels > 0, plane, np.float32(np.inf)), box)  # smallest nonzero label
    inside = labels > 0
    contact = inside & ((highest != plane) | ((lowest != plane) & np.isfinite(lowest)))
    size = 2 * width + 1
    return cv2.dilate(contact.view(np.uint8), np.ones((size, size), np.uint8)).view(bool)


def _probabilities(labels: np.ndarray, sigma: float, noise: float, rng: np.random.Generator) -> np.ndarray:
    """(H, W, 3) float32 softmax-like maps of one label image: background, touching border, foreground."""
    foreground = cv2.GaussianBlur((labels > 0).astype(np.float32), (0, 0), sigma)
    border = cv2.GaussianBlur(
        touching_borders(labels, max(1, round(sigma / 2))).astype(np.float32), (0, 0), sigma
    )
    border = np.clip(1.6 * border, 0, 0.95)
    jitter = cv2.GaussianBlur(rng.normal(0, noise, labels.shape).astype(np.float32), (0, 0), sigma / 2)
    foreground = np.clip(foreground + jitter, 0, 1) * (1 - border)
    return np.stack([1 - foreground - border, border, foreground], axis=-1)


def network_like_maps(
    cells: np.ndarray,
    blue: np.ndarray,
    seed: int = 0,
    network_scale: float = 0.25,
    output_scale: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """``(nuclei_pred, cell_pred)``, each ``(H, W, 3)`` uint8 at the resolution of ``cells``, for an image
    whose cell instances are ``cells`` and nuclear stain is ``blue``: nuclei are the Otsu foreground of the
    smoothed blue plane inside the cells, labelled by their cell. The maps are made at ``network_scale``
    (the U-Nets' input size), quantised to uint8 and resized with ``INTER_AREA`` to ``output_scale`` of
    the image (1: back to full resolution, as upstream does)."""
    rng = np.random.default_rng(seed)
    height, width = cells.shape
    small = (max(1, round(width * network_scale)), max(1, round(height * network_scale)))
    smooth_blue = cv2.GaussianBlur(blue, (0, 0), 4)
    threshold, _ = cv2.threshold(smooth_blue, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    nuclei = np.where(smooth_blue > threshold, cells, 0)
    maps = []
    for labels in (nuclei, cells):
        labels_small = cv2.resize(labels.astype(np.float32), small, interpolation=cv2.INTER_NEAREST)
        probabilities = _probabilities(labels_small, sigma=2.0, noise=0.05, rng=rng)
        quantised = np.rint(np.clip(probabilities, 0, 1) * 255).astype(np.uint8)
        size = (max(1, round(width * output_scale)), max(1, round(height * output_scale)))
        full = quantised if size == small else cv2.resize(quantised, size, interpolation=cv2.INTER_AREA)
        full[..., 0] = 0
        maps.append(full)
    return maps[0], maps[1]
