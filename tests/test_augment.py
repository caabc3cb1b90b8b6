"""train.augment: batched steps and albumentations per-crop steps, built from the config list."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from weakcell.cache.augment import CropAugment, crop_augment
from weakcell.cache.loader import augment_batch_
from weakcell.config import ConfigError, load_config


def test_the_default_list_is_the_batched_path_of_before() -> None:
    cfg = load_config(None)
    assert crop_augment(cfg.train.augment) == CropAugment(symmetries=True, intensity=0.2, pipeline=None)
    assert crop_augment([]) == CropAugment(symmetries=False, intensity=0.0, pipeline=None)


def test_an_empty_list_changes_nothing() -> None:
    crops = np.random.default_rng(0).integers(0, 256, (3, 4, 8, 8), dtype=np.uint8)
    before = crops.copy()
    out = augment_batch_(crops, crop_augment([]))
    assert np.array_equal(out.numpy(), before)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"name": "Rotate90x"}, r"train.augment\[1\]: 'Rotate90x' is not an albumentations transform"),
        ({"name": "Compose"}, "is not an albumentations transform"),
        ({"name": "__class__"}, "is not an albumentations transform"),
        (
            {"name": "RandomGamma", "gamma_limits": [80, 120]},
            r"train.augment\[1\]: RandomGamma takes no gamma_limits",
        ),
        ({"name": "RandomGamma", "gamma_limit": "x"}, r"train.augment\[1\]: RandomGamma\(.*\) is invalid"),
        ({"limit": 0.2}, "each step needs a name"),
        ({"name": "gain", "limit": 1.5}, r"gain limit must be in \[0, 1\]"),
    ],
)
def test_a_bad_step_fails_naming_its_place(spec: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        crop_augment([{"name": "symmetries"}, spec])


def test_per_crop_steps_run_after_the_batched_ones_in_place() -> None:
    """InvertImg (255 - x) after no batched step: worked out by hand, the returned tensor is the same memory."""
    augment = crop_augment([{"name": "InvertImg", "p": 1.0}])
    assert (augment.symmetries, augment.intensity) == (False, 0.0)
    crops = np.arange(2 * 4 * 3 * 3, dtype=np.uint8).reshape(2, 4, 3, 3)
    expected = 255 - crops
    out = augment_batch_(crops, augment)
    assert np.array_equal(crops, expected) and out.data_ptr() == torch.from_numpy(crops).data_ptr()


def test_per_channel_draws_each_channel_on_its_own() -> None:
    crop = np.full((16, 16, 4), 128, dtype=np.uint8)
    together = crop_augment([{"name": "RandomGamma", "gamma_limit": [50, 200], "p": 1.0}]).pipeline
    apart = crop_augment(
        [{"name": "RandomGamma", "gamma_limit": [50, 200], "p": 1.0, "per_channel": True}]
    ).pipeline
    assert together is not None and apart is not None
    for _ in range(5):
        out = together(crop)
        assert all(np.array_equal(out[..., c], out[..., 0]) for c in range(4))  # one gamma for the crop
    levels = {tuple(int(apart(crop)[0, 0, c]) for c in range(4)) for _ in range(5)}
    assert any(len(set(level)) > 1 for level in levels)  # channels got different gammas


def test_geometric_steps_fill_with_the_background() -> None:
    pipeline = crop_augment([{"name": "Affine", "rotate": [45, 45], "p": 1.0}]).pipeline
    assert pipeline is not None
    out = pipeline(np.full((32, 32, 4), 255, dtype=np.uint8))
    assert (out[0, 0] == 0).all() and (out[-1, -1] == 0).all()  # corners rotated out: background 0
    assert (out[16, 16] == 255).all()


def test_each_worker_copy_reseeds_from_torch() -> None:
    """A DataLoader worker gets a pickled copy and its own torch seed: copies with different seeds differ,
    the same seed repeats (a run is reproducible)."""
    pipeline = crop_augment([{"name": "GaussNoise", "std_range": [0.1, 0.3], "p": 1.0}]).pipeline
    crop = np.full((16, 16, 4), 100, dtype=np.uint8)

    def in_worker(seed: int) -> np.ndarray:
        torch.manual_seed(seed)
        return pickle.loads(pickle.dumps(pipeline))(crop)

    assert not np.array_equal(in_worker(1), in_worker(2))
    assert np.array_equal(in_worker(1), in_worker(1))
