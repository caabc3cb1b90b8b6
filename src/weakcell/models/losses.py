"""Multi-label losses shared by every model: BCE-with-logits or focal, optional per-class positive weights,
optional mask for padded cells."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ElementLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None, float], torch.Tensor]


# (C,) weight of each class's positive term, in any form torch.as_tensor reads
PosWeight = torch.Tensor | np.ndarray | Sequence[float] | None


def bce(
    logits: torch.Tensor, targets: torch.Tensor, pos_weight: torch.Tensor | None, gamma: float
) -> torch.Tensor:
    """Element-wise binary cross-entropy with logits (``gamma`` unused)."""
    return F.binary_cross_entropy_with_logits(logits, targets, pos_weight=pos_weight, reduction="none")


def focal(
    logits: torch.Tensor, targets: torch.Tensor, pos_weight: torch.Tensor | None, gamma: float
) -> torch.Tensor:
    """Element-wise focal loss (Lin et al. 2017): BCE scaled by (1 - p_t) ** gamma, so the many easy
    negatives of a rare class weigh less. p_t is the probability given to the target (soft targets too)."""
    probability = torch.sigmoid(logits)
    p_target = probability * targets + (1 - probability) * (1 - targets)
    return bce(logits, targets, pos_weight, gamma) * (1 - p_target).pow(gamma)


LOSSES: dict[str, ElementLoss] = {"bce": bce, "focal": focal}


class MultiLabelLoss(nn.Module):
    """Mean multi-label loss over (..., C) logits and float targets in [0, 1].

    kind: a ``LOSSES`` name (``bce`` or ``focal``); gamma: focal exponent; pos_weight: (C,) weight of the
    positive term per class (e.g. negatives / positives), kept as a buffer so it moves with the model.
    ``forward(logits, targets, mask=None)``: ``mask`` (...) bool leaves out padded rows (e.g. padded cells
    of a bag), a NaN target leaves out that (row, class) pair (pseudo-labels too uncertain to train on); the
    mean is over what is left.
    """

    pos_weight: torch.Tensor | None  # a buffer, registered in __init__

    def __init__(
        self,
        kind: str = "bce",
        gamma: float = 2.0,
        pos_weight: PosWeight = None,
    ) -> None:
        super().__init__()
        if kind not in LOSSES:
            raise ValueError(f"unknown loss {kind!r}; known: {sorted(LOSSES)}")
        self.kind, self.gamma = kind, gamma
        self.element_loss = LOSSES[kind]
        weight = None if pos_weight is None else torch.as_tensor(pos_weight, dtype=torch.float32)
        self.register_buffer("pos_weight", weight, persistent=False)  # a training choice, not a weight

    def forward(
        self, logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Scalar loss; computed in float32 whatever autocast gave the logits."""
        targets = targets.float()
        known = ~torch.isnan(targets)  # (..., C); no .all() test: that would sync with the GPU every step
        if mask is not None:
            known = known & mask[..., None].bool()
        losses = self.element_loss(logits.float(), targets.nan_to_num(0.0), self.pos_weight, self.gamma)
        # Left-out pairs count for nothing (masked_fill, not a product: 0 * NaN is NaN); the clamp keeps a
        # batch without a single known pair at 0, not NaN.
        return losses.masked_fill(~known, 0.0).sum() / known.sum().clamp(min=1)
