"""label_cell's compiled kernels (numba): scikit-image's watershed (4-connected, not compact) on uint8
levels as a bucket queue, and two full-image passes that numpy / OpenCV make in several.

Imported only where numba is installed (the ``numba`` extra; Kaggle's image has none): ``labels.py``
loads it through ``kernels()`` and keeps its numpy / scikit-image path otherwise, with the same labels
(up to the ties below). ``cache=True``: each kernel compiles once per machine (4-7 s in all on the first
call, cached under ``__pycache__``; 0.1 s to load in a later process).

scikit-image floods from a heap of ``(value, age)`` items: the markers enter first (age 0, raster order),
every later push takes the next age, and a pushed pixel's value is the larger of its own height and the
value of the pixel that pushed it (so no push ever goes below the value being popped). Heights here take
at most 256 values, so the heap's order is that of 256 first-in first-out buckets, one per distinct height
in increasing order: inside a bucket first-in is lowest age, and the bucket being emptied only moves up.
The one order the buckets do not copy is that of markers of equal height, which scikit-image's heap takes
in an order that depends on its whole content; here they leave in raster order (ties: pixels at exactly
the same flooding cost from two markers).

The rules copied from ``skimage/segmentation/_watershed_cy.pyx`` (0.26):

- neighbours in the order up, left, right, down; pixels outside the image or the mask are never pushed;
- without watershed lines a pixel takes its label when it is pushed, from the pixel that pushed it, so
  each pixel enters the queue once: the queue chains pixels (one ``next`` per pixel);
- with watershed lines a pixel takes its label when it leaves the queue, unless a 4-neighbour still in the
  mask already holds another label: then it leaves the mask (a line) and stays 0. It is pushed once per
  neighbour that pops before it does, a queued copy of a labelled pixel is skipped, and a line pixel still
  pushes its neighbours with the label it was pushed with: the queue chains items (pixel, label, next).
"""

from __future__ import annotations

import numba
import numpy as np

BUCKETS = 256
_NONE = -1  # end of a chain


@numba.njit(cache=True, nogil=True, inline="always")
def _neighbour(pixel: int, k: int, column: int, width: int, size: int) -> int:
    """The ``k``-th 4-neighbour of a raveled ``pixel`` (up, left, right, down), or -1 off the image."""
    if k == 0:
        return pixel - width if pixel >= width else _NONE
    if k == 1:
        return pixel - 1 if column > 0 else _NONE
    if k == 2:
        return pixel + 1 if column < width - 1 else _NONE
    return pixel + width if pixel < size - width else _NONE


@numba.njit(cache=True, nogil=True, inline="always")
def _reaches_open_ground(pixel: int, labels: np.ndarray, inside: np.ndarray, width: int, size: int) -> bool:
    """Whether a raveled pixel has a 4-neighbour in the mask and unlabelled."""
    column = pixel % width
    for k in range(4):
        neighbour = _neighbour(pixel, k, column, width, size)
        if neighbour != _NONE and inside[neighbour] != 0 and labels[neighbour] == 0:
            return True
    return False


@numba.njit(cache=True, nogil=True)
def flood(levels: np.ndarray, ranks: np.ndarray, output: np.ndarray, mask: np.ndarray) -> None:
    """Flood ``output`` (int32 ``(H, W)``, the markers, zero outside ``mask``) in place over ``mask``
    (uint8 ``(H, W)``) by the heights ``ranks[levels]`` (``ranks`` uint8, 256 entries: the order of each
    uint8 level's height), without watershed lines.

    Markers with no unlabelled mask pixel beside them never enter: they would push nothing (labels only
    spread), and leaving them out changes no other item's order (most of the second cell flood's mask is
    markers)."""
    width = levels.shape[1]
    size = levels.size
    heights, labels, inside = levels.ravel(), output.ravel(), mask.ravel()
    following = np.empty(size, np.int32)  # the next pixel in its bucket
    head = np.full(BUCKETS, _NONE, np.int64)
    tail = np.full(BUCKETS, _NONE, np.int64)
    for pixel in range(size):
        if labels[pixel] != 0 and _reaches_open_ground(pixel, labels, inside, width, size):
            # the chaining is written out twice: a helper taking the arrays (inlined or not) made the
            # flood 2x slower, numba counting references to them on every call
            bucket = ranks[heights[pixel]]
            following[pixel] = _NONE
            if tail[bucket] == _NONE:
                head[bucket] = pixel
            else:
                following[tail[bucket]] = pixel
            tail[bucket] = pixel
    bucket = 0
    while bucket < BUCKETS:
        pixel = head[bucket]
        if pixel == _NONE:
            bucket += 1
            continue
        head[bucket] = following[pixel]
        if head[bucket] == _NONE:
            tail[bucket] = _NONE
        label, column = labels[pixel], pixel % width
        for k in range(4):
            neighbour = _neighbour(pixel, k, column, width, size)
            if neighbour == _NONE or inside[neighbour] == 0 or labels[neighbour] != 0:
                continue
            labels[neighbour] = label
            target = bucket if ranks[heights[neighbour]] < bucket else int(ranks[heights[neighbour]])
            following[neighbour] = _NONE
            if tail[target] == _NONE:
                head[target] = neighbour
            else:
                following[tail[target]] = neighbour
            tail[target] = neighbour


@numba.njit(cache=True, nogil=True)
def _push(items: np.ndarray, used: int, pixel: int, label: int, bucket: int, head, tail) -> np.ndarray:
    """Append item ``used`` (pixel, label) to ``bucket``'s chain; ``items`` (int32 rows of pixel, label,
    next), doubled when full, is returned."""
    if used == items.shape[0]:
        grown = np.empty((2 * used, 3), np.int32)
        grown[:used] = items
        items = grown
    items[used, 0], items[used, 1], items[used, 2] = pixel, label, _NONE
    if tail[bucket] == _NONE:
        head[bucket] = used
    else:
        items[tail[bucket], 2] = used
    tail[bucket] = used
    return items


@numba.njit(cache=True, nogil=True)
def flood_with_lines(levels: np.ndarray, ranks: np.ndarray, output: np.ndarray, mask: np.ndarray) -> None:
    """``flood`` with watershed lines: line pixels stay 0 in ``output`` and leave ``mask`` (changed in
    place). An item's label is negative for the markers' own items (scikit-image's ``index == source``)."""
    width = levels.shape[1]
    size = levels.size
    heights, labels, inside = levels.ravel(), output.ravel(), mask.ravel()
    items = np.empty((1024 + 2 * np.count_nonzero(inside), 3), np.int32)  # most pixels enter once or twice
    head = np.full(BUCKETS, _NONE, np.int64)
    tail = np.full(BUCKETS, _NONE, np.int64)
    used = 0
    for pixel in range(size):
        if labels[pixel] != 0:
            items = _push(items, used, pixel, -labels[pixel], ranks[heights[pixel]], head, tail)
            used += 1
    bucket = 0
    while bucket < BUCKETS:
        item = head[bucket]
        if item == _NONE:
            bucket += 1
            continue
        head[bucket] = items[item, 2]
        if head[bucket] == _NONE:
            tail[bucket] = _NONE
        pixel, label = items[item, 0], items[item, 1]
        if label > 0 and labels[pixel] != 0:
            continue  # a copy of a pixel labelled from another neighbour
        label, column = abs(label), pixel % width
        line = inside[pixel] == 0
        for k in range(4):
            if line:
                break
            neighbour = _neighbour(pixel, k, column, width, size)
            if (
                neighbour != _NONE
                and inside[neighbour] != 0
                and labels[neighbour] != 0
                and labels[neighbour] != label
            ):
                inside[pixel] = 0
                line = True
        if not line:
            labels[pixel] = label
        for k in range(4):
            neighbour = _neighbour(pixel, k, column, width, size)
            if neighbour == _NONE or inside[neighbour] == 0 or labels[neighbour] != 0:
                continue
            target = bucket if ranks[heights[neighbour]] < bucket else int(ranks[heights[neighbour]])
            items = _push(items, used, neighbour, label, target, head, tail)
            used += 1


# -- full-image passes around the floods: one compiled pass where numpy / OpenCV take several ---------------------


@numba.njit(cache=True, nogil=True)
def remove_small_labels(labels: np.ndarray, min_area: float) -> None:
    """Set every label of ``labels`` (int32 ``(H, W)``, changed in place) with fewer than ``min_area``
    pixels to 0: counted by runs of equal labels, not numpy's bincount and int32 gather."""
    flat = labels.ravel()
    counts = np.zeros(flat.max() + 1, np.int64)
    start = 0
    for pixel in range(1, flat.size + 1):
        if pixel == flat.size or flat[pixel] != flat[start]:
            counts[flat[start]] += pixel - start
            start = pixel
    small = counts < min_area
    small[0] = False
    if not small.any():
        return
    for pixel in range(flat.size):
        if small[flat[pixel]]:
            flat[pixel] = 0


@numba.njit(cache=True, nogil=True)
def interior(labels: np.ndarray) -> np.ndarray:
    """bool ``(H, W)``: labelled pixels whose 4-neighbours all hold the same label (``find_boundaries``
    erased; off the image a neighbour is the pixel itself, as a reflected border makes it)."""
    height, width = labels.shape
    inside = np.zeros((height, width), np.bool_)
    for row in range(height):
        for column in range(width):
            label = labels[row, column]
            inside[row, column] = (
                label != 0
                and (row == 0 or labels[row - 1, column] == label)
                and (column == 0 or labels[row, column - 1] == label)
                and (column == width - 1 or labels[row, column + 1] == label)
                and (row == height - 1 or labels[row + 1, column] == label)
            )
    return inside


@numba.njit(cache=True, nogil=True)
def component_stats(regions: np.ndarray, count: int) -> np.ndarray:
    """cv2's ``stats`` (int32 ``(count, 5)``: left, top, width, height, area) of a label image with labels
    0..count-1, one update per run of equal labels along a row: ``connectedComponentsWithStats`` spends
    three times its labelling on them."""
    height, width = regions.shape
    stats = np.zeros((count, 5), np.int32)
    right = np.full(count, -1, np.int32)
    bottom = np.full(count, -1, np.int32)
    stats[:, 0] = width
    stats[:, 1] = height
    for row in range(height):
        line = regions[row]
        column = 0
        while column < width:
            label, start = line[column], column
            while column < width and line[column] == label:
                column += 1
            stats[label, 4] += column - start
            stats[label, 0] = min(stats[label, 0], start)
            right[label] = max(right[label], column - 1)
            stats[label, 1] = min(stats[label, 1], row)
            bottom[label] = row
    for label in range(count):
        if stats[label, 4] > 0:
            stats[label, 2] = right[label] - stats[label, 0] + 1
            stats[label, 3] = bottom[label] - stats[label, 1] + 1
    return stats


@numba.njit(cache=True, nogil=True)
def gather(table: np.ndarray, index: np.ndarray) -> np.ndarray:
    """``table[index]`` for an int32 label image ``index``: one loop, where numpy first copies the index
    to intp (about 4x slower on 2048² images)."""
    found = np.empty(index.shape, table.dtype)
    flat, labels = found.ravel(), index.ravel()
    for pixel in range(labels.size):
        flat[pixel] = table[labels[pixel]]
    return found
