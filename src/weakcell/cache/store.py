"""Read a finished cell cache: the cells and images tables, crops from memmapped shards, instance masks.

Layout of a cache folder (written by ``weakcell.cache.build``)::

    config.yaml                     the resolved config that built it
    cells.parquet                   one row per cell (see CELLS_COLUMNS); row i = crop i of ``crops``
    images.parquet                  one row per image, including images with no cell and skipped ones,
                                    with the content hash of the channel files it was cut from
    lineage.json                    the settings and image content the cache holds (``cache_lineage``)
    skipped.csv                     image_id, split, reason of every skipped image
    masks/{ID}_cells.png            instance labels at full resolution, 8- or 16-bit (0 = background)
    masks/{ID}_nuclei.png           the nucleus of cell k labelled k
    shards/partPPP-SSSSS.npy        (n, 4, S, S) uint8 crops, R, G, B, Y
    shards/partPPP-SSSSS.*.parquet  the shard's own cells / images index (written after the .npy)
    parts/partPPP-of-NNN.json       a finished part of a split run (``cache.num_shards``)
    .weakcell.lock                  the lock of the run writing the folder (``weakcell.outputs``)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import yaml

from weakcell.config import Config
from weakcell.config.lineage import reads, saved_config
from weakcell.data.ids import inside
from weakcell.errors import StageError
from weakcell.lineage import Lineage, digest, read_lineage
from weakcell.segment import Segmentation

CELLS_FILE = "cells.parquet"
IMAGES_FILE = "images.parquet"
SKIPPED_FILE = "skipped.csv"
MASKS_DIR = "masks"
SHARDS_DIR = "shards"
PARTS_DIR = "parts"

CELLS_COLUMNS: tuple[str, ...] = (
    "image_id",
    "cell_id",
    "split",
    "x0",
    "y0",
    "x1",
    "y1",
    "area",
    "nucleus_area",
    "touches_border",
    "shard",
    "row",
)
IMAGES_COLUMNS: tuple[str, ...] = (
    "image_id",
    "split",
    "width",
    "height",
    "n_cells",
    "status",
    "reason",
    "content_hash",  # weakcell.data.manifest: the channel files' content when the image was cached
)


def mask_paths(folder: str | os.PathLike[str], image_id: str) -> tuple[Path, Path]:
    """``(cells, nuclei)`` mask files of ``image_id`` inside the cache ``folder``."""
    masks = Path(folder) / MASKS_DIR
    return inside(masks, f"{image_id}_cells.png"), inside(masks, f"{image_id}_nuclei.png")


def read_masks(folder: str | os.PathLike[str], image_id: str) -> Segmentation:
    """The full-resolution instance masks of one cached image as int32 ``(H, W)`` arrays."""
    planes = []
    for path in mask_paths(folder, image_id):
        plane = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if plane is None:
            raise FileNotFoundError(f"mask {path} is missing or unreadable; rebuild the cache (FORCE=1)")
        planes.append(plane.astype(np.int32))
    return Segmentation(cells=planes[0], nuclei=planes[1])


def _configured_crop_size(folder: Path) -> int:
    """Crop size from the cache's saved config: a cache without a single cell has no shard to ask."""
    settings = yaml.safe_load((folder / "config.yaml").read_text())
    return int(settings["cache"]["crop_size"])


def require_finished(folder: str | os.PathLike[str]) -> None:
    """A one-line error when ``folder`` holds no finished cache (its two tables are written last)."""
    folder = Path(folder)
    if not (folder / CELLS_FILE).is_file() or not (folder / IMAGES_FILE).is_file():
        raise FileNotFoundError(
            f"no finished cell cache in {folder} (missing {CELLS_FILE} or {IMAGES_FILE}); "
            "run `weakcell cache` (or `weakcell cache-merge` after split runs)"
        )


def images_digest(images: pd.DataFrame) -> str:
    """One hash of what a cache holds per image: status, cells and the content it was cut from (images
    cached before content hashes were recorded count by their other columns)."""
    columns = ["image_id", "split", "status", "n_cells", "content_hash"]
    table = images.reindex(columns=columns).astype(str).sort_values(["split", "image_id"])
    return digest(table.to_numpy().tolist())


def cache_lineage(images: pd.DataFrame, cfg: Config) -> Lineage:
    """The lineage of a cache holding ``images`` (its images table), built under ``cfg``."""
    return Lineage("cache", reads("cache", cfg), {"images": images_digest(images)})


def cache_fingerprint(folder: str | os.PathLike[str]) -> str:
    """What a run records of the cache it was trained on: the fingerprint of its ``lineage.json`` (written
    when the cache is merged), or, for a cache built before lineage was recorded, of its tables and the
    settings its ``config.yaml`` holds."""
    require_finished(folder)
    recorded = read_lineage(folder)
    if recorded is not None:
        return recorded.fingerprint
    saved = saved_config(folder) or {}
    try:
        built_with = Config.model_validate(saved)
    except ValueError:  # a key an older version had and this one has not: the defaults stand in
        built_with = Config()
    return cache_lineage(pd.read_parquet(Path(folder) / IMAGES_FILE), built_with).fingerprint


class CellCache:
    """A finished cache folder, or several joined (``joined``: the sources a run trains on). ``cells`` row i
    is crop i; ``crops(indices)`` reads a batch of them.

    Shards are opened as read-only memmaps on first use, so a reader costs no memory up front and the
    OS page cache is shared between DataLoader workers. Pickling (DataLoader workers under spawn) drops
    the open memmaps; each process reopens its own.
    """

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        require_finished(self.folder)
        self.cells = pd.read_parquet(self.folder / CELLS_FILE)
        self.images = pd.read_parquet(self.folder / IMAGES_FILE)
        self._index_shards([self.folder], np.zeros(len(self.cells), dtype=np.int64))
        self._tables: list[np.ndarray | None] = [None]  # per part: (4, 256) uint8 intensity table
        self._folder_of: dict[str, Path] | None = None  # image -> its cache folder (joined caches)
        self.crop_size = (
            int(self._open(0).shape[-1]) if len(self.cells) else _configured_crop_size(self.folder)
        )

    @classmethod
    def joined(cls, parts: Sequence[tuple[CellCache, np.ndarray | None]]) -> CellCache:
        """One reader over several caches, each with the intensity table its crops are read through
        (``weakcell.cache.intensity.gain_table``: (4, 256) uint8; None = as cached): their cells and images
        tables one after another (cells re-indexed 0..N-1), masks from each image's own cache. ``folder``
        is the first part's. Image IDs must differ between the parts and crop sizes must agree."""
        readers = [reader for reader, _ in parts]
        sizes = {reader.folder: reader.crop_size for reader in readers}
        if len(set(sizes.values())) > 1:
            raise StageError(
                "the caches to join have crops of different sizes ("
                + ", ".join(f"{folder}: {size} px" for folder, size in sizes.items())
                + "); rebuild them with one cache.crop_size (make cache FORCE=1)"
            )
        images = pd.concat([reader.images for reader in readers], ignore_index=True)
        repeated = images["image_id"][images["image_id"].duplicated()]
        if len(repeated):
            raise StageError(
                f"image {repeated.iloc[0]} is in more than one of the caches {', '.join(map(str, sizes))}; "
                "image IDs must be unique over the sources"
            )
        joined = cls.__new__(cls)
        joined.folder = readers[0].folder
        joined.cells = pd.concat([reader.cells for reader in readers], ignore_index=True)
        joined.images = images
        part_of = np.repeat(np.arange(len(readers)), [len(reader.cells) for reader in readers])
        joined._index_shards([reader.folder for reader in readers], part_of)
        joined._tables = [table for _, table in parts]
        joined._folder_of = {
            str(image_id): reader.folder for reader in readers for image_id in reader.images["image_id"]
        }
        joined.crop_size = readers[0].crop_size
        return joined

    def _index_shards(self, folders: list[Path], part_of: np.ndarray) -> None:
        """Which shard file holds each cell and at which row; ``part_of`` (N,): each cell's folder."""
        self._part_of = part_of.astype(np.int64)  # (N,) which folder (part) a cell comes from
        self._shard_of = np.zeros(len(part_of), dtype=np.int64)  # (N,) which shard holds crop i
        self._shard_paths: list[Path] = []
        for part, folder in enumerate(folders):
            members = np.flatnonzero(part_of == part)
            codes, names = pd.factorize(self.cells["shard"].iloc[members], sort=True)
            self._shard_of[members] = codes + len(self._shard_paths)
            self._shard_paths += [folder / SHARDS_DIR / str(name) for name in names]
        self._row_of = self.cells["row"].to_numpy(np.int64)  # (N,) its row inside that shard
        self._shards: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.cells)

    def __getstate__(self) -> dict[str, object]:
        state = self.__dict__.copy()
        state["_shards"] = {}
        return state

    def _open(self, code: int) -> np.ndarray:
        shard = self._shards.get(code)
        if shard is None:
            shard = np.load(self._shard_paths[code], mmap_mode="r")
            self._shards[code] = shard
        return shard

    def crops(self, indices: np.ndarray | list[int]) -> np.ndarray:
        """Crops of cells ``indices`` (positions in ``cells``) as ``(B, 4, S, S)`` uint8, in the order asked,
        each through its part's intensity table.

        One fancy-indexed read per shard touched. A batch from a single shard is returned as read: a
        second copy into a fresh buffer costs more than the read itself (page faults of the new buffer).
        """
        indices = np.asarray(indices, dtype=np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"cell index out of range 0..{len(self) - 1}")
        shards, rows = self._shard_of[indices], self._row_of[indices]
        touched = np.unique(shards)
        if len(touched) == 1:
            out = self._open(int(touched[0]))[rows]
        else:
            out = np.empty((len(indices), 4, self.crop_size, self.crop_size), dtype=np.uint8)
            for code in touched:
                members = np.flatnonzero(shards == code)
                out[members] = self._open(int(code))[rows[members]]
        if any(table is not None for table in self._tables):
            self._through_tables(out, self._part_of[indices])
        return out

    def _through_tables(self, crops: np.ndarray, parts: np.ndarray) -> None:
        """Map each crop's pixels through its part's intensity table, in place: one lookup per channel
        (a table maps all 256 values at once, cheaper than a float multiply, and keeps 0 at 0)."""
        for part, table in enumerate(self._tables):
            if table is None:
                continue
            members = np.flatnonzero(parts == part)
            if len(members) == len(crops):
                for channel in range(crops.shape[1]):
                    crops[:, channel] = table[channel][crops[:, channel]]
            elif len(members):
                block = crops[members]
                for channel in range(block.shape[1]):
                    block[:, channel] = table[channel][block[:, channel]]
                crops[members] = block

    def masks(self, image_id: str) -> Segmentation:
        """Full-resolution cell and nucleus masks of ``image_id``."""
        folder = self.folder if self._folder_of is None else self._folder_of.get(image_id, self.folder)
        return read_masks(folder, image_id)

    def bags(self) -> dict[str, np.ndarray]:
        """Image ID -> positions in ``cells`` of its cells (its MIL bag), in cell_id order. Images without
        cells have no bag; ``images`` still lists them."""
        return {str(k): v for k, v in self.cells.groupby("image_id", sort=False).indices.items()}
