"""What stage 1 (the cell model) learns from: cell crops with their targets, read a batch at a time, and
the two answers to class imbalance it may use (BCE ``pos_weight`` per class, a sampler drawing rare
classes' cells more often)."""

from __future__ import annotations

import numpy as np
import torch

from weakcell.cache.augment import CropAugment
from weakcell.cache.loader import CellCrops, CropSource


class LabelledCrops(CellCrops):
    """Cell crops (or whole images, ``weakcell.image_cache``) with their targets, read a batch at a time. ``sample_weights``
    (one per position), when set, makes the engine draw cells in proportion to them."""

    def __init__(
        self,
        cache: CropSource,
        indices: np.ndarray,
        targets: np.ndarray,
        augment: CropAugment | None,
        sample_weights: np.ndarray | None = None,
    ):
        super().__init__(cache, indices, augment)
        self.targets = targets  # (len(cache.cells), C): looked up by the rows a batch ends up holding
        self.sample_weights = sample_weights

    def __getitems__(self, positions):
        batch = super().__getitems__(positions)
        batch["targets"] = torch.from_numpy(self.targets[batch["index"].numpy()])
        return batch


def class_pos_weight(targets: np.ndarray, limit: float = 50.0) -> np.ndarray:
    """(C,) BCE ``pos_weight`` = sqrt(negatives / positives) per class, clipped to [1, limit]. A NaN target
    (a pair left out of the loss, ``refine.uncertain=ignore``) counts as neither."""
    known = ~np.isnan(targets)
    positives = np.where(known, targets, 0).sum(0)
    ratio = (known.sum(0) - positives) / np.maximum(positives, 1)
    return np.clip(np.sqrt(ratio), 1.0, limit).astype(np.float32)


def balanced_sample_weights(targets: np.ndarray) -> np.ndarray:
    """(N,) weight of each cell = sqrt(1 / frequency) of its rarest positive class (1 for no positive); a
    class's frequency is over the cells whose target for it is known (not NaN)."""
    known = ~np.isnan(targets)
    positives = np.where(known, targets, 0)
    frequency = positives.sum(0) / np.maximum(known.sum(0), 1)
    frequency = np.maximum(frequency, 1.0 / max(len(targets), 1))  # (C,)
    per_class = np.sqrt(1.0 / frequency)[None, :] * (positives > 0)  # (N, C)
    return np.where(per_class.max(1) > 0, per_class.max(1), 1.0)
