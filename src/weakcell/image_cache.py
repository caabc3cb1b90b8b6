"""The whole images of a split, downscaled once for the whole-image model (``weakcell.image_model``), so
that its epochs never decode a 2048² PNG again::

    cache/<dataset>/images_<size>/<split>/      beside the cell cache, shared by every run and backend
        images.npy      (N, 4, S, S) uint8, R G B Y, read with np.load(mmap_mode="r")
        index.parquet   image_id, row, width, height, content_hash
        lineage.json    data.dataset, image_model.size and every image's content hash

Each image is read by ``weakcell.data.images.read_image`` (16-bit channels scaled by round(v / 257), as the
cell cache reads them) and each channel area-downscaled to S x S (``cv2.INTER_AREA``: the mean of the
pixels each output pixel covers; a non-square field is squeezed to the square, the whole field kept).
Images are hashed by content through the manifest the cell cache keeps (``weakcell.data.manifest``), so a
rerun stats the files and reads none; a split is rebuilt when an image's content, the set of images or
the size changes. A split is written whole (the array through a temporary file, then the index, then
the lineage): a killed build leaves the previous split or none, never a partial one, and starts over.
Every labelled image must have its four channel files: one missing is an error naming it.
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from tqdm import tqdm

from weakcell.config import Config
from weakcell.config.lineage import reads
from weakcell.constants import CHANNELS
from weakcell.data.datasets import get_dataset
from weakcell.data.images import ImageReadError, read_image
from weakcell.data.manifest import FileHasher, image_files, memo_path
from weakcell.distributed import is_main_process
from weakcell.errors import StageError
from weakcell.lineage import Lineage, digest, read_lineage, write_lineage
from weakcell.outputs import atomic_parquet, atomic_write, folder_lock
from weakcell.parallel import n_workers, pool_context

IMAGES_FILE = "images.npy"
INDEX_FILE = "index.parquet"
POLL_S = 1.0  # seconds between two looks for the split rank 0 builds (torchrun)


def downscale(image: np.ndarray, size: int) -> np.ndarray:
    """``(4, H, W)`` uint8 -> ``(4, size, size)`` uint8 by area interpolation, channel by channel."""
    if image.shape[1:] == (size, size):
        return image.copy()
    return np.stack([cv2.resize(plane, (size, size), interpolation=cv2.INTER_AREA) for plane in image])


def read_downscaled(folder: str, size: int, image_id: str) -> tuple[np.ndarray, tuple[int, int]]:
    """One image read as the cell cache reads it and downscaled; with its (width, height)."""
    image = read_image(folder, image_id)
    return downscale(image, size), (image.shape[2], image.shape[1])


class ImageCache:
    """A finished split of the image cache: ``index`` (``image_id, row, width, height, content_hash``) and
    ``crops(rows)``, the ``(B, 4, S, S)`` uint8 images of index rows, read from a memmap (the interface
    ``weakcell.cache.loader.CellCrops`` reads, so the engine's batch path serves whole images too)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        for name in (IMAGES_FILE, INDEX_FILE):
            if not (self.folder / name).is_file():
                raise FileNotFoundError(f"no finished image cache in {self.folder} (missing {name})")
        self.index = pd.read_parquet(self.folder / INDEX_FILE)
        self._images: np.ndarray | None = None

    def __getstate__(self) -> dict[str, object]:
        return {**self.__dict__, "_images": None}  # DataLoader workers open their own memmap

    @property
    def images(self) -> np.ndarray:
        if self._images is None:
            self._images = np.load(self.folder / IMAGES_FILE, mmap_mode="r")
        return self._images

    def __len__(self) -> int:
        return len(self.index)

    def crops(self, rows: np.ndarray | list[int]) -> np.ndarray:
        """``(B, 4, S, S)`` uint8 images of index rows ``rows``, in the order asked (a new array)."""
        rows = np.asarray(rows, dtype=np.int64)
        order = np.argsort(rows, kind="stable")  # a memmap reads sorted rows in one forward pass
        out = np.empty((len(rows), *self.images.shape[1:]), dtype=np.uint8)
        out[order] = self.images[rows[order]]
        return out

    def rows(self, image_ids: list[str]) -> np.ndarray:
        """Index rows of ``image_ids``, in their order; an ID the split lacks is an error."""
        position = pd.Index(self.index["image_id"]).get_indexer(image_ids)
        if (position < 0).any():
            missing = [i for i, p in zip(image_ids, position) if p < 0]
            raise StageError(
                f"{len(missing)} image(s) are not in the image cache {self.folder}, e.g. {missing[0]}; "
                "rebuild it (make image-model FORCE=1)"
            )
        return self.index["row"].to_numpy()[position]


def split_ids(cfg: Config, split: str) -> tuple[Path, list[str]]:
    """The data folder of ``split`` and its image IDs as the cell cache lists them (train: the label file's
    IDs; test: the sample submission's, else the folder's files)."""
    from weakcell.cache.build import list_split_images, split_folder  # the cell cache's own listing

    spec = get_dataset(cfg.data.dataset)
    folder = split_folder(cfg.data_dir, spec, split)
    ids = list_split_images(cfg.data_dir, spec, split)
    if ids is None:
        raise FileNotFoundError(f"no {split} folder at {folder}: the whole-image model reads its images")
    return folder, ids


def check_files(folder: Path, image_ids: list[str]) -> None:
    """Every image has its four channel files, or one line names the first missing file."""
    lacking = [(i, files) for i in image_ids if None in (files := image_files(folder, i))]
    if not lacking:
        return
    image_id, files = lacking[0]
    channel = CHANNELS[files.index(None)]
    raise ImageReadError(
        f"missing channel file {folder / f'{image_id}_{channel}'}.png ({len(lacking)} of {len(image_ids)} "
        "images lack files); the whole-image model reads every image of the split: restore the files, or "
        "drop the images from the label file"
    )


def build_split(cfg: Config, split: str) -> ImageCache:
    """The finished ``split`` of ``cfg.image_cache_dir``, built (or rebuilt) when its lineage differs from
    the images' content and the size; the cache folder's lock is held meanwhile."""
    folder, image_ids = split_ids(cfg, split)
    check_files(folder, image_ids)
    out_dir = cfg.image_cache_dir / split
    hasher = FileHasher(cfg.data_dir, memo_path(cfg.cache_dir, cfg.data_dir))
    hashes = hasher.image_hashes((image_id, folder) for image_id in image_ids)
    hasher.save()
    lineage = Lineage("image_cache", reads("image_cache", cfg), {"images": digest(sorted(hashes.items()))})
    if not is_main_process():  # torchrun: rank 0 builds the split, the others wait for its record
        while not _finished(out_dir, lineage):
            time.sleep(POLL_S)
        return ImageCache(out_dir)
    with folder_lock(cfg.image_cache_dir, "image-cache", cfg.checks.lock_wait_s):
        if _finished(out_dir, lineage) and not cfg.force:
            print(f"image cache: {out_dir} holds the {len(image_ids)} {split} images, reusing it")
            return ImageCache(out_dir)
        _write_split(cfg, folder, image_ids, hashes, out_dir)
        write_lineage(out_dir, lineage)  # last: a build cut short is redone, never reused
    return ImageCache(out_dir)


def _finished(out_dir: Path, lineage: Lineage) -> bool:
    """The split in ``out_dir`` is complete and was made from ``lineage``."""
    saved = read_lineage(out_dir)
    whole = all((out_dir / name).is_file() for name in (IMAGES_FILE, INDEX_FILE))
    return whole and saved is not None and saved.fingerprint == lineage.fingerprint


def _write_split(
    cfg: Config, folder: Path, image_ids: list[str], hashes: dict[str, str], out_dir: Path
) -> None:
    """Read, downscale and store every image of a split (``cache.workers`` processes), then its index."""
    size, start = cfg.image_model.size, time.perf_counter()
    sizes: list[tuple[int, int]] = []
    read = partial(read_downscaled, str(folder), size)

    def fill(tmp: Path) -> None:
        # a .npy written in place: 22k images at 512² are 23 GB, more than memory holds
        shape = (len(image_ids), len(CHANNELS), size, size)
        images = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
        workers = n_workers(cfg.cache.workers, len(image_ids))
        bar = tqdm(total=len(image_ids), desc=f"image cache {size}px", unit="img", leave=False)
        with bar:
            if workers == 1:
                results = map(read, image_ids)
                _store(results, images, sizes, bar)
            else:
                with pool_context().Pool(workers) as pool:
                    _store(pool.imap(read, image_ids, chunksize=4), images, sizes, bar)
        images.flush()
        del images

    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / IMAGES_FILE, fill)
    index = pd.DataFrame(
        {
            "image_id": image_ids,
            "row": np.arange(len(image_ids), dtype=np.int64),
            "width": [w for w, _ in sizes],
            "height": [h for _, h in sizes],
            "content_hash": [hashes[i] for i in image_ids],
        }
    )
    atomic_parquet(out_dir / INDEX_FILE, index)
    megabytes = len(image_ids) * 4 * size * size / 1e6
    print(
        f"image cache: {len(image_ids)} images at {size}x{size} px in {time.perf_counter() - start:.0f} s "
        f"-> {out_dir / IMAGES_FILE} ({megabytes:.0f} MB), {INDEX_FILE}"
    )


def _store(results, images: np.ndarray, sizes: list[tuple[int, int]], bar: tqdm) -> None:
    """Write each (image, size) result into its row, in order."""
    for row, (image, size) in enumerate(results):
        images[row] = image
        sizes.append(size)
        bar.update()
