"""Perceptual hashes of HPA channel files, cached by file content.

The hash of one channel: the plane at its own bit depth as float, area-averaged to 32x32 (so 1728, 2048
and 3072 px images of one field give nearly the same block means), its 2-D DCT, the 64 lowest frequencies
but the DC term (the 8x8 corner without (0, 0), plus (0, 8)), one bit per coefficient: above their median.
A gain (brightness, 8- vs 16-bit) scales every coefficient and an offset moves only the DC term, so
neither moves a bit; JPEG re-encoding disturbs the high frequencies, which are not kept. An image's hash is
its four channels' 64-bit words in R, G, B, Y order; two images' distance is the Hamming distance of the
256 bits.

``HashCache`` keeps the hash of every channel file seen: looked up by (path, size, mtime) first, then by
the sha256 of the file's bytes, so a file touched, moved or copied is not decoded again.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from weakcell.constants import CHANNELS
from weakcell.data.decode import channel_suffix, decode_channel
from weakcell.data.images import ImageReadError
from weakcell.outputs import atomic_write

# Bump when the hash changes: cached hashes of another version are not used.
HASH_VERSION = 1
_SIDE = 32  # the plane is averaged to _SIDE x _SIDE before the DCT
CACHE_COLUMNS = ("path", "size", "mtime_ns", "sha256", "hash", "version")


def plane_hash(plane: np.ndarray) -> np.uint64:
    """64-bit perceptual hash of one ``(H, W)`` plane (any bit depth)."""
    small = cv2.resize(plane.astype(np.float32), (_SIDE, _SIDE), interpolation=cv2.INTER_AREA)
    spectrum = cv2.dct(small)
    coefficients = np.concatenate([spectrum[:8, :8].ravel()[1:], spectrum[0, 8:9]])  # 64, DC left out
    bits = coefficients > np.median(coefficients)
    return np.uint64(int(np.packbits(bits, bitorder="little").view("<u8")[0]))


def image_hash(planes: list[np.ndarray]) -> np.ndarray:
    """The four channels' hashes, ``(4,)`` uint64 in R, G, B, Y order."""
    return np.array([plane_hash(p) for p in planes], dtype=np.uint64)


@dataclass(frozen=True)
class ImageFiles:
    """One image of a folder: its ID and its channel files in R, G, B, Y order."""

    image_id: str
    paths: tuple[Path, ...]


def list_images(folder: str | os.PathLike[str]) -> tuple[list[ImageFiles], list[str]]:
    """Images of a folder of ``<id>_<color>.<png|jpg|tif|tif.gz>`` files, sorted by ID, and the IDs that
    lack a channel (skipped). A channel in two formats takes the first of ``SUFFIXES``' order."""
    found: dict[str, dict[str, Path]] = {}
    for path in sorted(Path(folder).iterdir()):
        suffix = channel_suffix(path.name)
        if suffix is None or not path.is_file():
            continue
        image_id, _, color = path.name[: -len(suffix)].rpartition("_")
        if color in CHANNELS and image_id:
            found.setdefault(image_id, {}).setdefault(color, path)
    complete = [
        ImageFiles(image_id, tuple(channels[c] for c in CHANNELS))
        for image_id, channels in sorted(found.items())
        if len(channels) == len(CHANNELS)
    ]
    incomplete = sorted(image_id for image_id, channels in found.items() if len(channels) < len(CHANNELS))
    return complete, incomplete


class HashCache:
    """Channel-file hashes by (path, size, mtime) and by content (sha256), stored as a parquet file."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.by_stat: dict[tuple[str, int, int], tuple[str, int]] = {}
        self.by_content: dict[str, int] = {}
        self.added = 0
        stored = self._read()
        for row in stored.itertuples(index=False):
            self.add(str(row.path), int(row.size), int(row.mtime_ns), str(row.sha256), int(row.hash))
        self.added = 0

    def _read(self) -> pd.DataFrame:
        if self.path is None or not self.path.is_file():
            return pd.DataFrame(columns=list(CACHE_COLUMNS))
        table = pd.read_parquet(self.path)
        if list(table.columns) != list(CACHE_COLUMNS):
            return pd.DataFrame(columns=list(CACHE_COLUMNS))  # not a cache of this kind: start afresh
        return table[table["version"] == HASH_VERSION]  # hashes of another version are recomputed

    def add(self, path: str, size: int, mtime_ns: int, sha256: str, value: int) -> None:
        self.by_stat[(path, size, mtime_ns)] = (sha256, value)
        self.by_content[sha256] = value
        self.added += 1

    def lookup(self, path: Path) -> int | None:
        """The cached hash of ``path`` if it is unchanged since it was hashed (same size and mtime)."""
        stat = path.stat()
        hit = self.by_stat.get((str(path.resolve()), stat.st_size, stat.st_mtime_ns))
        return None if hit is None else hit[1]

    def save(self) -> None:
        if self.path is None or not self.added:
            return
        table = pd.DataFrame(
            [(p, s, m, sha, v, HASH_VERSION) for (p, s, m), (sha, v) in self.by_stat.items()],
            columns=list(CACHE_COLUMNS),
        ).astype({"size": np.int64, "mtime_ns": np.int64, "hash": np.uint64, "version": np.int64})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, lambda tmp: table.to_parquet(tmp, index=False))
        self.added = 0


# -- the work of one image, run in worker processes -----------------------------------------------------

_KNOWN: dict[str, int] = {}  # sha256 -> hash, given to each worker once


def init_worker(known: dict[str, int]) -> None:
    """Pool initializer: the content-keyed hashes the parent already has."""
    _KNOWN.clear()
    _KNOWN.update(known)


def hash_files(paths: tuple[Path, ...]) -> tuple[list[tuple[str, int, int, str, int]], str | None]:
    """Hash each channel file -> ``(resolved path, size, mtime_ns, sha256, hash)`` rows, or no rows and the
    reason when a file does not decode. A file whose content is already known is not decoded."""
    rows = []
    for path in paths:
        stat = path.stat()
        data = path.read_bytes()
        sha256 = hashlib.sha256(data).hexdigest()
        value = _KNOWN.get(sha256)
        if value is None:
            try:
                value = int(plane_hash(decode_channel(data, path.name)))
            except ImageReadError as err:
                return [], str(err)
        rows.append((str(path.resolve()), stat.st_size, stat.st_mtime_ns, sha256, value))
    return rows, None
