"""Planted near-duplicates: copies of an image made the ways the same field reaches a data set twice
(re-encoded as JPEG, stored at another size, as a 16-bit file, brighter), for the duplicate finder's tests
and the folds benchmark (``benchmarks/bench_folds.py``). Each copy is written as the four channel files of
a new ID, in the format its transform implies."""

from __future__ import annotations

import gzip
import io
import os
from collections.abc import Callable
from functools import partial
from pathlib import Path

import cv2
import numpy as np
import tifffile

from weakcell.constants import CHANNELS
from weakcell.outputs import atomic_write


def _png(plane: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".png", np.ascontiguousarray(plane), [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise OSError("PNG encoding failed")
    return data.tobytes()


def _jpeg(plane: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".jpg", np.ascontiguousarray(plane), [cv2.IMWRITE_JPEG_QUALITY, 75])
    if not ok:
        raise OSError("JPEG encoding failed")
    return data.tobytes()


def _resized(scale: float) -> Callable[[np.ndarray], bytes]:
    def encode(plane: np.ndarray) -> bytes:
        side = round(plane.shape[0] * scale), round(plane.shape[1] * scale)
        method = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
        return _png(cv2.resize(plane, (side[1], side[0]), interpolation=method))

    return encode


def _sixteen_bit(plane: np.ndarray) -> bytes:
    # a 16-bit camera file of the same field: v * 257 plus the sub-8-bit noise an 8-bit copy rounded away
    noise = np.random.default_rng(int(plane.sum()) % 2**32).integers(0, 257, plane.shape)
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, (plane.astype(np.int64) * 257 + noise).clip(0, 65535).astype(np.uint16))
    return gzip.compress(buffer.getvalue(), compresslevel=1)


def _brighter(plane: np.ndarray) -> bytes:
    return _png(np.clip(plane.astype(np.float32) * 1.5 + 8, 0, 255).astype(np.uint8))


# name -> (file suffix, encoder of one (H, W) uint8 plane)
TRANSFORMS: dict[str, tuple[str, Callable[[np.ndarray], bytes]]] = {
    "jpeg": (".jpg", _jpeg),
    "resize_1728": (".png", _resized(1728 / 2048)),
    "resize_3072": (".png", _resized(3072 / 2048)),
    "sixteen_bit": (".tif.gz", _sixteen_bit),
    "brighter": (".png", _brighter),
}


def plant_copy(image: np.ndarray, folder: str | os.PathLike[str], image_id: str, transform: str) -> None:
    """Write ``(4, H, W)`` uint8 ``image`` as ``folder/<image_id>_<color><suffix>`` through ``transform``."""
    suffix, encode = TRANSFORMS[transform]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for color, plane in zip(CHANNELS, image):
        atomic_write(folder / f"{image_id}_{color}{suffix}", partial(Path.write_bytes, data=encode(plane)))
