"""Shared fixtures. Real reference data lives in ../shared/data (beside the repo); tests that need it
skip with a reason when it is absent (a user's fresh clone has no ../shared)."""

from __future__ import annotations

from pathlib import Path

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
