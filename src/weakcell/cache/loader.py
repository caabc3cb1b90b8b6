"""The training input path: whole batches of cell crops read from the cache's memmaps, augmented as one
array, never one crop at a time.

``CellCrops`` is a map-style torch ``Dataset`` with ``__getitems__``, so a ``DataLoader`` hands it the
whole list of a batch's positions (any sampler works: shuffling, ``DistributedSampler``, ``BagSampler``)
and it answers with one collated batch::

    loader = make_loader(CellCrops(CellCache(cfg.cache_dir), augment=CropAugment()), batch_size=256)
    for batch in loader:
        crops = batch["crops"]  # (B, 4, S, S) uint8, R, G, B, Y; scale to float on the device (4x less to copy)
        index = batch["index"]  # (B,) int64 rows of cache.cells: image_id, cell_id, labels by lookup

Per 256 crops at 64 px on one core: the 8 square symmetries cost ~1 ms in numpy against 8-9 ms with
torch's CPU uint8 transpose + index_copy, so geometry runs in numpy; the per-channel gain runs in torch
int16 (~1 ms against ~3 ms in numpy uint16). Work arrays are reused (``Scratch``); the batch returned is
the buffer the crops were read into, augmented in place. Numbers: benchmarks/cache.md.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from weakcell.cache.augment import CropAugment


class CropSource(Protocol):
    """What ``CellCrops`` reads: ``crops(rows)`` -> ``(B, 4, S, S)`` uint8 in the order asked, and a length.
    A ``CellCache`` (cell crops) or a ``weakcell.image_cache.ImageCache`` (downscaled whole images)."""

    def __len__(self) -> int: ...

    def crops(self, indices: np.ndarray | list[int]) -> np.ndarray: ...


# Gains are applied in 6-bit fixed point (steps of 1/64): uint8 * round(gain * 64) stays inside int16
# for gains up to 2 (255 * 128 = 32640 < 32767).
GAIN_BITS = 6


class Scratch:
    """Reusable work arrays, never handed out. A fresh 4-16 MB array per batch costs more in page faults
    than the work done in it (glibc returns large blocks to the OS on free), so intermediate results of
    every batch live here; only the returned batch is new memory."""

    def __init__(self) -> None:
        self._arrays: dict[str, np.ndarray] = {}

    def __getstate__(self) -> dict[str, object]:
        return {"_arrays": {}}  # DataLoader workers start with their own

    def get(self, name: str, shape: tuple[int, ...], dtype: type) -> np.ndarray:
        """A work array of ``shape``, reused (and grown when needed) across calls with the same ``name``."""
        size = int(np.prod(shape))
        array = self._arrays.get(name)
        if array is None or array.size < size:
            array = self._arrays[name] = np.empty(size, dtype=dtype)
        return array[:size].reshape(shape)


def apply_symmetries(crops: np.ndarray, codes: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Apply one of the 8 symmetries of the square to each crop; returns ``out`` (new if None).

    crops: (B, C, S, S); codes: (B,) ints in 0..7, bit 0 = flip left-right, bit 1 = flip up-down,
    bit 2 = transpose (in that order; flips + transpose give every rotation). One vectorised copy per
    code whatever B is; when ``codes`` is sorted (see ``CellCrops``) each group is a slice and every crop
    is copied once, otherwise it is gathered and scattered (twice).
    """
    out = np.empty_like(crops) if out is None else out
    grouped = bool(np.all(codes[1:] >= codes[:-1]))
    starts = np.searchsorted(codes, np.arange(9)) if grouped else None
    for code in range(8):
        if starts is not None:
            members: slice | np.ndarray = slice(starts[code], starts[code + 1])
        else:
            members = np.flatnonzero(codes == code)
        group = crops[members]
        if not len(group):
            continue
        if code & 1:
            group = group[..., ::-1]
        if code & 2:
            group = group[..., ::-1, :]
        if code & 4:
            group = group.swapaxes(-1, -2)
        out[members] = group
    return out


def scale_channels(
    crops: torch.Tensor,
    gains: torch.Tensor,
    out: torch.Tensor | None = None,
    work: torch.Tensor | None = None,
) -> torch.Tensor:
    """Multiply each channel of each crop by its gain, saturating at 255; returns ``out`` (new if None).

    crops: (B, C, S, S) uint8; gains: (B, C) float in [0, 2]; work: optional int16 array of crops' shape.
    """
    fixed = (gains * (1 << GAIN_BITS)).round().to(torch.int16)[:, :, None, None]
    # uint8 * int16 promotes to int16 inside the multiply: no separate widening pass over the batch.
    scaled = torch.mul(crops, fixed, out=work).bitwise_right_shift_(GAIN_BITS).clamp_(max=255)
    return scaled.to(torch.uint8) if out is None else out.copy_(scaled)


def draw_symmetries(batch: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """(batch,) random symmetry codes from ``rng``, else from torch's RNG (seeded per DataLoader worker by
    torch, so workers never repeat each other)."""
    return rng.integers(0, 8, batch) if rng is not None else torch.randint(0, 8, (batch,)).numpy()


def batch_rng(positions: Sequence[int]) -> np.random.Generator:
    """The random draws of one batch, a pure function of its positions (which the engine draws from the
    run's seed and epoch): no global RNG is touched, so batches can be read in any thread or order (the
    engine's prefetch) and a resumed run draws what the uninterrupted one drew."""
    return np.random.default_rng(np.asarray(positions, dtype=np.uint64))


def augment_batch_(
    crops: np.ndarray,
    augment: CropAugment,
    codes: np.ndarray | None = None,
    scratch: Scratch | None = None,
    rng: np.random.Generator | None = None,
) -> torch.Tensor:
    """Randomly augment a ``(B, 4, S, S)`` uint8 batch IN PLACE (``crops`` must be the caller's own,
    writable array) and return it as a tensor: the batched steps, then ``augment.pipeline`` crop by crop.
    ``codes`` are the symmetries to apply (drawn when None); draws come from ``rng``, else torch's RNG."""
    scratch = scratch or Scratch()
    batch = torch.from_numpy(crops)
    moved = crops
    if augment.symmetries:
        codes = draw_symmetries(len(crops), rng) if codes is None else codes
        moved = apply_symmetries(crops, codes, out=scratch.get("moved", crops.shape, np.uint8))
    if augment.intensity > 0:
        low, high = 1 - augment.intensity, 1 + augment.intensity
        shape = crops.shape[:2]
        gains = (
            torch.from_numpy(rng.uniform(low, high, shape).astype(np.float32))
            if rng is not None
            else torch.empty(shape).uniform_(low, high)
        )
        work = torch.from_numpy(scratch.get("work", crops.shape, np.int16))
        scale_channels(torch.from_numpy(moved), gains, out=batch, work=work)
    elif moved is not crops:
        np.copyto(crops, moved)
    if augment.pipeline is not None:  # per crop, after the batched steps; crops is the batch's memory
        augment.pipeline.apply_batch_(crops)
    return batch


class CellCrops(Dataset):
    """Cell crops of a cache (all cells, or the rows ``indices`` of ``cache.cells``, e.g. one fold's).

    Positions index ``indices``; every batch carries ``index``, the rows of ``cache.cells`` it holds. A
    batch's augmentations are drawn from ``batch_rng(positions)``, never from a global RNG
    (``thread_safe``: the engine may read the next batch in another thread).
    """

    thread_safe = True

    def __init__(
        self,
        cache: CropSource,
        indices: Sequence[int] | np.ndarray | None = None,
        augment: CropAugment | None = None,
    ) -> None:
        self.cache = cache
        self.indices = np.arange(len(cache)) if indices is None else np.asarray(indices, dtype=np.int64)
        self.augment = augment
        self.scratch = Scratch()

    def __len__(self) -> int:
        return len(self.indices)

    def __getitems__(self, positions: Sequence[int]) -> dict[str, torch.Tensor]:
        """One batch: ``crops`` (B, 4, S, S) uint8 and ``index`` (B,) int64, read in one go. With random
        symmetries on, the batch comes back in another order than ``positions``: go by ``index``."""
        rows = self.indices[np.asarray(positions, dtype=np.int64)]
        if not self.augment:
            return {"crops": torch.from_numpy(self.cache.crops(rows)), "index": torch.from_numpy(rows)}
        codes = None
        rng = batch_rng(positions)
        if self.augment.symmetries:
            # Each cell draws its own symmetry; the batch is then ordered by symmetry (a batch is a set, and
            # ``index`` follows), so each symmetry is applied to one contiguous slice.
            codes = draw_symmetries(len(rows), rng)
            order = np.argsort(codes, kind="stable")
            rows, codes = rows[order], codes[order]
        tensor = augment_batch_(self.cache.crops(rows), self.augment, codes, self.scratch, rng)
        return {"crops": tensor, "index": torch.from_numpy(rows)}

    def __getitem__(self, position: int) -> dict[str, torch.Tensor]:
        batch = self.__getitems__([position])
        return {"crops": batch["crops"][0], "index": batch["index"][0]}


class BagSampler(Sampler[list[int]]):
    """Batches of whole images (MIL bags): every cell of ``images_per_batch`` images, images shuffled
    per epoch (``set_epoch``), for ``DataLoader(dataset, batch_sampler=BagSampler(...))``.

    image_ids: (N,) the image of each dataset position (``cache.cells.image_id[dataset.indices]``).
    """

    def __init__(
        self, image_ids: Sequence[str], images_per_batch: int, shuffle: bool = True, seed: int = 0
    ) -> None:
        _, codes = np.unique(np.asarray(image_ids), return_inverse=True)  # (N,) image number per position
        order = np.argsort(codes, kind="stable")
        bounds = np.flatnonzero(np.diff(codes[order])) + 1
        self.bags = np.split(order, bounds) if len(order) else []
        self.images_per_batch, self.shuffle, self.seed, self.epoch = images_per_batch, shuffle, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-len(self.bags) // self.images_per_batch)

    def __iter__(self) -> Iterator[list[int]]:
        order = np.arange(len(self.bags))
        if self.shuffle:
            np.random.default_rng((self.seed, self.epoch)).shuffle(order)
        for start in range(0, len(order), self.images_per_batch):
            chosen = order[start : start + self.images_per_batch]
            yield np.concatenate([self.bags[b] for b in chosen]).tolist()


def keep_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``collate_fn`` for ``CellCrops``: the dataset already returns a collated batch."""
    return batch


def make_loader(
    dataset: CellCrops,
    batch_size: int,
    shuffle: bool = True,
    drop_last: bool = False,
    workers: int = 0,
    seed: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """A DataLoader of random batches of ``dataset`` (one ``__getitems__`` call per batch)."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        drop_last=drop_last,
        num_workers=workers,
        # torch's stubs type collate_fn on a list of samples; __getitems__ hands it one collated batch
        collate_fn=keep_batch,  # type: ignore[arg-type]
        generator=torch.Generator().manual_seed(seed),
        pin_memory=pin_memory,
        persistent_workers=workers > 0,
    )
