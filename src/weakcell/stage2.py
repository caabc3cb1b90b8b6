"""Stage 2, attention MIL over each image's cells: one contract per ``mil.mode`` that training and
inference both use, so every mode that trains also infers.

A mode says how its network is built (``build``), how it starts before training (``start``) and what one
bag per image holds (``bags``: the cells' stage-1 embeddings, or their crops for the end-to-end model).
Training fits ``build``'s network on ``bags(..., training=True)`` and saves ``fold<k>/mil/model.pt``;
inference rebuilds the same network (``load_trained``) and predicts ``bags(..., training=False)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from weakcell.cache.augment import CropAugment, crop_augment
from weakcell.cache.loader import augment_batch_
from weakcell.cache.store import CellCache
from weakcell.config import Config
from weakcell.models import create_model
from weakcell.weights import load_state_dict


class EmbeddingBags(Dataset):
    """One MIL bag per image: its cells' frozen embeddings, padded to ``n_max`` cells with a mask."""

    def __init__(self, embeddings: np.ndarray, bags: list[np.ndarray], targets: np.ndarray, n_max: int):
        self.embeddings, self.bags, self.targets, self.n_max = embeddings, bags, targets, max(n_max, 1)

    def __len__(self) -> int:
        return len(self.bags)

    def __getitem__(self, position: int) -> dict[str, torch.Tensor]:
        rows = self.bags[position][: self.n_max]
        bag = np.zeros((self.n_max, self.embeddings.shape[1]), dtype=np.float32)  # (N, D)
        bag[: len(rows)] = self.embeddings[rows]
        mask = np.zeros(self.n_max, dtype=bool)
        mask[: len(rows)] = True
        return {
            "bags": torch.from_numpy(bag),
            "mask": torch.from_numpy(mask),
            "targets": torch.from_numpy(self.targets[position]),
            "bag": torch.tensor(position),
        }


class CropBags(Dataset):
    """One bag of cell crops per image for end-to-end MIL: ``k`` cells sampled per visit when training
    (``augment`` given), the first ``k`` in cell order otherwise; padded with a mask."""

    def __init__(
        self,
        cache: CellCache,
        bags: list[np.ndarray],
        targets: np.ndarray,
        k: int,
        augment: CropAugment | None,
    ):
        self.cache, self.bags, self.targets, self.k, self.augment = cache, bags, targets, max(k, 1), augment

    def __len__(self) -> int:
        return len(self.bags)

    def __getitem__(self, position: int) -> dict[str, torch.Tensor]:
        rows = self.bags[position]
        if self.augment is not None and len(rows) > self.k:
            # torch's RNG is seeded per process/worker and checkpointed by the engine: resume stays exact
            rows = np.sort(rows[torch.randperm(len(rows))[: self.k].numpy()])
        rows = rows[: self.k]
        size = self.cache.crop_size
        crops = torch.zeros((self.k, 4, size, size), dtype=torch.uint8)  # (K, 4, S, S)
        if len(rows):
            chosen = self.cache.crops(rows)
            crops[: len(rows)] = (
                augment_batch_(chosen, self.augment) if self.augment else torch.from_numpy(chosen)
            )
        mask = torch.zeros(self.k, dtype=torch.bool)
        mask[: len(rows)] = True
        return {
            "crops": crops,
            "mask": mask,
            "targets": torch.from_numpy(self.targets[position]),
            "bag": torch.tensor(position),
        }


@dataclass(frozen=True)
class BagRequest:
    """What ``Stage2.bags`` makes one bag per image from."""

    cfg: Config
    cache: CellCache
    embeddings: np.ndarray  # (len(cache.cells), D) stage-1 embeddings by cache row (frozen mode reads them)
    bags: list[np.ndarray]  # the cache rows of each image's cells
    targets: np.ndarray  # (n_images, C) image targets (zeros when predicting)
    n_max: int  # cells of the largest bag
    training: bool


@dataclass(frozen=True)
class Stage2:
    """How one ``mil.mode`` builds its network, starts it, and makes its bags (one per image)."""

    build: Callable[[Config, int, int], nn.Module]  # (cfg, n_classes, embedding size D) -> untrained network
    start: Callable[[nn.Module, Path], None]  # before training, from the fold folder's stage-1 model
    bags: Callable[[BagRequest], Dataset]


def _embedding_bags(request: BagRequest) -> Dataset:
    return EmbeddingBags(request.embeddings, request.bags, request.targets, request.n_max)


def _crop_bags(request: BagRequest) -> Dataset:
    # training samples mil.cells_per_bag augmented crops per visit; prediction reads every cell once
    if request.training:
        augment = crop_augment(request.cfg.train.augment)
        return CropBags(request.cache, request.bags, request.targets, request.cfg.mil.cells_per_bag, augment)
    return CropBags(request.cache, request.bags, request.targets, request.n_max, None)


def _from_stage1(model: nn.Module, fold_dir: Path) -> None:
    # the shared encoder.* weights of the fold's stage-1 model; the MIL head starts fresh
    model.load_state_dict(load_state_dict(fold_dir / "cell" / "model.pt"), strict=False)


# mil.mode -> its contract. frozen: the MIL head alone learns on fixed embeddings (seconds on CPU);
# end_to_end (the 2021 2nd place "dual head"): sampled crops through the backbone, which starts from stage 1.
STAGE2: dict[str, Stage2] = {
    "frozen": Stage2(
        build=lambda cfg, n_classes, dim: create_model("mil", cfg, n_classes, in_dim=dim),
        start=lambda model, fold_dir: None,
        bags=_embedding_bags,
    ),
    "end_to_end": Stage2(
        build=lambda cfg, n_classes, dim: create_model("dual", cfg, n_classes),
        start=_from_stage1,
        bags=_crop_bags,
    ),
}


def load_trained(cfg: Config, fold_dir: Path, n_classes: int, embedding_dim: int) -> tuple[nn.Module, Stage2]:
    """The trained stage-2 network of ``fold_dir`` (``mil/model.pt``) as ``mil.mode`` builds it, and the
    mode's contract (whose ``bags`` it predicts)."""
    stage2 = STAGE2[cfg.mil.mode]
    model = stage2.build(cfg, n_classes, embedding_dim)
    model.load_state_dict(load_state_dict(fold_dir / "mil" / "model.pt"))
    return model, stage2
