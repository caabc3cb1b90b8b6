"""The cache of a learned backend on a GPU: one process runs the network, workers decode and finish.

``weakcell.cache.build.cache_images`` comes here when ``batched(cfg)``: workers decode each image, hash its
files and build its network input (``prepare_image``); this process, the only one that loads the model, runs
the network on batches of same-shape inputs (``run_network``, then the refiners, which hold models too);
workers label, post-process, cut crops and write masks (``finish_image``). At most ``cache.queue_images``
images are between the two at any time, so memory stays bounded. The per-image steps and their fault rules
(a fault of the image is a ``skipped`` row, one of the machine stops the stage) are ``weakcell.cache.build``'s.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from weakcell.cache.build import (
    WORKER,
    CachedImage,
    Hashed,
    ImageTask,
    cut_cells,
    init_worker,
    read_hashed,
    skipped,
    store,
)
from weakcell.config import Config
from weakcell.parallel import pool_context
from weakcell.segment import Segmentation, for_image, refiners_of
from weakcell.segment.batched import NetworkInput, NetworkStage, network_stage, runs_on_gpu
from weakcell.segment.postprocess import postprocess


def batched(cfg: Config) -> bool:
    """Whether the cache runs the backend's network in this process on batches (``cache.batched``): always
    on a GPU with ``auto``, where one model serves every worker; on a CPU each worker running the whole
    backend was measured faster (``benchmarks/segmentation.md``, section 7), at one model per worker."""
    stage = network_stage(cfg.segment)
    if stage is None or cfg.cache.batched == "never":
        return False
    return cfg.cache.batched == "always" or runs_on_gpu(stage, cfg.segment)


def _stage(cfg: Config) -> NetworkStage:
    stage = network_stage(cfg.segment)
    if stage is None:
        raise ValueError(f"segment.backend={cfg.segment.backend!r} has no network to batch")
    return stage


@dataclass
class Decoded:
    """A worker's image ready for the network: the task, the decoded ``(4, H, W)`` image, its input and
    the content hash of its files."""

    task: ImageTask
    image: np.ndarray
    item: NetworkInput
    hashed: Hashed = field(default_factory=lambda: ("", []))


def prepare_image(task: ImageTask, cfg: Config) -> Decoded | CachedImage:
    """Decode one image and build its network input; a ``skipped`` row when the image is at fault."""
    hashed: Hashed = ("", [])
    try:
        image, hashed = read_hashed(task, cfg)
        item = _stage(cfg).prepare(image, for_image(cfg.segment, image.shape[1:]))
        return Decoded(task, image, item, hashed)
    except MemoryError:
        raise
    except Exception as err:
        return skipped(task, cfg, err, hashed)


def finish_image(
    decoded: Decoded, output: Any, segmentation: Segmentation | None, cfg: Config, cache_dir: Path
) -> CachedImage:
    """The rest of one image after its network pass: labels (unless ``segmentation`` came refined from the
    model process), the post-processing rules, crops and masks."""
    image_cfg = for_image(cfg.segment, decoded.image.shape[1:])
    try:
        if segmentation is None:
            segmentation = _stage(cfg).finish(decoded.image, decoded.item, output, image_cfg)
        segmentation = postprocess(segmentation, image_cfg.postprocess)
        crops, cells = cut_cells(decoded.image, segmentation, cfg)
    except MemoryError:
        raise
    except Exception as err:
        return skipped(decoded.task, cfg, err, decoded.hashed)
    return store(decoded.task, decoded.image, segmentation, crops, cells, cache_dir, decoded.hashed)


def run_network(
    decoded: list[Decoded], cfg: Config
) -> list[tuple[Decoded, Any, Segmentation | None] | CachedImage]:
    """The network over one batch of same-shape inputs, in this process, then the refiners (they hold
    models too). A batch that fails is retried image by image, so that one faulty image is skipped alone."""
    stage = _stage(cfg)
    image_cfg = for_image(cfg.segment, decoded[0].image.shape[1:])
    try:
        outputs = stage.predict([item.item for item in decoded], image_cfg)
    except MemoryError:
        raise
    except Exception as err:
        if len(decoded) == 1:
            return [skipped(decoded[0].task, cfg, err, decoded[0].hashed)]
        return [result for item in decoded for result in run_network([item], cfg)]
    refiners = refiners_of(image_cfg)
    results: list[tuple[Decoded, Any, Segmentation | None] | CachedImage] = []
    for item, output in zip(decoded, outputs):
        if not refiners:
            results.append((item, output, None))
            continue
        try:
            segmentation = stage.finish(item.image, item.item, output, image_cfg)
            for refine in refiners:
                segmentation = refine(item.image, segmentation, image_cfg)
            results.append((item, None, segmentation))
        except MemoryError:
            raise
        except Exception as err:
            results.append(skipped(item.task, cfg, err, item.hashed))
    return results


class _Done:
    """A result already at hand, with the interface of ``multiprocessing``'s ``AsyncResult``."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def ready(self) -> bool:
        return True

    def get(self) -> Any:
        return self.value


def cache_images_batched(
    tasks: list[ImageTask], cfg: Config, cache_dir: Path, workers: int
) -> Iterator[CachedImage]:
    """Results of a backend with a network, in about the order of ``tasks``: workers decode and prepare
    images, this process runs the network on batches of same-shape inputs (the only process that loads the
    model), workers finish them. At most ``cache.queue_images`` images are between the two at any time, so
    memory stays bounded. With one worker, everything runs here, in the same order."""
    batch = _stage(cfg).batch_size(cfg.segment)
    limit = cfg.cache.queue_images or 2 * batch + workers
    if workers <= 1:
        yield from _batched(tasks, cfg, batch, limit, _InProcess(cfg, cache_dir))
        return
    with pool_context().Pool(workers, initializer=init_worker, initargs=(cfg, cache_dir)) as pool:
        yield from _batched(tasks, cfg, batch, limit, _InPool(pool))


class _InProcess:
    """Runs the worker steps here, at once."""

    def __init__(self, cfg: Config, cache_dir: Path) -> None:
        self.cfg, self.cache_dir = cfg, cache_dir

    def prepare(self, task: ImageTask) -> _Done:
        return _Done(prepare_image(task, self.cfg))

    def finish(self, decoded: Decoded, output: Any, segmentation: Segmentation | None) -> _Done:
        return _Done(finish_image(decoded, output, segmentation, self.cfg, self.cache_dir))


class _InPool:
    """Sends the worker steps to a process pool."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool

    def prepare(self, task: ImageTask) -> Any:
        return self.pool.apply_async(_prepare_in_worker, (task,))

    def finish(self, decoded: Decoded, output: Any, segmentation: Segmentation | None) -> Any:
        return self.pool.apply_async(_finish_in_worker, (decoded, output, segmentation))


def _prepare_in_worker(task: ImageTask) -> Decoded | CachedImage:
    return prepare_image(task, WORKER["cfg"])  # type: ignore[arg-type]


def _finish_in_worker(decoded: Decoded, output: Any, segmentation: Segmentation | None) -> CachedImage:
    return finish_image(decoded, output, segmentation, WORKER["cfg"], WORKER["cache_dir"])  # type: ignore[arg-type]


def _batched(
    tasks: list[ImageTask], cfg: Config, batch: int, limit: int, workers: Any
) -> Iterator[CachedImage]:
    """The scheduling of ``cache_images_batched``: keep up to ``limit`` images decoding, waiting for a batch
    or finishing; run a batch as soon as ``batch`` inputs of one shape are ready (all that is left once
    nothing more is coming); yield finished images as they complete, oldest first. At the limit with
    nothing decoding, room is made by waiting for the oldest finishing image, or else by running the
    largest partial batch (several shapes may each hold less than a batch)."""
    queue = iter(tasks)
    decoding: deque[Any] = deque()
    waiting: dict[Any, list[Decoded]] = {}
    finishing: deque[Any] = deque()
    more = True

    def run(key: Any, size: int) -> None:
        group, waiting[key] = waiting[key][:size], waiting[key][size:]
        if not waiting[key]:
            del waiting[key]
        for outcome in run_network(group, cfg):
            finishing.append(_Done(outcome) if isinstance(outcome, CachedImage) else workers.finish(*outcome))

    while True:
        while more and len(decoding) + sum(map(len, waiting.values())) + len(finishing) < limit:
            task = next(queue, None)
            if task is None:
                more = False
            else:
                decoding.append(workers.prepare(task))
        if decoding:
            result = decoding.popleft().get()  # the oldest; the others keep decoding meanwhile
            if isinstance(result, CachedImage):
                finishing.append(_Done(result))
            else:
                waiting.setdefault(result.item.key, []).append(result)
        last = not more and not decoding  # nothing else will arrive
        for key in [key for key, group in waiting.items() if len(group) >= batch or last]:
            while key in waiting and (len(waiting[key]) >= batch or last):
                run(key, batch)
        while finishing and (finishing[0].ready() or last):
            yield finishing.popleft().get()
        if last and not waiting and not finishing:
            return
        if more and not decoding:  # at the limit: make room
            if finishing:
                yield finishing.popleft().get()
            elif waiting:
                run(max(waiting, key=lambda key: len(waiting[key])), batch)
