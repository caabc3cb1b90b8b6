"""Attention multiple-instance pooling (Ilse, Tomczak & Welling 2018, "Attention-based Deep Multiple
Instance Learning"), with one attention distribution per class.

An HPA image is a bag of cells that carries only image labels. A multi-label image ("Nucleoli|Cytosol")
often has different cells showing each class, so each class attends to its own cells: ``attention`` is
(B, C, N), not (B, N). The module is plain tensors in, tensors out, so it pools any bag of feature vectors
(cell embeddings, tiles of a slide, ...), and it takes padded variable-size bags with a boolean mask.
"""

from __future__ import annotations

import math

import torch
from torch import nn

# Score given to padded cells before the softmax. Finite, so that a bag without a single real cell gives
# a uniform softmax (then zeroed by the mask) rather than NaN from exp(-inf - -inf).
MASKED_SCORE = -1e9


class AttentionMIL(nn.Module):
    """Per-class attention pooling of a bag of feature vectors into image logits.

    For class c, cell n with features h_n:
        plain:  s_{c,n} = w_c . tanh(V h_n)
        gated:  s_{c,n} = w_c . (tanh(V h_n) * sigmoid(U h_n))
        a_{c,n} = softmax over the bag's real cells of s_{c,n}
        logit_c = W_c . (sum_n a_{c,n} h_n) + b_c          (one classifier per class)
    and, beside it, ``instance_logits`` from a per-cell linear classifier on the same h_n; it is trained
    by a cell-level loss (e.g. cells inheriting the image labels) and used to score cells.

    Args:
        in_dim: D, size of each feature vector.
        n_classes: C.
        hidden: width of the attention network.
        gated: gated attention (tanh * sigmoid) instead of plain tanh.
        dropout: dropout on the attention network's hidden layer.

    ``forward(x, mask=None)``:
        x: (B, N, D) float, bags of N feature vectors (padded to a common N).
        mask: (B, N) bool, True = real cell; None = every cell is real.
    returns a dict:
        logits: (B, C) image logits.
        attention: (B, C, N), each row sums to 1 over the real cells, exactly 0 on padding; all 0 for a bag
            without real cells (whose logits are then the classifier bias).
        instance_logits: (B, N, C) per-cell logits (padded cells get the bias; mask them in any loss).

    Example:
        >>> mil = AttentionMIL(in_dim=512, n_classes=19, gated=True)
        >>> bags = torch.randn(2, 30, 512)  # (B, N, D) two images, up to 30 cells each
        >>> mask = torch.arange(30) < torch.tensor([[30], [12]])  # the second image has 12 cells
        >>> out = mil(bags, mask)
        >>> out["logits"].shape, out["attention"].shape, out["instance_logits"].shape
        (torch.Size([2, 19]), torch.Size([2, 19, 30]), torch.Size([2, 30, 19]))
    """

    def __init__(
        self, in_dim: int, n_classes: int, hidden: int = 128, gated: bool = False, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.in_dim, self.n_classes, self.gated = in_dim, n_classes, gated
        self.attention_value = nn.Linear(in_dim, hidden)  # V
        self.attention_gate = nn.Linear(in_dim, hidden) if gated else None  # U
        self.attention_dropout = nn.Dropout(dropout)
        self.attention_score = nn.Linear(hidden, n_classes)  # one w_c per class
        # One classifier per class on its own pooled vector: W (C, D), b (C).
        self.classifier_weight = nn.Parameter(torch.empty(n_classes, in_dim))
        self.classifier_bias = nn.Parameter(torch.empty(n_classes))
        self.instance_head = nn.Linear(in_dim, n_classes)
        self._init_classifier()

    def _init_classifier(self) -> None:
        # Same initialisation as nn.Linear(in_dim, n_classes), so both heads start on the same scale.
        nn.init.kaiming_uniform_(self.classifier_weight, a=math.sqrt(5))
        bound = 1 / math.sqrt(self.in_dim)
        nn.init.uniform_(self.classifier_bias, -bound, bound)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Pool the bags ``x`` (B, N, D) under ``mask`` (B, N); see the class docstring for the outputs."""
        if x.ndim != 3 or x.shape[-1] != self.in_dim:
            raise ValueError(f"expected bags of shape (B, N, {self.in_dim}), got {tuple(x.shape)}")
        if mask is None:
            mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        elif mask.shape != x.shape[:2]:
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match bags {tuple(x.shape[:2])}")
        mask = mask.bool()
        # Zero the padding: whatever a collate left there (even NaN) must not reach a sum, where 0 * NaN = NaN.
        x = x.masked_fill(~mask[..., None], 0.0)  # (B, N, D)

        hidden = torch.tanh(self.attention_value(x))  # (B, N, H)
        if self.attention_gate is not None:
            hidden = hidden * torch.sigmoid(self.attention_gate(x))
        scores = self.attention_score(self.attention_dropout(hidden)).transpose(1, 2)  # (B, C, N)
        # Softmax in float32 (autocast may hand us bf16 scores), then zero the padding: exactly 0 on pads,
        # and all 0 for a bag with no real cell.
        scores = scores.float().masked_fill(~mask[:, None, :], MASKED_SCORE)
        attention = torch.softmax(scores, dim=-1) * mask[:, None, :]  # (B, C, N)

        # logit_c = W_c . (sum_n a_{c,n} h_n) + b_c = sum_n a_{c,n} (W_c . h_n) + b_c: by linearity, score every
        # cell with every class's classifier first, (B, N, C), instead of building (B, C, D) pooled vectors.
        class_scores = x @ self.classifier_weight.T  # (B, N, C)
        logits = (
            torch.einsum("bcn,bnc->bc", attention.to(class_scores.dtype), class_scores) + self.classifier_bias
        )
        instance_logits = self.instance_head(x)  # (B, N, C)
        return {"logits": logits, "attention": attention, "instance_logits": instance_logits}
