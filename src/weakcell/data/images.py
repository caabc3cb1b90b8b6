"""Read and write HPA-style images: one grayscale file per channel, ``{ID}_{red,green,blue,yellow}.{ext}``.

Every image enters the kit as one channel-first uint8 array ``(4, H, W)`` in ``CHANNELS`` order.
16-bit files are scaled to 8 bits the same way everywhere (``round(v / 257)``, so 65535 -> 255), never
per-image min/max, so intensities stay comparable across images and channels.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import tifffile

from weakcell.constants import CHANNEL_COLORS, CHANNELS
from weakcell.data.ids import inside
from weakcell.outputs import atomic_write_bytes

# Looked for in this order; the first that exists wins.
EXTENSIONS: tuple[str, ...] = (".png", ".tif", ".tiff", ".jpg", ".jpeg")


class ImageReadError(OSError):
    """A channel file that is missing, unreadable or inconsistent; the message names the file."""


def channel_path(folder: str | os.PathLike[str], image_id: str, channel: str) -> Path:
    """Path of one channel file, trying each known extension; raises ImageReadError if none exists."""
    folder = Path(folder)
    for ext in EXTENSIONS:
        candidate = inside(folder, f"{image_id}_{channel}{ext}")
        if candidate.is_file():
            return candidate
    raise ImageReadError(
        f"missing channel file {folder / f'{image_id}_{channel}'}.png (also tried {', '.join(EXTENSIONS[1:])}); "
        f"every image needs {', '.join(f'{image_id}_{c}' for c in CHANNELS)}"
    )


def to_uint8(array: np.ndarray, where: str = "image") -> np.ndarray:
    """Scale a decoded channel to uint8: 8-bit as is, 16-bit by /257, floats in [0, 1] by *255."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.uint16:
        # (v + 128) // 257 is round(v / 257) in integers: 65535 -> 255, 257 -> 1.
        return ((array.astype(np.uint32) + 128) // 257).astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        if np.nanmax(array) > 1.0 + 1e-6 or np.nanmin(array) < 0:
            raise ImageReadError(f"{where}: float image outside [0, 1] (dtype {array.dtype})")
        return np.round(np.nan_to_num(array) * 255).astype(np.uint8)
    raise ImageReadError(f"{where}: unsupported pixel type {array.dtype} (expected 8- or 16-bit grayscale)")


def read_channel(path: str | os.PathLike[str]) -> np.ndarray:
    """Decode one channel file into ``(H, W)`` uint8. Colour files (some HPA JPGs) keep their brightest
    colour component, which is the stain's own colour; an alpha channel is opacity, not stain, and is
    left out (an opaque RGBA file would otherwise read as all 255)."""
    path = Path(path)
    decoded: np.ndarray | None
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            decoded = tifffile.imread(path)
        else:
            decoded = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    except Exception as err:  # decoders raise many types on corrupt data
        raise ImageReadError(f"cannot decode {path}: {err}; re-download or re-export the file") from err
    if decoded is None:  # cv2 returns None for corrupt or truncated files
        raise ImageReadError(f"cannot decode {path}: corrupt or truncated; re-download or re-export the file")
    return to_uint8(grayscale_plane(np.asarray(decoded), str(path)), where=str(path))


def grayscale_plane(array: np.ndarray, where: str) -> np.ndarray:
    """A decoded channel file as one ``(H, W)`` plane at its own bit depth: colour files keep their
    brightest colour component (the stain's own colour), alpha is left out."""
    if array.ndim == 3:
        array = array[..., :3].max(axis=2) if array.shape[2] in (3, 4) else array[0]  # RGB(A) -> max of RGB
    if array.ndim != 2:
        raise ImageReadError(f"{where}: expected a 2-D grayscale image, got shape {array.shape}")
    return array


def read_image(folder: str | os.PathLike[str], image_id: str) -> np.ndarray:
    """All four channels of ``image_id`` in ``folder`` as ``(4, H, W)`` uint8 (R, G, B, Y)."""
    paths = [channel_path(folder, image_id, channel) for channel in CHANNELS]
    channels = [read_channel(p) for p in paths]
    shapes = {p.name: c.shape for p, c in zip(paths, channels)}
    if len(set(shapes.values())) > 1:
        listing = ", ".join(f"{name} {shape[1]}x{shape[0]}" for name, shape in shapes.items())
        raise ImageReadError(f"channels of {image_id} in {folder} differ in size: {listing}")
    return np.stack(channels)


def write_channel(path: str | os.PathLike[str], channel: np.ndarray, compression: int = 1) -> None:
    """Write one ``(H, W)`` uint8/uint16 plane as PNG atomically (temp file, then rename).
    ``compression`` 0-9 trades size for speed; 1 is ~5x faster than 9 for ~10% more bytes."""
    path = Path(path)
    ok, encoded = cv2.imencode(
        ".png", np.ascontiguousarray(channel), [cv2.IMWRITE_PNG_COMPRESSION, compression]
    )
    if not ok:
        raise OSError(f"PNG encoding failed for {path}")
    atomic_write_bytes(path, encoded.tobytes())


def write_image(
    folder: str | os.PathLike[str], image_id: str, image: np.ndarray, compression: int = 1
) -> None:
    """Write ``(4, H, W)`` uint8 as the four ``{ID}_{color}.png`` files of the HPA layout."""
    if image.ndim != 3 or image.shape[0] != len(CHANNELS):
        raise ValueError(f"expected (4, H, W), got {image.shape}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for channel, plane in zip(CHANNELS, image):
        write_channel(inside(folder, f"{image_id}_{channel}.png"), plane, compression)


def list_image_ids(folder: str | os.PathLike[str]) -> list[str]:
    """Image IDs that have a green channel file in ``folder`` (sorted); completeness is checked on read."""
    ids = set()
    for path in Path(folder).iterdir():
        stem, suffix = path.stem, path.suffix.lower()
        if suffix in EXTENSIONS and stem.endswith("_green"):
            ids.add(stem[: -len("_green")])
    return sorted(ids)


def composite_rgb(image: np.ndarray, gain: float = 1.0) -> np.ndarray:
    """``(4, H, W)`` uint8 -> ``(H, W, 3)`` uint8 display composite (yellow adds to red and green)."""
    planes = image.astype(np.float32) / 255.0
    rgb = np.zeros((*image.shape[1:], 3), dtype=np.float32)
    for plane, channel in zip(planes, CHANNELS):
        rgb += plane[..., None] * np.asarray(CHANNEL_COLORS[channel], dtype=np.float32)
    return (np.clip(rgb * gain, 0, 1) * 255).astype(np.uint8)
