"""Test-time augmentation: a model's outputs on crops (cells, or whole images) averaged over symmetries
of the square (``infer.tta`` codes, ``weakcell.cache.loader.apply_symmetries``). Inference predicts every
fold's cells this way, and the whole-image model its held-out and test images."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from weakcell.cache.loader import CellCrops, CropSource, apply_symmetries
from weakcell.config import TrainConfig
from weakcell.engine import predict
from weakcell.metrics import sigmoid


class SymmetricCrops(CellCrops):
    """Crops of a source under one fixed symmetry of the square (a TTA view)."""

    def __init__(self, source: CropSource, indices: np.ndarray, code: int) -> None:
        super().__init__(source, indices, None)
        self.code = code

    def __getitems__(self, positions):
        batch = super().__getitems__(positions)
        crops = batch["crops"].numpy()
        codes = np.full(len(crops), self.code)
        batch["crops"] = torch.from_numpy(np.ascontiguousarray(apply_symmetries(crops, codes)))
        return batch


def predict_views(
    model: nn.Module, source: CropSource, rows: np.ndarray, codes: Sequence[int], cfg: TrainConfig
) -> tuple[np.ndarray, np.ndarray]:
    """The sigmoid of ``logits`` (N, C) and the ``embeddings`` (N, D) of the crops ``rows`` of ``source``,
    each averaged over the views ``codes``, in ``rows`` order."""
    probs: np.ndarray | float = 0.0  # sums over the views
    embeddings: np.ndarray | float = 0.0
    for code in codes:
        out = predict(model, SymmetricCrops(source, rows, code), cfg, batch_keys=("index",))
        order = pd.Index(out["index"]).get_indexer(rows)
        probs = probs + sigmoid(out["logits"][order])
        embeddings = embeddings + out["embeddings"][order]
    return np.asarray(probs) / len(codes), np.asarray(embeddings, dtype=np.float32) / len(codes)
