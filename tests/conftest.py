"""Shared fixtures. Real reference data lives in ../shared/data (beside the repo); tests that need it
skip with a reason when it is absent (a user's fresh clone has no ../shared)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
HPA2021_IDS = {
    "000a6c98-bb9b-11e8-b2b9-ac1f6b6435d0": [0, 1, 2, 7],
    "5c27f04c-bb99-11e8-b2b9-ac1f6b6435d0": [0, 5, 8],
    "a34d8680-bb99-11e8-b2b9-ac1f6b6435d0": [18],
    "b6a469d8-bbad-11e8-b2ba-ac1f6b6435d0": [11],
    "f0ac7116-bb99-11e8-b2b9-ac1f6b6435d0": [15],
}


def shared_path(*parts: str) -> Path:
    """A path under ../shared/data, or a skip naming what is missing."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real reference data not found at {path} (../shared/data is absent in a plain clone)")
    return path


@pytest.fixture
def hpa2021_dir() -> Path:
    return shared_path("hpa2021")


# The whole pipeline in miniature: small images, few cells, a tiny backbone, one epoch.
TINY = [
    "synthetic.n_train=9",
    "synthetic.n_test=3",
    "synthetic.image_size=256",
    "synthetic.cell_scale=0.15",
    "synthetic.cells_per_image=[3,6]",
    "synthetic.workers=1",
    "folds.n_splits=3",
    "cache.crop_size=32",
    "cache.workers=1",
    "segment.classical.nucleus_diameter=27",
    "segment.classical.working_scale=0.5",
    "model.backbone=test_resnet",
    "train.epochs=1",
    "train.batch_size=16",
    "train.checkpoint_every=0",
    "mil.epochs=2",
    "mil.batch_size=4",
    "infer.tta=[0,1]",
    "refine.rounds=0",  # the refinement test adds its round explicitly
    "refine.epochs=1",
]
# A whole-image model of the tiny run (weakcell.image_model): one epoch of the test network at 64 px.
TINY_IMAGE_MODEL = [
    "image_model.enabled=true",
    "image_model.backbone=test_resnet",
    "image_model.size=64",
    "image_model.epochs=1",
    "image_model.batch_size=4",
]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """data -> folds -> cache -> train on a tiny synthetic set (about 20 s), shared by the test modules."""
    from weakcell import folds as folds_stage
    from weakcell import train as train_stage
    from weakcell.cache import build as cache_stage
    from weakcell.config import load_config
    from weakcell.synthetic import writer as data_stage

    root = tmp_path_factory.mktemp("pipeline")
    cfg = load_config(None, [f"paths.root={root}", *TINY])
    data_stage.run(cfg)
    folds_stage.run(cfg)
    cache_stage.run(cfg)
    metrics = train_stage.run(cfg)
    return cfg, metrics


# -- a tiny hpa2021 layout of separated rectangles (the cache tests) ---------------------------------------


def _blobs(rng: np.random.Generator, n: int, height: int = 40, width: int = 56) -> np.ndarray:
    """A (4, H, W) image with n separated rectangles of random intensities (blue only in their centre)."""
    image = np.zeros((4, height, width), np.uint8)
    for k in range(n):
        y, x = 2 + (k // 4) * 12, 2 + (k % 4) * 13
        h, w = rng.integers(4, 10), rng.integers(4, 11)
        image[:, y : y + h, x : x + w] = rng.integers(1, 256, (4, h, w))
        image[2, y : y + h, x : x + w] = 0
        image[2, y + 1 : y + h - 1, x + 1 : x + w - 1] = rng.integers(1, 256, (h - 2, w - 2))
    return image


TRAIN = {"img-a": 5, "img-b": 0, "img-c": 3, "img-d": 8, "img-e": 1}  # ID -> cells; img-b is all black
TEST = {"tst-a": 2, "tst-b": 4}


@pytest.fixture
def dataset(tmp_path):
    """hpa2021 layout: train/ + train.csv, test/ without a sample submission."""
    from weakcell.data.images import write_image

    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    for split, images in (("train", TRAIN), ("test", TEST)):
        for image_id, n in images.items():
            write_image(root / split, image_id, _blobs(rng, n))
    pd.DataFrame({"ID": list(TRAIN), "Label": ["0|1", "18", "5", "7", "11"]}).to_csv(
        root / "train.csv", index=False
    )
    return root
