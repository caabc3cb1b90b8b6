"""The trainable models. Each ``forward(batch: dict) -> dict`` returns ``loss`` when the batch holds
``targets``, so the one training engine trains them all:

* ``CellClassifier``: stage 1, one cell crop at a time; cells inherit their image's labels.
* ``MilClassifier``: attention MIL on frozen stage-1 cell embeddings, one bag of cells per image.
* ``DualHeadModel``: end to end, a bag of cell crops per image through the backbone into attention MIL,
  trained on image BCE + lambda * cell BCE (the "dual head" of the 2021 runners-up).

``CellClassifier`` and ``DualHeadModel`` share ``CellEncoder`` under the same attribute name
(``encoder.*``), so a stage-1 checkpoint loads into the end-to-end model with ``strict=False``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from weakcell.config import MilConfig, ModelConfig
from weakcell.constants import CHANNELS
from weakcell.mil import AttentionMIL
from weakcell.models.backbone import create_backbone, feature_dim
from weakcell.models.losses import MultiLabelLoss, PosWeight


def in_float32(head: Callable[..., Any], features: torch.Tensor, *args: Any) -> Any:
    """``head(features, *args)`` in float32 with autocast off, whatever precision the backbone ran in.

    Heads are a sliver of the compute, and their outputs are what submissions rank: bf16 logits keep 8
    bits of mantissa, so under bf16 autocast 200k cells' logits collapse to about 2,000 distinct values,
    ties the model did not mean (the competition metric orders ties arbitrarily)."""
    with torch.autocast(features.device.type, enabled=False):
        return head(features.float(), *args)


class CropNormalizer(nn.Module):
    """uint8 (or 0-255 float) crops -> float normalised per channel: (x / 255 - mean) / std.

    The data path stays uint8 (4x less to copy to the device); mean and std are buffers, folded to the
    0-255 scale so that this is one subtraction and one division. Keeps channels_last strides.
    """

    offset: torch.Tensor  # buffers, registered in __init__
    scale: torch.Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("offset", 255.0 * torch.tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1))
        self.register_buffer("scale", 255.0 * torch.tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1))

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        """(B, C, S, S) any dtype -> (B, C, S, S) float32."""
        return (crops.float() - self.offset) / self.scale


class CellEncoder(nn.Module):
    """Cell crops (B, 4, S, S) uint8 -> embeddings (B, D): normalisation, timm backbone, optional linear
    projection to ``cfg.embedding_dim``. ``dim`` is D."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.normalize = CropNormalizer(cfg.channel_mean, cfg.channel_std)
        self.backbone = create_backbone(
            cfg.backbone,
            in_chans=len(CHANNELS),
            pretrained_file=cfg.pretrained_file,
            drop_rate=cfg.drop_rate,
            **cfg.backbone_kwargs,
        )
        features = feature_dim(self.backbone)
        self.projection = nn.Linear(features, cfg.embedding_dim) if cfg.embedding_dim else nn.Identity()
        self.dim = cfg.embedding_dim or features

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        """(B, 4, S, S) -> (B, D)."""
        return self.projection(self.backbone(self.normalize(crops)))


class CellClassifier(nn.Module):
    """Stage 1: a backbone and a per-cell linear head, trained on cells that inherit their image's labels.

    batch: ``crops`` (B, 4, S, S) uint8 or 0-255 float, optionally ``targets`` (B, C) float.
    returns: ``logits`` (B, C), ``embeddings`` (B, D) (the input of stage-2 MIL), and ``loss`` when
    ``targets`` are given. ``loss``/``focal_gamma``/``pos_weight`` configure ``MultiLabelLoss``.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        n_classes: int,
        loss: str = "bce",
        focal_gamma: float = 2.0,
        pos_weight: PosWeight = None,
    ) -> None:
        super().__init__()
        self.encoder = CellEncoder(cfg)
        self.head = nn.Linear(self.encoder.dim, n_classes)
        self.criterion = MultiLabelLoss(loss, focal_gamma, pos_weight)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """See the class docstring."""
        embeddings = self.encoder(batch["crops"])  # (B, D)
        out = {"logits": in_float32(self.head, embeddings), "embeddings": embeddings}
        if "targets" in batch:
            out["loss"] = self.criterion(out["logits"], batch["targets"])
        return out


def _mil_loss(
    out: dict[str, torch.Tensor],
    targets: torch.Tensor,
    mask: torch.Tensor,
    criterion: MultiLabelLoss,
    cell_loss_weight: float,
) -> torch.Tensor:
    """Image loss on (B, C) logits + lambda * cell loss on (B, N, C) instance logits, each real cell
    inheriting its image's (B, C) targets (padded cells left out)."""
    loss = criterion(out["logits"], targets)
    if cell_loss_weight:
        cell_targets = targets[:, None, :].expand_as(out["instance_logits"])  # (B, N, C)
        loss = loss + cell_loss_weight * criterion(out["instance_logits"], cell_targets, mask)
    return loss


class MilClassifier(nn.Module):
    """Stage 2: attention MIL on frozen cell embeddings, one bag per image.

    batch: ``bags`` (B, N, D) float, ``mask`` (B, N) bool (True = real cell; absent = all real),
    optionally ``targets`` (B, C) float image labels.
    returns: ``logits`` (B, C), ``attention`` (B, C, N), ``instance_logits`` (B, N, C), and ``loss`` =
    image loss + ``mil.cell_loss_weight`` * cell loss when ``targets`` are given.
    """

    def __init__(
        self,
        in_dim: int,
        n_classes: int,
        mil: MilConfig,
        loss: str = "bce",
        focal_gamma: float = 2.0,
        pos_weight: PosWeight = None,
    ) -> None:
        super().__init__()
        self.mil = AttentionMIL(in_dim, n_classes, hidden=mil.hidden, gated=mil.gated, dropout=mil.dropout)
        self.cell_loss_weight = mil.cell_loss_weight
        self.criterion = MultiLabelLoss(loss, focal_gamma, pos_weight)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """See the class docstring."""
        bags = batch["bags"]  # (B, N, D) bag of N cell embeddings
        mask = batch.get("mask")
        if mask is None:
            mask = torch.ones(bags.shape[:2], dtype=torch.bool, device=bags.device)
        out = in_float32(self.mil, bags, mask)
        if "targets" in batch:
            out["loss"] = _mil_loss(out, batch["targets"], mask, self.criterion, self.cell_loss_weight)
        return out


class DualHeadModel(nn.Module):
    """End to end: K sampled cell crops per image through the backbone into attention MIL.

    batch: ``crops`` (B, K, 4, S, S) uint8, ``mask`` (B, K) bool (True = real cell; absent = all real),
    optionally ``targets`` (B, C) float image labels.
    returns: ``logits`` (B, C) image logits, ``attention`` (B, C, K), ``instance_logits`` (B, K, C),
    ``embeddings`` (B, K, D) (0 on padding), and ``loss`` = image loss + ``mil.cell_loss_weight`` * cell
    loss when ``targets`` are given.

    Only the real crops go through the backbone: padding costs no compute and stays out of BatchNorm
    statistics.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        mil: MilConfig,
        n_classes: int,
        loss: str = "bce",
        focal_gamma: float = 2.0,
        pos_weight: PosWeight = None,
    ) -> None:
        super().__init__()
        self.encoder = CellEncoder(cfg)
        # the same head as stage 2 on frozen embeddings: attention MIL + image/cell loss
        self.head = MilClassifier(self.encoder.dim, n_classes, mil, loss, focal_gamma, pos_weight)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """See the class docstring."""
        crops = batch["crops"]  # (B, K, 4, S, S) K cell crops per image
        mask = batch.get("mask")
        if mask is None:
            mask = torch.ones(crops.shape[:2], dtype=torch.bool, device=crops.device)
        mask = mask.bool()
        cells = self.encoder(crops[mask])  # (M, D), M = real cells in the batch
        # Scatter back into the padded bag layout; the dtype follows the encoder (bf16 under autocast).
        embeddings = cells.new_zeros((*mask.shape, cells.shape[-1]))  # (B, K, D)
        embeddings[mask] = cells
        head_batch = {"bags": embeddings, "mask": mask}
        if "targets" in batch:
            head_batch["targets"] = batch["targets"]
        out = self.head(head_batch)
        out["embeddings"] = embeddings
        return out
