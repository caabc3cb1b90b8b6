"""Models of every training stage and the registry the training stage picks them from by name.

``create_model("cell" | "mil" | "dual" | "image", cfg, n_classes)`` builds from the resolved ``Config``; every model's
``forward(batch: dict)`` returns a dict with ``loss`` when the batch holds ``targets``.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from weakcell.config import Config, ModelConfig
from weakcell.errors import UnknownName
from weakcell.models.backbone import create_backbone, feature_dim, load_backbone_weights, resolve_weights_file
from weakcell.models.classifiers import (
    CellClassifier,
    CellEncoder,
    CropNormalizer,
    DualHeadModel,
    MilClassifier,
)
from weakcell.models.losses import LOSSES, MultiLabelLoss, PosWeight

ModelBuilder = Callable[..., nn.Module]


def build_cell(
    cfg: Config, n_classes: int, *, in_dim: int | None = None, pos_weight: PosWeight = None
) -> nn.Module:
    """Stage 1 ``CellClassifier`` (``in_dim`` is unused: the backbone fixes it)."""
    return CellClassifier(cfg.model, n_classes, cfg.train.loss, cfg.train.focal_gamma, pos_weight)


def build_mil(
    cfg: Config, n_classes: int, *, in_dim: int | None = None, pos_weight: PosWeight = None
) -> nn.Module:
    """Stage 2 ``MilClassifier`` on frozen embeddings of size ``in_dim`` (required)."""
    if in_dim is None:
        raise ValueError("the 'mil' model needs in_dim, the size of the stage-1 cell embeddings")
    return MilClassifier(in_dim, n_classes, cfg.mil, cfg.train.loss, cfg.train.focal_gamma, pos_weight)


def build_dual(
    cfg: Config, n_classes: int, *, in_dim: int | None = None, pos_weight: PosWeight = None
) -> nn.Module:
    """End-to-end ``DualHeadModel`` (``in_dim`` is unused: the backbone fixes it)."""
    return DualHeadModel(cfg.model, cfg.mil, n_classes, cfg.train.loss, cfg.train.focal_gamma, pos_weight)


def build_image(
    cfg: Config, n_classes: int, *, in_dim: int | None = None, pos_weight: PosWeight = None
) -> nn.Module:
    """The whole-image model (``weakcell.image_model``): ``CellClassifier``'s backbone + linear head + BCE
    on whole downscaled images, with the backbone, weights and channel statistics of ``image_model``."""
    section = cfg.image_model
    network = ModelConfig(
        backbone=section.backbone,
        pretrained_file=section.pretrained_file,
        drop_rate=section.drop_rate,
        channel_mean=section.channel_mean,
        channel_std=section.channel_std,
    )
    return CellClassifier(network, n_classes, "bce", pos_weight=pos_weight)


MODELS: dict[str, ModelBuilder] = {
    "cell": build_cell,
    "mil": build_mil,
    "dual": build_dual,
    "image": build_image,
}


def create_model(
    name: str, cfg: Config, n_classes: int, *, in_dim: int | None = None, pos_weight: PosWeight = None
) -> nn.Module:
    """Build the ``MODELS[name]`` model from the resolved config; ``pos_weight`` (C,) weighs positives."""
    if name not in MODELS:
        raise UnknownName(f"unknown model {name!r}; known: {sorted(MODELS)}")
    # model.pretrained_file is found against paths.root, as make weights writes it
    return MODELS[name](cfg.rooted_weights(), n_classes, in_dim=in_dim, pos_weight=pos_weight)


__all__ = [
    "LOSSES",
    "MODELS",
    "CellClassifier",
    "CellEncoder",
    "CropNormalizer",
    "DualHeadModel",
    "MilClassifier",
    "ModelBuilder",
    "MultiLabelLoss",
    "build_cell",
    "build_dual",
    "build_image",
    "build_mil",
    "create_backbone",
    "create_model",
    "feature_dim",
    "load_backbone_weights",
    "resolve_weights_file",
]
