"""Cell masks as the 2021 cell-level submission carries them: pycocotools' compressed RLE of the
column-major mask, zlib-compressed, base64-encoded. Encoding (of a whole mask, or of a cell's crop placed at
its box without materialising the image) and decoding (to a mask, or to the flat pixel indices alone)."""

from __future__ import annotations

import base64
import binascii
import warnings
import zlib

import numpy as np
from pycocotools import mask as mask_utils

# No mask has a run (or a difference of runs) this long: pycocotools keeps counts as 32-bit unsigned
# ints, and 2**31 pixels is a 46k x 46k image. The bound keeps sums of runs far from int64 overflow.
MAX_RUN = 2**31


def _pack(counts: bytes) -> str:
    return base64.b64encode(zlib.compress(counts, 9)).decode("ascii")


def encode_mask(mask: np.ndarray) -> str:
    """Boolean (H, W) mask -> the competition's text: pycocotools RLE counts -> zlib level 9 -> base64."""
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D (H, W), got shape {mask.shape}")
    rle = mask_utils.encode(np.asfortranarray(mask, dtype=np.uint8))
    return _pack(rle["counts"])


def _unpack(text: str) -> bytes:
    return zlib.decompress(base64.b64decode(text.encode("ascii"), validate=True))


def mask_runs(text: str) -> np.ndarray:
    """The run lengths of an encoded mask (off, on, off, ... in column-major order). Raises what decoding
    raises (``binascii.Error``, ``zlib.error``, ``UnicodeEncodeError``, ``ValueError``)."""
    return rle_counts(_unpack(text))


def decode_mask(text: str, height: int, width: int) -> np.ndarray:
    """Inverse of ``encode_mask``: base64 -> zlib -> RLE counts -> bool (height, width).
    Raises ValueError when the runs do not cover exactly height * width pixels."""
    counts = _unpack(text)
    runs = rle_counts(counts)
    if runs.sum() != height * width:
        raise ValueError(f"mask covers {int(runs.sum())} pixels, not {height}x{width} = {height * width}")
    with warnings.catch_warnings():  # pycocotools under numpy 2: "__array__ ... copy keyword"
        warnings.simplefilter("ignore", DeprecationWarning)
        return mask_utils.decode({"size": [int(height), int(width)], "counts": counts}).astype(bool)


def mask_pixels(text: str, height: int, width: int) -> np.ndarray:
    """The pixels of an encoded mask as sorted indices into the image raveled column-major (the RLE's own
    order, ``mask.ravel(order="F")``), without building the (height, width) array: the work grows with
    the mask's runs, not with the image. Raises ValueError when the text does not decode or its runs do
    not cover exactly height * width pixels."""
    try:
        runs = mask_runs(text)
    except (binascii.Error, zlib.error, UnicodeEncodeError) as err:
        raise ValueError(f"mask does not decode ({err})") from err
    if runs.sum() != height * width:
        raise ValueError(f"mask covers {int(runs.sum())} pixels, not {height}x{width} = {height * width}")
    ends = np.cumsum(runs)
    starts, lengths = ends[0::2][: len(runs[1::2])], runs[1::2]  # runs alternate off, on, off, ...
    starts, lengths = starts[lengths > 0], lengths[lengths > 0]
    # one arange over every "on" pixel, shifted so each run restarts at its own start
    shift = np.repeat(starts - np.concatenate(([0], np.cumsum(lengths)[:-1])), lengths)
    return np.arange(int(lengths.sum()), dtype=np.int64) + shift


def rle_counts(counts: bytes) -> np.ndarray:
    """Decode pycocotools' compressed counts string into run lengths (zeros first), vectorised.
    Mirrors ``rleFrString`` in maskApi.c; raises ValueError on malformed strings, negative runs and runs of
    ``MAX_RUN`` pixels or more. Checking the runs before ``mask_utils.decode`` matters: pycocotools writes
    past its buffer when the runs sum to more than height * width. Bounding each number first keeps every
    sum below int64's range: 64 runs of 2**58 would otherwise wrap their sum to any value, e.g. exactly
    height * width."""
    chars = np.frombuffer(counts, dtype=np.uint8).astype(np.int64) - 48
    if chars.size == 0:
        raise ValueError("empty RLE counts")
    if chars.min() < 0 or chars.max() > 63:
        raise ValueError("RLE counts hold characters outside the pycocotools alphabet")
    more = (chars & 0x20) != 0
    if more[-1]:
        raise ValueError("RLE counts end in the middle of a number")
    ends = np.flatnonzero(~more)
    starts = np.concatenate(([0], ends[:-1] + 1))
    group = np.repeat(np.arange(ends.size), ends - starts + 1)
    shift = np.arange(chars.size) - starts[group]
    if shift.max() > 11:
        raise ValueError("RLE counts hold a number too long")
    values = np.add.reduceat((chars & 0x1F) << (5 * shift), starts)
    negative = (chars[ends] & 0x10) != 0
    values[negative] -= np.left_shift(1, 5 * (shift[ends][negative] + 1))
    if np.abs(values).max() >= MAX_RUN:
        raise ValueError(f"RLE counts hold a run of {int(np.abs(values).max())} pixels (at least 2**31)")
    runs = values.copy()
    runs[1::2] = np.cumsum(values[1::2])  # counts[m] = x + counts[m - 2] for m > 2
    runs[2::2] = np.cumsum(values[2::2])
    if runs.min() < 0:
        raise ValueError("RLE counts decode to a negative run")
    if runs.max() >= MAX_RUN:  # the differences were bounded, their sums need not be
        raise ValueError(f"RLE counts hold a run of {int(runs.max())} pixels (at least 2**31)")
    return runs


def _encode_runs(runs: list[int], height: int, width: int) -> str:
    rle = mask_utils.frPyObjects({"size": [height, width], "counts": runs}, height, width)
    return _pack(rle["counts"])


def placeholder(height: int, width: int) -> str:
    """The sample submission's prediction for an image without cells: ``0 1 <empty height x width mask>``
    (``PLACEHOLDER`` at 2048x2048; 1728x1728 and 3072x3072 rows of the sample carry their own)."""
    return f"0 1 {_encode_runs([int(height) * int(width)], int(height), int(width))}"


def encode_crop(crop: np.ndarray, y0: int, x0: int, height: int, width: int) -> str:
    """Encode a full (height, width) mask given only its bbox crop at (y0, x0): same text as
    ``encode_mask`` on the full image, but the work is proportional to the crop, not to the image."""
    crop = np.asarray(crop, dtype=bool)
    h, w = crop.shape
    if y0 < 0 or x0 < 0 or y0 + h > height or x0 + w > width:
        raise ValueError(f"crop {crop.shape} at ({y0}, {x0}) falls outside the {height}x{width} image")
    padded = np.zeros((h + 2, w), dtype=np.int8)
    padded[1:-1] = crop
    edges = np.diff(padded.ravel(order="F"))
    # Position i + 1 in the padded column-major order -> pixel index in the full image's column-major order.
    rises = np.flatnonzero(edges == 1) + 1
    falls = np.flatnonzero(edges == -1) + 1
    if rises.size == 0:
        return _encode_runs([height * width], height, width)
    col_r, row_r = np.divmod(rises, h + 2)
    col_f, row_f = np.divmod(falls, h + 2)
    on = (x0 + col_r) * height + y0 + row_r - 1
    off = (x0 + col_f) * height + y0 + row_f - 1
    # A run that ends at the image's bottom row continues at the top of the next column.
    joined = off[:-1] == on[1:]
    if joined.any():
        on = np.concatenate((on[:1], on[1:][~joined]))
        off = np.concatenate((off[:-1][~joined], off[-1:]))
    bounds = np.empty(2 * on.size + 2, dtype=np.int64)
    bounds[0] = 0
    bounds[1:-1:2] = on
    bounds[2:-1:2] = off
    bounds[-1] = height * width
    runs = np.diff(bounds)
    if runs[-1] == 0:
        runs = runs[:-1]
    return _encode_runs(runs.tolist(), height, width)
