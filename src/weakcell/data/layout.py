"""What a dataset folder holds, read from directory listings and file headers, never by decoding pixels:
which labelled images have their four channel files, each file's size and bit depth, and whether the
sample submission's sizes match the test images. ``weakcell check`` reports it; ``make cache`` refuses
to start when too many labelled images lack their files.

Cost: one ``os.scandir`` per split folder, then one header per channel file (PIL reads a PNG's IHDR
chunk without inflating any pixel data): about 25 µs per file from the page cache, so the 87,224 channel
files of the full 2021 training set take a few seconds (more when the disk is cold).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from weakcell.constants import CHANNELS
from weakcell.data.images import EXTENSIONS

# PIL's mode of a single-channel file -> bits per pixel; RGB(A) files (some HPA JPGs) are read as their
# brightest colour component by ``images.read_channel``, so they count as 8-bit.
BITS_OF_MODE: dict[str, int] = {
    "1": 1,
    "L": 8,
    "P": 8,
    "RGB": 8,
    "RGBA": 8,
    "I;16": 16,
    "I;16B": 16,
    "I": 32,
    "F": 32,
}
SUPPORTED_BITS = (8, 16)


def channel_files(folder: str | os.PathLike[str]) -> dict[str, dict[str, Path]]:
    """``image ID -> channel -> file`` from one listing of ``folder`` (first extension of ``EXTENSIONS``
    wins, as the reader does); an absent folder holds nothing."""
    folder = Path(folder)
    if not folder.is_dir():
        return {}
    rank = {ext: i for i, ext in enumerate(EXTENSIONS)}
    files: dict[str, dict[str, Path]] = {}
    best: dict[tuple[str, str], int] = {}
    with os.scandir(folder) as entries:
        for entry in entries:
            stem, dot, ext = entry.name.rpartition(".")
            image_id, _, channel = stem.rpartition("_")
            ext = f"{dot}{ext}".lower()
            if ext not in rank or channel not in CHANNELS or not image_id:
                continue
            key = (image_id, channel)
            if key not in best or rank[ext] < best[key]:
                best[key] = rank[ext]
                files.setdefault(image_id, {})[channel] = Path(entry.path)
    return files


def without_files(image_ids: Iterable[str], files: dict[str, dict[str, Path]]) -> list[str]:
    """The IDs among ``image_ids`` that lack one of their four channel files, in the given order."""
    return [i for i in image_ids if len(files.get(i, {})) < len(CHANNELS)]


@dataclass(frozen=True)
class Header:
    """One channel file's size and bits per pixel, from its header."""

    path: Path
    width: int
    height: int
    bits: int


def read_header(path: Path) -> Header:
    """The header of one image file; an unreadable file raises ``OSError`` naming it."""
    try:
        with Image.open(path) as image:
            return Header(path, image.size[0], image.size[1], BITS_OF_MODE.get(image.mode, 0))
    except (OSError, ValueError, SyntaxError) as err:  # PIL raises these on damaged headers
        raise OSError(f"{path}: not a readable image ({err})") from err


@dataclass
class HeaderSurvey:
    """Headers of many images: sizes and bit depths seen, and what is wrong with which image."""

    images: int = 0
    files: int = 0
    sizes: dict[tuple[int, int], int] = field(default_factory=dict)  # (width, height) -> images
    bits: dict[int, int] = field(default_factory=dict)  # bits per pixel -> files
    problems: list[str] = field(default_factory=list)

    def add(self, image_id: str, channels: dict[str, Path]) -> Header | None:
        """Read the channel headers of one image; returns its first header when the channels agree."""
        try:
            headers = [read_header(channels[c]) for c in CHANNELS if c in channels]
        except OSError as err:
            self.problems.append(str(err))
            return None
        self.images += 1
        self.files += len(headers)
        for header in headers:
            self.bits[header.bits] = self.bits.get(header.bits, 0) + 1
            if header.bits not in SUPPORTED_BITS:
                self.problems.append(
                    f"{header.path}: {header.bits}-bit pixels; the kit reads 8- or 16-bit files"
                )
        shapes = {(h.width, h.height) for h in headers}
        if len(shapes) > 1:
            listing = ", ".join(f"{h.path.name} {h.width}x{h.height}" for h in headers)
            self.problems.append(f"channels of {image_id} differ in size: {listing}")
            return None
        size = shapes.pop()
        self.sizes[size] = self.sizes.get(size, 0) + 1
        return headers[0]

    def describe(self) -> str:
        """``2048x2048 x 540, 3072x3072 x 29; 8-bit`` style summary."""
        sizes = ", ".join(f"{w}x{h} x {n}" for (w, h), n in sorted(self.sizes.items()))
        bits = " + ".join(f"{b}-bit x {n} files" for b, n in sorted(self.bits.items()))
        return f"{sizes or 'no image'}; {bits or 'no file'}"
