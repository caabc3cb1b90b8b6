"""The scheduling of the batched cache (``weakcell.cache.batched._batched``) with fake workers and network: every
image comes out once, batches hold one shape and at most ``batch`` inputs, the queue never exceeds its
limit, and mixed shapes under a small limit do not stall."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from weakcell.cache import batched
from weakcell.cache.batched import Decoded, _Done
from weakcell.cache.build import CachedImage, ImageTask
from weakcell.config import load_config
from weakcell.segment.batched import NetworkInput


class FakeWorkers:
    """Prepare gives each task an input of the shape its id names; finish returns its images row."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.most_in_flight = 0

    def prepare(self, task: ImageTask) -> _Done:
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        if task.image_id.startswith("bad"):
            return _Done(CachedImage({"image_id": task.image_id}, pd.DataFrame(), np.zeros(0), []))
        side = int(task.image_id.split("-")[1])
        return _Done(
            Decoded(task, np.zeros((4, side, side), np.uint8), NetworkInput((np.zeros((3, side, side)),)))
        )

    def finish(self, decoded: Decoded, output: object, segmentation: object) -> _Done:
        return _Done(
            CachedImage({"image_id": decoded.task.image_id, "batch": output}, pd.DataFrame(), np.zeros(0), [])
        )


@pytest.mark.parametrize("limit", [3, 5, 40])
def test_every_image_once_batches_of_one_shape_within_the_limit(monkeypatch, limit: int) -> None:
    batches: list[list[str]] = []

    def fake_network(group: list[Decoded], cfg: object) -> list[tuple[Decoded, int, None]]:
        assert len({item.item.key for item in group}) == 1 and len(group) <= 4
        batches.append([item.task.image_id for item in group])
        return [(item, len(batches), None) for item in group]

    monkeypatch.setattr(batched, "run_network", fake_network)
    sides = [64, 96, 64, 128, 96, 64, 64, 128, 64, 96, 32, 64]
    tasks = [ImageTask(f"img-{side}-{index}", "train", "") for index, side in enumerate(sides)]
    tasks.insert(5, ImageTask("bad-0", "train", ""))
    workers = FakeWorkers()
    cfg = load_config(None, [])
    done = []
    for result in batched._batched(tasks, cfg, 4, limit, workers):
        workers.in_flight -= 1
        done.append(result.image["image_id"])
    assert sorted(done) == sorted(task.image_id for task in tasks)
    assert workers.most_in_flight <= limit
    assert sum(map(len, batches)) == len(sides)
    if limit == 40:  # room for everything: full batches as they fill, one partial batch per shape at the end
        assert sorted(map(len, batches)) == [1, 2, 2, 3, 4]
