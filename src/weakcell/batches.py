"""The engine's data order: epoch ``e`` visits the global batches of ``epoch_order(seed, e)``, a pure
function of (seed, epoch), cut into this process's micro-batches (``EpochBatches``); that makes mid-epoch
resume exact. ``batch_loader`` is the DataLoader over such explicit batches of positions; ``prefetched``
reads its next batch in a thread while the model computes."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from weakcell.config import TrainConfig
from weakcell.distributed import World
from weakcell.errors import StageError
from weakcell.runtime import Batch, Runtime, to_device

Collate = Callable[[Any], Batch]


def epoch_order(
    n_samples: int, batch_size: int, seed: int, epoch: int, weights: np.ndarray | None = None
) -> np.ndarray:
    """The global batches of one epoch: ``(steps, batch_size)`` positions, a pure function of
    (seed, epoch); the last incomplete batch is dropped. With ``weights`` (one per sample) positions are
    drawn with replacement in proportion to them (oversampling rare classes), still a pure function."""
    steps = n_samples // batch_size
    rng = np.random.default_rng((seed, epoch))
    if weights is None:
        drawn = rng.permutation(n_samples)[: steps * batch_size]
    else:
        drawn = rng.choice(n_samples, size=steps * batch_size, replace=True, p=weights / weights.sum())
    return drawn.reshape(steps, batch_size)


class EpochBatches(Sampler[list[int]]):
    """Batch sampler of this process's micro-batches, from step ``start_step`` of epoch ``epoch``.

    Each global batch of ``epoch_order`` is cut into ``grad_accum`` micro-batches, and each micro-batch
    into ``world.size`` equal shards; rank r takes shard r. So the samples of one optimizer step are the
    same whatever the number of processes or accumulation steps (DistributedSampler shards an epoch instead,
    which changes the batches with the world size).
    """

    def __init__(
        self,
        n_samples: int,
        batch_size: int,
        grad_accum: int,
        world: World,
        seed: int,
        weights: np.ndarray | None = None,
    ) -> None:
        if batch_size % (grad_accum * world.size):
            raise StageError(
                f"train.batch_size={batch_size} must be a multiple of train.grad_accum x processes "
                f"= {grad_accum} x {world.size}"
            )
        self.n_samples, self.batch_size, self.grad_accum = n_samples, batch_size, grad_accum
        self.world, self.seed, self.weights = world, seed, weights
        self.epoch, self.start_step = 0, 0

    @property
    def steps(self) -> int:
        """Optimizer steps per epoch."""
        return self.n_samples // self.batch_size

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Iterate epoch ``epoch`` from optimizer step ``start_step`` (a resume skips the steps done)."""
        self.epoch, self.start_step = epoch, start_step

    def __len__(self) -> int:
        return (self.steps - self.start_step) * self.grad_accum

    def __iter__(self) -> Iterator[list[int]]:
        order = epoch_order(self.n_samples, self.batch_size, self.seed, self.epoch, self.weights)
        micro = self.batch_size // (self.grad_accum * self.world.size)
        for batch in order[self.start_step :]:
            # (grad_accum, world, micro): micro-batch j of rank r is shards[j, r]
            shards = batch.reshape(self.grad_accum, self.world.size, micro)
            for positions in shards[:, self.world.rank]:
                yield positions.tolist()


def batch_loader(
    data: Dataset,
    batches: Sampler[list[int]] | list[list[int]],
    collate: Collate | None,
    cfg: TrainConfig,
    runtime: Runtime,
    seed: int,
) -> DataLoader:
    """A DataLoader over explicit batches of positions; ``__getitems__`` datasets are already collated."""
    if collate is None:
        collate = _keep if hasattr(data, "__getitems__") else default_collate
    return DataLoader(
        data,
        batch_sampler=batches,
        collate_fn=collate,
        num_workers=cfg.workers,
        pin_memory=runtime.device.type == "cuda",
        persistent_workers=cfg.workers > 0,
        # The workers' base seed comes from this generator, not from the global RNG, so starting an
        # epoch consumes no global randomness (needed for exact resume).
        generator=torch.Generator().manual_seed(seed),
    )


def prefetched(loader: DataLoader, runtime: Runtime) -> Iterator[Batch]:
    """The batches of ``loader``, each read (and on the CPU moved to ``channels_last``) one step ahead in
    a background thread: reading, augmenting and copying batch k+1 overlaps the model's work on batch k.
    Numpy and torch release the GIL in their bulk work, so on 2 cores the loader fills the gaps the model's
    threads leave (Python, the optimizer step) instead of adding its time to every step.

    Only for datasets that draw no randomness from the global RNGs (``thread_safe``: ``CellCrops`` seeds
    each batch's augmentations from the batch itself), so two threads never interleave their draws and a
    resumed run still sees the batches it would have seen."""
    from concurrent.futures import ThreadPoolExecutor

    batches = iter(loader)
    on_cpu = runtime.device.type == "cpu"  # a CUDA copy stays on the main thread's stream

    def read() -> Batch | None:
        batch = next(batches, None)
        return to_device(batch, runtime) if batch is not None and on_cpu else batch

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="weakcell-prefetch") as pool:
        pending = pool.submit(read)
        while (batch := pending.result()) is not None:
            pending = pool.submit(read)
            yield batch


def overlaps(data: Dataset, cfg: TrainConfig) -> bool:
    """Whether ``fit`` reads ``data``'s batches in a background thread (``prefetched``): asked for
    (``train.prefetch``), no worker processes, and a dataset that declares itself ``thread_safe``."""
    return cfg.prefetch and cfg.workers == 0 and getattr(data, "thread_safe", False)


def _keep(batch: Any) -> Any:
    return batch


def dataset_size(data: Dataset) -> int:
    """Samples in a map-style dataset."""
    return len(data)  # type: ignore[arg-type]  # torch's Dataset type omits the __len__ every map-style one has
