"""``weakcell cache``: segment every image, keep its instance masks, cut one crop per cell into shards.

Per image (in a worker process): read the 4 channels, segment with ``cfg.segment``, write the masks as
8- or 16-bit PNGs, cut the crops (``cut_crops``). The parent streams the crops into a shard buffer and flushes
it every ``cache.shard_mb``; memory therefore stays bounded whatever the number of images. A learned
backend whose network runs on a GPU (``cache.batched``) goes through ``weakcell.cache.batched`` instead:
this process runs the network on batches, the workers run the same per-image steps around it.

Resumable and atomic. A flush writes, each through a temp file + rename and in this order:
``shards/partPPP-SSSSS.npy`` (crops), ``.cells.parquet`` (its cells), ``.images.parquet`` (its images,
the commit). A shard without its images index was cut short and is deleted on the next start; an image
counts as finished only once it is in a committed images index with status ``ok`` and the content hash
of its channel files there is the one they have now (``weakcell.data.manifest``), so a killed run is
resumed by running again and an image whose files now hold other pixels (a regenerated data set under
the same IDs) is cached again, its old rows dropped at the merge. Skipped images are retried on every run
(their files may have been fixed). The merged cache records its lineage (``lineage.json``: settings and
the images' content), which runs trained on it record in turn.

One run at a time: the stage holds the cache folder's lock (``weakcell.outputs.folder_lock``; each part of
a split run its own part, beside the others). A write that fails for a reason of the machine (permissions,
a full disk) stops the stage with an ``OutputError``; only faults of an image make it ``skipped``.

Split runs: ``cache.shard_index`` / ``cache.num_shards`` give each machine every num_shards-th image; each
part writes its own shards and, when done, ``parts/partPPP-of-NNN.json``. ``merge(cfg)`` joins the
committed indexes into ``cells.parquet`` / ``images.parquet`` / ``skipped.csv`` once every part is done;
with one part ``run`` merges at the end itself.

Over 400 lines on purpose: which images, one image in a worker, the shard writer and the two entry points
(``run``, ``merge``) share one commit protocol (the order of a flush's three files, what counts as finished,
what a restart deletes); kept in one file so that protocol reads in one place. The batched scheduler,
which only calls the per-image steps, is its own module.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from weakcell.cache.content import current_images, finished_images
from weakcell.cache.crops import cut_crops
from weakcell.cache.store import (
    CELLS_COLUMNS,
    CELLS_FILE,
    IMAGES_COLUMNS,
    IMAGES_FILE,
    MASKS_DIR,
    PARTS_DIR,
    SHARDS_DIR,
    SKIPPED_FILE,
    cache_lineage,
    mask_paths,
)
from weakcell.config import OUTPUT_INPUTS, Config, changed_settings, save_config
from weakcell.constants import CHANNELS
from weakcell.data.datasets import DatasetSpec, get_dataset
from weakcell.data.ids import check_ids, inside
from weakcell.data.images import EXTENSIONS, list_image_ids, read_image
from weakcell.data.labels import read_label_file
from weakcell.data.layout import channel_files, without_files
from weakcell.data.manifest import FileRecord, hash_image_files
from weakcell.errors import BackendError, StageError
from weakcell.lineage import RECORD as LINEAGE_FILE
from weakcell.lineage import write_lineage
from weakcell.outputs import (
    atomic_csv,
    atomic_parquet,
    atomic_write,
    atomic_write_bytes,
    atomic_write_json,
    clean_temporaries,
    folder_lock,
    writing,
)
from weakcell.parallel import n_workers, pool_context
from weakcell.segment import Segmentation, check_backend, segment_image
from weakcell.segment.batched import network_stage
from weakcell.sources import data_sources, fetch_step, require_layout, source_config

MASK_LIMIT = np.iinfo(np.uint16).max  # masks are stored as 8- or 16-bit PNG
MASK_PNG_PARAMS = [
    cv2.IMWRITE_PNG_COMPRESSION, 1,
    cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE,
    cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_NONE,
]  # fmt: skip

# Column types of the merged tables (shard indexes may hold object columns when a shard has no cells).
_CELL_TYPES = {
    "image_id": str,
    "cell_id": np.int32,
    "split": str,
    "x0": np.int32,
    "y0": np.int32,
    "x1": np.int32,
    "y1": np.int32,
    "area": np.int64,
    "nucleus_area": np.int64,
    "touches_border": bool,
    "shard": str,
    "row": np.int64,
}
_IMAGE_TYPES = {
    "image_id": str,
    "split": str,
    "width": np.int32,
    "height": np.int32,
    "n_cells": np.int32,
    "content_hash": str,
}


@dataclass
class ImageTask:
    """One image to cache: where its channel files are and which split it belongs to."""

    image_id: str
    split: str
    folder: str


@dataclass
class CachedImage:
    """What a worker hands back for one image: its images row, its cells rows and crops (n, 4, S, S), and
    the hashes of the channel files it read (remembered for the next run's comparison)."""

    image: dict[str, object]
    cells: pd.DataFrame
    crops: np.ndarray
    files: list[FileRecord]


# -- which images ---------------------------------------------------------------------------------------


def split_folder(data_dir: Path, spec: DatasetSpec, split: str) -> Path:
    """``train/`` or ``test/`` of the dataset layout."""
    folders = {"train": spec.train_dir, "test": spec.test_dir}
    if split not in folders:
        raise StageError(f"unknown split {split!r} in cache.splits; known: {', '.join(folders)}")
    return data_dir / folders[split]


def list_split_images(data_dir: Path, spec: DatasetSpec, split: str) -> list[str] | None:
    """IDs to cache for one split, or None when its folder is missing. Train: the label file's IDs, so an
    image without its files is reported, not forgotten. Test: the sample submission's IDs when it exists
    (the submission needs a row for each), else the files in the folder."""
    folder = split_folder(data_dir, spec, split)
    if not folder.is_dir():
        return None
    if split == "train":
        return read_label_file(data_dir / spec.label_file, spec)["ID"].tolist()
    sample = data_dir / spec.sample_submission
    if sample.is_file():
        ids = pd.read_csv(sample, dtype=str, usecols=[spec.id_column])[spec.id_column].tolist()
        check_ids(ids, str(sample))
        return ids
    ids = list_image_ids(folder)
    check_ids(ids, f"the image files of {folder}")
    return ids


def plan_images(cfg: Config) -> list[ImageTask]:
    """Every image of ``cache.splits`` in label-file / submission order; a missing split is announced."""
    spec = get_dataset(cfg.data.dataset)
    tasks: list[ImageTask] = []
    for split in cfg.cache.splits:
        ids = list_split_images(cfg.data_dir, spec, split)
        folder = split_folder(cfg.data_dir, spec, split)
        if ids is None:
            print(f"cache: no {split} folder at {folder}, skipping the {split} split")
            continue
        tasks.extend(ImageTask(image_id, split, str(folder)) for image_id in ids)
    splits_of: dict[str, list[str]] = {}
    for task in tasks:
        splits_of.setdefault(task.image_id, []).append(task.split)
    twice = [i for i, splits in splits_of.items() if len(splits) > 1]
    if twice:  # masks, cells and predictions are keyed by the ID alone: one of them would be lost
        raise StageError(
            f"{len(twice)} image ID(s) are in more than one split ({', '.join(splits_of[twice[0]])}), e.g. "
            f"{twice[0]}; an ID must name one image: give the test copy another ID (file names and "
            "sample_submission.csv) or remove it from the label file"
        )
    return tasks


def check_missing_files(cfg: Config, fetch: str = "make download") -> None:
    """Refuse to start when more than ``checks.max_missing_share`` of the labelled training images have
    no channel files (a partial download, or the full label file beside a few images): caching would mark
    each one skipped, one by one. Below the share, each stays a per-image skip, as a damaged file does.
    ``fetch``: the step that writes the missing files, named in the error."""
    if "train" not in cfg.cache.splits:
        return
    spec = get_dataset(cfg.data.dataset)
    ids = list_split_images(cfg.data_dir, spec, "train")
    if not ids:
        return
    folder = split_folder(cfg.data_dir, spec, "train")
    missing = without_files(ids, channel_files(folder))
    share = len(missing) / len(ids)
    if share > cfg.checks.max_missing_share:
        raise StageError(
            f"cache: {len(missing)} of the {len(ids)} labelled images in {cfg.data_dir / spec.label_file} have "
            f"no channel files in {folder} ({share:.1%} > checks.max_missing_share={cfg.checks.max_missing_share:g}), "
            f"e.g. {missing[0]}; download them ({fetch}), keep only the present rows in the label file, "
            "or raise checks.max_missing_share"
        )


def part_of(tasks: list[ImageTask], shard_index: int, num_shards: int) -> list[ImageTask]:
    """This part's images: every ``num_shards``-th, so parts get a similar mix of splits and sizes."""
    return tasks[shard_index::num_shards]


# -- one image ------------------------------------------------------------------------------------------


def _image_size(folder: str, image_id: str) -> tuple[int, int]:
    """(width, height) from the first channel file whose header reads, (0, 0) if none does; lets a skipped
    image keep its size for the submission without decoding it."""
    for channel in CHANNELS:
        for ext in EXTENSIONS:
            path = inside(folder, f"{image_id}_{channel}{ext}")
            try:
                with Image.open(path) as header:
                    return header.size
            except (OSError, ValueError):
                continue
    return 0, 0


def mask_dtype(cells: np.ndarray) -> type[np.unsignedinteger]:
    """uint8 when the mask holds under 256 cells, else uint16; more than a uint16 holds is an error."""
    n_cells = int(cells.max(initial=0))
    if n_cells > MASK_LIMIT:
        raise ValueError(f"{n_cells} cells exceed the {MASK_LIMIT} a uint16 mask can hold")
    return np.uint8 if n_cells <= np.iinfo(np.uint8).max else np.uint16


def write_masks(cache_dir: Path, image_id: str, cells: np.ndarray, nuclei: np.ndarray) -> None:
    """Both instance masks as PNGs at full resolution (uint8 when under 256 cells, else uint16), atomically.

    Label maps are long constant runs: PNG without row filters and with zlib's RLE strategy encodes a
    2048² mask in ~6 ms instead of ~24 ms with the default filters, for ~35 kB.
    """
    dtype = mask_dtype(cells)
    for path, mask in zip(mask_paths(cache_dir, image_id), (cells, nuclei)):
        ok, encoded = cv2.imencode(".png", mask.astype(dtype), MASK_PNG_PARAMS)
        if not ok:
            raise ValueError(f"PNG encoding failed for {path}")
        atomic_write_bytes(path, encoded.tobytes())


def cache_image(task: ImageTask, cfg: Config, cache_dir: Path) -> CachedImage:
    """Read, segment, cut crops and store the masks of one image.

    A fault of the image (unreadable, mismatched channels, a segmenter error) becomes, with
    ``cache.on_error=skip``, a ``skipped`` row that names the reason; with ``raise`` it propagates. A fault
    of the machine (the masks cannot be written, memory runs out) or of the configuration (a backend that
    cannot start) is no fault of the image: it stops the stage (``OutputError``, ``MemoryError``,
    ``BackendError``) and the image is retried on the next run."""
    hashed: Hashed = ("", [])
    try:
        image, hashed = read_hashed(task, cfg)
        segmentation = segment_image(image, cfg.segment)
        crops, cells = cut_cells(image, segmentation, cfg)
    except MemoryError:
        raise
    except Exception as err:  # readers and segmenters raise many types; each is reported by ID
        return skipped(task, cfg, err, hashed)
    return store(task, image, segmentation, crops, cells, cache_dir, hashed)


# An image's content hash and its channel files' records (``weakcell.data.manifest``); ("", []) unread.
Hashed = tuple[str, list[FileRecord]]


def read_hashed(task: ImageTask, cfg: Config) -> tuple[np.ndarray, Hashed]:
    """One image's ``(4, H, W)`` channels and the content hash of their files."""
    image = read_image(task.folder, task.image_id)
    # right after decoding, the files are in the page cache: hashing them costs no second disk pass
    return image, hash_image_files(task.folder, task.image_id, cfg.data_dir)


def cut_cells(image: np.ndarray, segmentation: Segmentation, cfg: Config) -> tuple[np.ndarray, pd.DataFrame]:
    """The crops and cells rows of a segmented image (its masks checked to fit a PNG)."""
    mask_dtype(segmentation.cells)
    return cut_crops(image, segmentation.cells, segmentation.nuclei, cfg.cache.crop_size)


def store(
    task: ImageTask,
    image: np.ndarray,
    segmentation: Segmentation,
    crops: np.ndarray,
    cells: pd.DataFrame,
    cache_dir: Path,
    hashed: Hashed,
) -> CachedImage:
    """Write the masks of a segmented image; its images row, cells rows and crops."""
    content_hash, files = hashed
    write_masks(cache_dir, task.image_id, segmentation.cells, segmentation.nuclei)
    row = _image_row(task, image.shape[2], image.shape[1], len(cells), "ok", "", content_hash)
    cells.insert(0, "image_id", task.image_id)
    cells.insert(2, "split", task.split)
    return CachedImage(row, cells, crops, files)


def skipped(task: ImageTask, cfg: Config, err: Exception, hashed: Hashed) -> CachedImage:
    """The ``skipped`` row of an image that failed (``cache.on_error=skip``), or ``err`` raised again.
    ``hashed``: its files' content when they were read before the fault."""
    if cfg.cache.on_error == "raise" or isinstance(err, BackendError):  # the configuration's fault: stop
        raise err
    size = cfg.cache.crop_size
    content_hash, files = hashed
    width, height = _image_size(task.folder, task.image_id)
    reason = f"{type(err).__name__}: {err}"
    row = _image_row(task, width, height, 0, "skipped", reason, content_hash)
    return CachedImage(row, _empty_cells(), np.zeros((0, 4, size, size), np.uint8), files)


def _image_row(
    task: ImageTask, width: int, height: int, n_cells: int, status: str, reason: str, content_hash: str
) -> dict:
    values = (task.image_id, task.split, width, height, n_cells, status, reason, content_hash)
    return dict(zip(IMAGES_COLUMNS, values))


def _empty_cells() -> pd.DataFrame:
    """The cells rows of an image without cells, typed like those of ``cut_crops``."""
    return pd.DataFrame({column: pd.Series(dtype=_CELL_TYPES[column]) for column in CELLS_COLUMNS[:-2]})


# Worker processes get the config once (pool initializer) rather than with every task; the pools of
# weakcell.cache.batched too.
WORKER: dict[str, object] = {}


def init_worker(cfg: Config, cache_dir: Path) -> None:
    cv2.setNumThreads(1)  # one process per core already; cv2's own threads would oversubscribe
    if network_stage(cfg.segment) is not None:  # likewise torch's
        import torch

        torch.set_num_threads(1)
    WORKER.update(cfg=cfg, cache_dir=cache_dir)


def _cache_in_worker(task: ImageTask) -> CachedImage:
    return cache_image(task, WORKER["cfg"], WORKER["cache_dir"])  # type: ignore[arg-type]


def cache_images(tasks: list[ImageTask], cfg: Config, cache_dir: Path, workers: int) -> Iterator[CachedImage]:
    """Results in completion order, one image at a time; only the small task records are queued ahead, and
    the caller flushes crops into shards as they arrive. One worker runs in this process (no pickling,
    easy to debug and profile). A backend with a network on a GPU goes through
    ``weakcell.cache.batched``: one model, in this process, never one per worker. Weight files resolve
    against ``paths.root`` (``Config.rooted_weights``)."""
    # imported here: the batched scheduler is built from this module's per-image steps
    from weakcell.cache.batched import batched, cache_images_batched

    cfg = cfg.rooted_weights()
    if workers <= 1 and not batched(cfg):  # here, in order
        for task in tasks:
            yield cache_image(task, cfg, cache_dir)
        return
    # an image without its channel files fails at once: here, without a round trip to a worker each
    # (the full train.csv beside a few images marks thousands skipped in seconds, not minutes)
    listed = {folder: channel_files(folder) for folder in {task.folder for task in tasks}}
    absent = {t.image_id for t in tasks if len(listed[t.folder].get(t.image_id, {})) < len(CHANNELS)}
    for task in tasks:
        if task.image_id in absent:
            yield cache_image(task, cfg, cache_dir)
    present = [task for task in tasks if task.image_id not in absent]
    if batched(cfg):
        yield from cache_images_batched(present, cfg, cache_dir, workers)
        return
    with pool_context().Pool(workers, initializer=init_worker, initargs=(cfg, cache_dir)) as pool:
        yield from pool.imap_unordered(_cache_in_worker, present, chunksize=1)


# -- shards ---------------------------------------------------------------------------------------------


class ShardWriter:
    """Collects crops of whole images and flushes them as one committed shard every ``capacity`` cells."""

    def __init__(self, shards_dir: Path, part: int, first_sequence: int, capacity: int) -> None:
        self.shards_dir, self.part, self.sequence, self.capacity = shards_dir, part, first_sequence, capacity
        self.images: list[dict[str, object]] = []
        self.cells: list[pd.DataFrame] = []
        self.crops: list[np.ndarray] = []
        self.n_cells = 0

    def add(self, result: CachedImage) -> None:
        """Buffer one image; flush first if its crops would overflow the shard."""
        if self.n_cells and self.n_cells + len(result.crops) > self.capacity:
            self.flush()
        self.images.append(result.image)
        if len(result.crops):
            self.cells.append(result.cells)
            self.crops.append(result.crops)
            self.n_cells += len(result.crops)

    def flush(self) -> None:
        """Write crops, then cells index, then images index (the commit); nothing if the buffer is empty."""
        if not self.images:
            return
        stem = shard_stem(self.part, self.sequence)
        cells = pd.concat(self.cells, ignore_index=True) if self.cells else _empty_cells()
        cells["shard"] = f"{stem}.npy" if self.n_cells else ""
        cells["row"] = np.arange(len(cells), dtype=np.int64)
        if self.n_cells:
            _write_npy(self.crops, self.shards_dir / f"{stem}.npy")
        atomic_parquet(self.shards_dir / f"{stem}.cells.parquet", cells)
        atomic_parquet(
            self.shards_dir / f"{stem}.images.parquet",
            pd.DataFrame(self.images, columns=list(IMAGES_COLUMNS)),
        )
        self.sequence += 1
        self.images, self.cells, self.crops, self.n_cells = [], [], [], 0


def _write_npy(blocks: list[np.ndarray], path: Path) -> None:
    """Stream equally shaped ``(n_i, 4, S, S)`` blocks into one ``.npy`` without concatenating them
    (no second copy of the shard in memory)."""
    shape = (sum(len(b) for b in blocks), *blocks[0].shape[1:])

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as stream:
            np.lib.format.write_array_header_1_0(
                stream,
                {
                    "descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
                    "fortran_order": False,
                    "shape": shape,
                },
            )
            for block in blocks:
                stream.write(np.ascontiguousarray(block).data)

    atomic_write(path, write)


def shard_stem(part: int, sequence: int) -> str:
    return f"part{part:03d}-{sequence:05d}"


def _committed_stems(shards_dir: Path) -> list[str]:
    return sorted(p.name[: -len(".images.parquet")] for p in shards_dir.glob("part*.images.parquet"))


def clean_uncommitted(shards_dir: Path, part: int) -> int:
    """Delete this part's leftovers of a run that was cut short (temp files, shards without a commit);
    returns the next free shard sequence number."""
    committed = set(_committed_stems(shards_dir))
    prefix = f"part{part:03d}-"
    for path in shards_dir.glob(f"{prefix}*"):
        stem = path.name.split(".")[0]
        if path.name.endswith(".tmp") or stem not in committed:
            path.unlink()
    sequences = [int(stem[len(prefix) :]) for stem in committed if stem.startswith(prefix)]
    return max(sequences, default=-1) + 1


def _read_index(shards_dir: Path, stem: str, table: str) -> pd.DataFrame:
    """One committed shard index; a damaged one names itself and the fix instead of a parquet error."""
    path = shards_dir / f"{stem}.{table}.parquet"
    try:
        return pd.read_parquet(path)
    except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
        raise StageError(
            f"the cache index {path} is damaged ({type(err).__name__}); delete {shards_dir / stem}.* and rerun "
            "make cache (its images are cached again), or rebuild the cache with FORCE=1"
        ) from err


def read_committed(shards_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """All committed images and cells rows of every part, oldest shard first; column ``commit`` names the
    shard that committed each row, so cells are always taken from the commit of their image's row."""
    stems = _committed_stems(shards_dir)
    images = [_read_index(shards_dir, s, "images").assign(commit=s) for s in stems]
    cells = [_read_index(shards_dir, s, "cells").assign(commit=s) for s in stems]
    cells = [table for table in cells if len(table)]  # a shard of only cell-less images has no cells
    images_table = (
        pd.concat(images, ignore_index=True) if images else pd.DataFrame(columns=[*IMAGES_COLUMNS, "commit"])
    )
    cells_table = (
        pd.concat(cells, ignore_index=True) if cells else pd.DataFrame(columns=[*CELLS_COLUMNS, "commit"])
    )
    return images_table, cells_table


# -- stage entry points ---------------------------------------------------------------------------------


def _part_marker(cache_dir: Path, part: int, n_parts: int) -> Path:
    return cache_dir / PARTS_DIR / f"part{part:03d}-of-{n_parts:03d}.json"


def _remove_part(cache_dir: Path, part: int, n_parts: int) -> None:
    """``force``: forget this part's work; an unsplit run forgets every part's (older split runs included),
    other parts of a split run keep theirs."""
    prefix = "part" if n_parts == 1 else f"part{part:03d}-"
    for path in (*(cache_dir / SHARDS_DIR).glob(f"{prefix}*"), *(cache_dir / PARTS_DIR).glob(f"{prefix}*")):
        path.unlink()
    for name in (CELLS_FILE, IMAGES_FILE, SKIPPED_FILE, LINEAGE_FILE):
        (cache_dir / name).unlink(missing_ok=True)


def check_same_settings(cfg: Config, cache_dir: Path) -> None:
    """Refuse to add to a cache built with other segmentation / crop / data settings: its finished images
    would be silently kept. Names the keys that differ and the two ways out."""
    differ = changed_settings(cache_dir, cfg, OUTPUT_INPUTS["cache"])
    if differ:
        raise StageError(
            f"the cache in {cache_dir} was built with other settings ({', '.join(differ[:6])}); rebuild it "
            "with FORCE=1 (make cache FORCE=1) or write the new one elsewhere with cache.dir=..."
        )


def run(cfg: Config) -> Path:
    """Cache this part's images (``cache.shard_index`` of ``cache.num_shards``) of every source, each into
    its own cache (the competition's ``cache.splits``, then each of ``data.sources``' training split:
    ``weakcell.sources``); merge when it is the only part. Holds each cache folder's lock while it fills
    it (a part's own lock when split). Returns the competition's cache folder."""
    part, n_parts = cfg.cache.shard_index, cfg.cache.num_shards
    if part >= n_parts:
        raise StageError(f"cache.shard_index={part} must be below cache.num_shards={n_parts}")
    # configuration faults stop the stage before it starts (and before any folder is made), for every
    # source: a missing external folder or a partial one must not surface after the competition's hours
    check_backend(cfg.rooted_weights().segment)
    spec = get_dataset(cfg.data.dataset)
    sources = data_sources(cfg)
    for source in sources:
        require_layout(source, spec)
        check_missing_files(source_config(cfg, source), fetch=fetch_step(source))
    for source in sources:
        source_cfg = source_config(cfg, source)
        name = None if n_parts == 1 else _part_marker(source_cfg.cache_dir, part, n_parts).stem
        with folder_lock(source_cfg.cache_dir, "cache", cfg.checks.lock_wait_s, part=name):
            _cache_part(source_cfg, "" if source.is_competition else source.name)
    return cfg.cache_dir


def _cache_part(cfg: Config, source: str = "") -> Path:
    """Cache this part's images of one source's config (``source``: its name, '' for the competition's)."""
    started = time.perf_counter()
    part, n_parts = cfg.cache.shard_index, cfg.cache.num_shards
    cache_dir = cfg.cache_dir
    shards_dir = cache_dir / SHARDS_DIR
    if cfg.force:
        with writing(cache_dir):
            _remove_part(cache_dir, part, n_parts)
    else:
        check_same_settings(cfg, cache_dir)
    for folder in (shards_dir, cache_dir / PARTS_DIR, cache_dir / MASKS_DIR):
        with writing(folder):
            folder.mkdir(parents=True, exist_ok=True)
    if n_parts == 1:  # the folder is this run's alone: a temporary there is a killed run's
        clean_temporaries(cache_dir / MASKS_DIR)
    with writing(cache_dir / "config.yaml"):
        save_config(cfg, cache_dir)

    tasks = part_of(plan_images(cfg), part, n_parts)
    with writing(shards_dir):
        next_sequence = clean_uncommitted(shards_dir, part)
    done_images, _ = read_committed(shards_dir)
    # After ``force`` only this run's commits count, even where an earlier differently split run left some.
    if cfg.force:
        done_images = done_images.iloc[:0]
    folders = {t.image_id: t.folder for t in tasks}
    finished, changed, hasher = finished_images(cfg.data_dir, cache_dir, folders, done_images)
    todo = [t for t in tasks if t.image_id not in finished]

    size = cfg.cache.crop_size
    capacity = max(1, int(cfg.cache.shard_mb * 2**20) // (4 * size * size))
    writer = ShardWriter(shards_dir, part, next_sequence, capacity)
    workers = n_workers(cfg.cache.workers, len(todo))
    label = f"cache part {part + 1}/{n_parts}" if n_parts > 1 else "cache"
    label += f" ({source})" if source else ""
    try:
        with tqdm(total=len(todo), desc=label, unit="img", dynamic_ncols=True) as progress:
            for result in cache_images(todo, cfg, cache_dir, workers):
                writer.add(result)
                hasher.remember(result.files)
                progress.update()
        writer.flush()
    finally:  # what was hashed is kept even when the run is cut short
        with writing(hasher.memo_path or cache_dir):
            hasher.save()

    images, _ = read_committed(shards_dir)
    images = _latest(
        current_images(cfg.data_dir, cache_dir, images[images["image_id"].isin(folders)], folders)
    )
    n_cells = int(images["n_cells"].sum())
    n_skipped = int((images["status"] == "skipped").sum())
    seconds = time.perf_counter() - started
    summary = {
        "images": len(images),
        "cells": n_cells,
        "skipped": n_skipped,
        "new": len(todo),
        "seconds": seconds,
    }
    atomic_write_json(_part_marker(cache_dir, part, n_parts), summary, indent=None)
    if n_parts == 1:
        with folder_lock(cache_dir, "cache-merge", cfg.checks.lock_wait_s):
            _merge(cfg, quiet=True)
    per_image = n_cells / max(1, len(images) - n_skipped)
    where = cache_dir if n_parts == 1 else f"{shards_dir} (then `weakcell cache-merge`)"
    recached = f", {len(changed)} re-cached (content changed)" if changed else ""
    print(
        f"{label}: {len(images)} images ({len(todo)} processed now{recached}, {len(tasks) - len(todo)} cached "
        f"before), {n_cells} cells, {per_image:.1f} cells/image, "
        f"{n_skipped} skipped{f' (see {cache_dir / SKIPPED_FILE})' if n_skipped and n_parts == 1 else ''}, "
        f"{seconds:.1f} s -> {where}"
    )
    return cache_dir


def _latest(images: pd.DataFrame) -> pd.DataFrame:
    """One row per image: its ``ok`` row if it has one, else its latest skipped row."""
    rank = (images["status"] != "ok").astype(int)
    order = pd.DataFrame({"rank": rank, "age": -np.arange(len(images))}, index=images.index)
    latest = images.loc[order.sort_values(["rank", "age"]).index].drop_duplicates("image_id")
    return latest.sort_index()


def merge(cfg: Config, quiet: bool = False) -> Path:
    """Join every part's committed indexes into ``cells.parquet``, ``images.parquet`` and ``skipped.csv``,
    in the cache of every source (``weakcell.sources``). Refuses while a part of ``cache.num_shards`` has not
    finished. Rows are ordered by split (as in ``cache.splits``), then image ID, then cell ID, so any split
    of the work merges to the same tables. Returns the competition's cache folder."""
    for source in data_sources(cfg):
        source_cfg = source_config(cfg, source)
        with folder_lock(source_cfg.cache_dir, "cache-merge", cfg.checks.lock_wait_s):
            _merge(source_cfg, quiet)
    return cfg.cache_dir


def _merge(cfg: Config, quiet: bool) -> Path:
    cache_dir = cfg.cache_dir
    n_parts = cfg.cache.num_shards
    missing = [p for p in range(n_parts) if not _part_marker(cache_dir, p, n_parts).is_file()]
    if missing:
        raise StageError(
            f"cannot merge {cache_dir}: part(s) {', '.join(str(p) for p in missing)} of {n_parts} have not finished "
            f"(run `weakcell cache ... cache.num_shards={n_parts} cache.shard_index=<part>` for each)"
        )
    images, cells = read_committed(cache_dir / SHARDS_DIR)
    folders = {t.image_id: t.folder for t in plan_images(cfg)}
    images = _latest(current_images(cfg.data_dir, cache_dir, images, folders))
    split_rank = {split: i for i, split in enumerate(cfg.cache.splits)}
    images = images.assign(_split=images["split"].map(split_rank)).sort_values(["_split", "image_id"])
    ok = images.loc[images["status"] == "ok", ["image_id", "commit"]]
    images = images.drop(columns=["_split", "commit"]).reset_index(drop=True)
    cells = cells.merge(ok, on=["image_id", "commit"])
    cells = cells.assign(_split=cells["split"].map(split_rank)).sort_values(["_split", "image_id", "cell_id"])
    cells = cells.drop(columns="_split").reset_index(drop=True)[list(CELLS_COLUMNS)]
    images = images.astype(_IMAGE_TYPES)
    atomic_parquet(cache_dir / CELLS_FILE, cells.astype(_CELL_TYPES))
    atomic_parquet(cache_dir / IMAGES_FILE, images)
    skipped = images.loc[images["status"] == "skipped", ["image_id", "split", "reason"]]
    atomic_csv(cache_dir / SKIPPED_FILE, skipped)
    write_lineage(cache_dir, cache_lineage(images, cfg))
    if not quiet:
        print(f"cache-merge: {n_parts} parts -> {len(images)} images, {len(cells)} cells in {cache_dir}")
    return cache_dir


if __name__ == "__main__":
    from weakcell.cli import stage_main

    raise SystemExit(stage_main(run))
