"""Decoded channels of one public image -> the uint8 ``(4, H, W)`` the data set stores.

The 16-bit rule. The HPA serves 16-bit TIFFs beside its 8-bit JPEGs; some hold 8-bit values in a 16-bit
container (every pixel at most 255: the hosts' scripts divide by 256 only when the maximum is above 255).
Over the image's 16-bit channels together (never per channel, so that a dim channel keeps its brightness
relative to the others): when no pixel exceeds 255 they are 8-bit values and are kept; otherwise each is
scaled as the kit scales every 16-bit file (``weakcell.data.images.to_uint8``: round(v / 257), 65535 ->
255), which matches the JPEG's 8-bit values within one step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from weakcell.constants import CHANNELS
from weakcell.data.images import to_uint8

# sources.csv, one row per image tried: what was fetched (format, bit depth, native size) and stored
SOURCES_COLUMNS = (
    "ID", "url_stem", "antibody", "cell_line", "locations", "format", "bit_depth", "width", "height",
    "stored_width", "stored_height", *(f"sha256_{c}" for c in CHANNELS), "status", "reason",
)  # fmt: skip


class ImageRejected(Exception):
    """The channels of an image cannot make one stored image (their sizes differ)."""


@dataclass(frozen=True)
class Converted:
    image: np.ndarray  # (4, H, W) uint8, stored size
    bit_depth: int  # 16 when any channel came as 16-bit, else 8
    native: tuple[int, int]  # (height, width) as fetched


def stored_shape(height: int, width: int, size: int | None) -> tuple[int, int]:
    """(height, width) stored for a native image: ``size`` on the longer side, aspect kept; None = native."""
    if size is None:
        return height, width
    scale = size / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def to_stored(planes: Sequence[np.ndarray], size: int | None) -> Converted:
    """Four decoded planes (R, G, B, Y; uint8 or uint16) -> the stored image. Raises ImageRejected when the
    channels differ in size."""
    shapes = {plane.shape for plane in planes}
    if len(shapes) != 1:
        raise ImageRejected(
            "channels differ in size: " + ", ".join(f"{p.shape[1]}x{p.shape[0]}" for p in planes)
        )
    sixteen = [plane for plane in planes if plane.dtype == np.uint16]
    container = bool(sixteen) and max(int(plane.max()) for plane in sixteen) <= 255
    as_uint8 = [
        plane.astype(np.uint8) if container and plane.dtype == np.uint16 else to_uint8(plane)
        for plane in planes
    ]
    height, width = planes[0].shape
    target = stored_shape(height, width, size)
    if target != (height, width):
        # INTER_AREA averages the source pixels under each stored pixel: no aliasing when shrinking
        as_uint8 = [cv2.resize(p, (target[1], target[0]), interpolation=cv2.INTER_AREA) for p in as_uint8]
    return Converted(np.stack(as_uint8), 16 if sixteen else 8, (height, width))
