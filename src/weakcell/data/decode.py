"""Decode one channel file's bytes at its own bit depth: PNG, JPEG, TIFF and gzipped TIFF (``.tif.gz``, the
HPA website's 16-bit files). Strict: a truncated or corrupt file is an error, never a partly grey plane.

``weakcell.data.images.read_channel`` reads a data set's files into the kit's uint8; this module is for
bytes that have not yet earned a place in a data set (a download, before it counts) and for readers that
want the native depth (the perceptual hashes of ``weakcell.duplicates``).
"""

from __future__ import annotations

import gzip
import io
import os
import zlib
from pathlib import Path

import cv2
import numpy as np
import tifffile
from PIL import Image

from weakcell.data.images import ImageReadError, grayscale_plane

# Longest first, so that ``x.tif.gz`` is a gzipped TIFF and not an unknown ``.gz``.
SUFFIXES: tuple[str, ...] = (".tif.gz", ".tiff.gz", ".png", ".jpg", ".jpeg", ".tif", ".tiff")


def channel_suffix(name: str) -> str | None:
    """The channel-file suffix ``name`` ends with (lower case), or None for any other file."""
    lower = name.lower()
    return next((suffix for suffix in SUFFIXES if lower.endswith(suffix)), None)


def decode_channel(data: bytes, name: str) -> np.ndarray:
    """``data`` (the bytes of a file called ``name``) -> ``(H, W)`` uint8 or uint16 plane.

    Raises ImageReadError naming ``name`` for a file type it does not know, a truncated or corrupt file,
    or a pixel type other than 8 or 16 bits."""
    suffix = channel_suffix(name)
    if suffix is None:
        raise ImageReadError(f"{name}: not a channel file (expected one of {', '.join(SUFFIXES)})")
    decoded: np.ndarray | None
    try:
        if suffix.endswith(".gz"):
            data, suffix = gzip.decompress(data), suffix[: -len(".gz")]
        if suffix in (".jpg", ".jpeg"):
            decoded = _decode_jpeg(data)
        elif suffix in (".tif", ".tiff"):
            decoded = tifffile.imread(io.BytesIO(data))
        else:  # cv2 returns None for a corrupt or truncated PNG (libpng checks every chunk's CRC)
            decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    except (OSError, EOFError, ValueError, zlib.error, tifffile.TiffFileError) as err:
        raise ImageReadError(f"cannot decode {name}: {err}") from err
    if decoded is None:
        raise ImageReadError(f"cannot decode {name}: corrupt or truncated")
    plane = grayscale_plane(np.asarray(decoded), name)
    if plane.dtype not in (np.uint8, np.uint16):
        raise ImageReadError(f"{name}: unsupported pixel type {plane.dtype} (expected 8- or 16-bit)")
    return plane


def read_channel_file(path: str | os.PathLike[str]) -> np.ndarray:
    """``decode_channel`` of a file on disk."""
    path = Path(path)
    return decode_channel(path.read_bytes(), path.name)


def _decode_jpeg(data: bytes) -> np.ndarray:
    # PIL, not cv2: libjpeg decodes a truncated file into a grey-padded image with a mere warning, which
    # cv2 passes on as success; PIL's load() raises on it (ImageFile.LOAD_TRUNCATED_IMAGES is off).
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return np.asarray(image)
