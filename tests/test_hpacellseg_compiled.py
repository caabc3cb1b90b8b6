"""The compiled kernels of label_cell (``weakcell.segment.hpacellseg.compiled``, numba): the bucket-queue
flood against scikit-image's watershed (hand-made cases with labels derived by hand, random uint8 images
where the labels must be scikit-image's exactly), the two full-image passes beside it, and the fallback
where numba is absent."""

from __future__ import annotations

import sys

import cv2
import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage.segmentation import find_boundaries, watershed

from weakcell.segment import hpacellseg
from weakcell.segment.hpacellseg import labels

pytest.importorskip("numba", reason="numba (the segment extra) is not installed")

from weakcell.segment.hpacellseg import compiled

IDENTITY = np.arange(256, dtype=np.uint8)  # heights = the levels themselves


def bucket_flood(heights, markers, mask=None, lines: bool = False) -> np.ndarray:
    """The queue's flood of a small hand-made map (heights 0-255), checked against scikit-image's."""
    levels, output = np.array(heights, np.uint8), np.array(markers, np.int32)
    inside = np.ones(levels.shape, bool) if mask is None else np.array(mask, bool)
    expected = watershed(levels.astype(float), output, mask=inside, watershed_line=lines)
    flood = compiled.flood_with_lines if lines else compiled.flood
    flood(levels, IDENTITY, output, inside.astype(np.uint8))
    np.testing.assert_array_equal(output, expected)
    return output


def test_a_ridge_goes_to_the_side_that_reaches_it_at_the_lower_level() -> None:
    """Heights 0 1 2 9 3 1 0, markers at both ends: the left side pushes the 9 from its 2 (level 2),
    the right side would from its 3 (level 3), so the ridge takes label 1."""
    flooded = bucket_flood([[0, 1, 2, 9, 3, 1, 0]], [[1, 0, 0, 0, 0, 0, 2]])
    np.testing.assert_array_equal(flooded, [[1, 1, 1, 1, 2, 2, 2]])


def test_equal_distance_on_a_plateau_goes_to_the_first_marker() -> None:
    """Flat, markers at both ends of 5 pixels: marker 1 leaves the queue first, so its front is one push
    ahead and takes the middle pixel."""
    np.testing.assert_array_equal(bucket_flood([[4] * 5], [[1, 0, 0, 0, 2]]), [[1, 1, 1, 2, 2]])


@pytest.mark.parametrize(
    ("width", "expected"),
    [(5, [1, 1, 0, 2, 2]), (6, [1, 1, 1, 0, 2, 2])],
)
def test_watershed_lines_on_a_flat_plateau(width: int, expected: list[int]) -> None:
    """With lines a pixel is labelled when it leaves the queue. Odd width: the middle pixel leaves with
    both labels around it, a line. Even width (6): pixel 2 takes 1 (pushed before pixel 3 is labelled),
    pixel 3 then sees 1 on its left and 2 on its right: the line falls right of the centre."""
    markers = [[1] + [0] * (width - 2) + [2]]
    np.testing.assert_array_equal(bucket_flood([[0] * width], markers, lines=True), [expected])


def test_the_mask_bounds_the_flood() -> None:
    """A wall outside the mask (column 2, rows 0-1) with a gap below it. Marker 2 floods its 1s and 5s and
    pushes the 7 in the gap's row from the 1 beside it; marker 1 pushed its two 7s earlier (straight from
    the marker), so in the bucket of 7 its front leaves first and takes (1, 1) and the corner (2, 0)
    before the 7 at (2, 1), which keeps label 2. The wall stays 0."""
    heights = [[0, 7, 9, 5, 5], [7, 7, 9, 5, 5], [7, 7, 1, 1, 0]]
    mask = [[1, 1, 0, 1, 1], [1, 1, 0, 1, 1], [1, 1, 1, 1, 1]]
    markers = [[1, 0, 0, 0, 0], [0, 0, 0, 0, 0], [0, 0, 0, 0, 2]]
    expected = [[1, 1, 0, 2, 2], [1, 1, 0, 2, 2], [1, 2, 2, 2, 2]]
    np.testing.assert_array_equal(bucket_flood(heights, markers, mask), expected)


@pytest.mark.parametrize("lines", [False, True])
def test_random_images_get_scikit_images_labels(lines: bool) -> None:
    """Random uint8 heights and masks, 1-4 markers at distinct heights (no tie between markers leaving
    the queue): every pixel as scikit-image labels it."""
    rng = np.random.default_rng(27)
    for _ in range(150):
        height, width = rng.integers(2, 40, size=2)
        levels = rng.integers(0, 256, size=(height, width)).astype(np.uint8)
        mask = rng.random((height, width)) < 0.8
        markers = np.zeros((height, width), np.int32)
        candidates = np.flatnonzero(mask)
        _, first = np.unique(levels.ravel()[candidates], return_index=True)  # one pixel per distinct height
        chosen = rng.permutation(candidates[first])[: rng.integers(1, 5)]
        markers.ravel()[chosen] = np.arange(1, chosen.size + 1)
        bucket_flood(levels, markers, mask, lines)  # asserts equality with scikit-image


def test_heights_enter_by_rank() -> None:
    """label_cell floods by -foreground: the queue takes the rank of each level's height, so the brightest
    level leaves first. Levels 200 90 10 150 200, markers at the ends: the 10 is pushed by whichever
    neighbour leaves first, the 150 (height -150) before the 90, so it goes to 2 (by the levels themselves
    the 90 would leave first and give it to 1)."""
    levels = np.array([[200, 90, 10, 150, 200]], np.uint8)
    markers = np.array([[1, 0, 0, 0, 2]], np.int32)
    queue = labels._compiled_kernels()
    flooded = labels._flood_whole(
        queue, levels, -labels._LEVELS, markers.copy(), np.ones(levels.shape, bool), False
    )
    np.testing.assert_array_equal(flooded, [[1, 1, 2, 2, 2]])
    np.testing.assert_array_equal(flooded, watershed(-levels.astype(float), markers))
    np.testing.assert_array_equal(bucket_flood(levels, markers), [[1, 1, 1, 2, 2]])


def test_without_numba_label_cell_takes_the_scikit_image_path(monkeypatch) -> None:
    """Kaggle's image has no numba: the import fails and the scikit-image path runs."""
    monkeypatch.setitem(sys.modules, "numba", None)  # import numba raises ImportError
    monkeypatch.delitem(sys.modules, "weakcell.segment.hpacellseg.compiled")
    monkeypatch.delattr(hpacellseg, "compiled")  # `from package import module` reads this first
    labels._compiled_kernels.cache_clear()
    try:
        assert labels.kernels() is None
    finally:
        labels._compiled_kernels.cache_clear()


def test_small_labels_go_in_place() -> None:
    """Label 2 has 2 pixels in two pieces (one object), label 3 has 3: under 3 pixels only 2 goes."""
    found = np.array([[1, 1, 2, 0], [1, 3, 3, 2], [1, 3, 0, 0]], np.int32)
    compiled.remove_small_labels(found, 3)
    np.testing.assert_array_equal(found, [[1, 1, 0, 0], [1, 3, 3, 0], [1, 3, 0, 0]])


def test_interior_erases_every_label_boundary() -> None:
    """Pixels with a 4-neighbour of another value (background included) go: the 2s beside the 0s or
    above the 1s, and every 1 (under a 2 or a 0). Off the image counts as the same value (a reflected
    border), so the two top-left 2s stay."""
    found = np.array([[2, 2, 2, 0], [2, 2, 2, 0], [1, 1, 1, 1]], np.int32)
    expected = [[1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    np.testing.assert_array_equal(compiled.interior(found), np.array(expected, bool))
    np.testing.assert_array_equal(
        compiled.interior(found), (found > 0) & ~find_boundaries(found, mode="thick")
    )


def test_component_stats_are_cv2s() -> None:
    """Left, top, width, height, area of each label as cv2 computes them while labelling; a label with no
    pixel keeps area 0. Background: 6 pixels in columns 1-3; label 1: an L of 5 over rows 0-2; label 2: one
    pixel; label 3: absent."""
    regions = np.array([[1, 0, 0, 0], [1, 0, 2, 0], [1, 1, 1, 0]], np.int32)
    expected = [[1, 0, 3, 3, 6], [0, 0, 3, 3, 5], [2, 1, 1, 1, 1], [4, 3, 0, 0, 0]]
    np.testing.assert_array_equal(compiled.component_stats(regions, 4), expected)
    mask = np.random.default_rng(3).random((60, 70)) < 0.5
    n, found, stats = cv2.connectedComponentsWithStats(mask.view(np.uint8), connectivity=4, ltype=cv2.CV_32S)[
        :3
    ]
    np.testing.assert_array_equal(compiled.component_stats(found, n), stats)


def test_gather_and_label_boxes_match_numpy_and_scipy() -> None:
    found = np.random.default_rng(4).integers(0, 6, size=(30, 40)).astype(np.int32)
    found[found == 4] = 0  # label 4 absent: no box
    table = np.array([False, True, True, False, True, False])
    np.testing.assert_array_equal(compiled.gather(table, found), table[found])
    assert labels._label_boxes(found) == ndi.find_objects(found)
