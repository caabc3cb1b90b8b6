"""The HPA-Cell-Segmentation U-Net (``pytorch_zoo.unet.DPNUnet``), rebuilt with upstream's parameter names.

Encoder: DPN-92, taken from timm's ``dpn92`` (same layers and parameter names inside each block: a dual
path block's ``c1x1_w_s1`` / ``c1x1_w_s2`` / ``c1x1_a`` / ``c3x3_b`` / ``c1x1_c``, each a batch norm + ReLU
+ conv; timm 1.0.31 keeps the two paths concatenated, older timm and upstream as a tuple, which is the same
tensor once joined),
cut into upstream's five stages: stride-2 stem (conv, bn, relu), then max-pool + ``conv2_*``, ``conv3_*``,
``conv4_*``, ``conv5_*`` + the final batch norm. Decoder: upstream's own modules, rewritten here: at each
scale, a nearest x2 upsample + 3x3 conv + ReLU, concatenated with the encoder stage of that scale and
merged by a 3x3 conv + ReLU; a last upsample to the input size and a 3x3 conv to 3 channels (background,
touching border, foreground; softmax outside the network). Input: 3 channels, sides divisible by 32.

``tests/fixtures/hpacellseg_dpn_unet.json`` lists upstream's 595 state-dict entries (name, shape, dtype)
and the test holds this network to it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

# Channels out of the stem and of each DPN-92 stage (upstream's ``encoder_params['dpn92']['filters']``).
FILTERS = (64, 336, 704, 1552, 2688)
STAGE_PREFIXES = ("conv2_", "conv3_", "conv4_", "conv5_")
OUT_CHANNELS = 3  # background (unused), touching border, foreground


class UnetDecoderBlock(nn.Module):
    """x2 nearest upsample, 3x3 conv, ReLU (upstream's ``UnetDecoderBlock``; ``layer.1`` holds the conv)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.layer = nn.Sequential(
            nn.Upsample(scale_factor=2),
            nn.Conv2d(in_channels, out_channels, 3, padding=1),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class ConvBottleneck(nn.Module):
    """Concatenate decoder and encoder features, 3x3 conv back to the encoder's width, ReLU."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.seq = nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.ReLU(inplace=True))

    def forward(self, decoded: torch.Tensor, encoded: torch.Tensor) -> torch.Tensor:
        return self.seq(torch.cat([decoded, encoded], dim=1))


def dpn92_stages() -> nn.ModuleList:
    """timm's DPN-92 (random init, nothing downloaded) cut into upstream's five encoder stages."""
    import timm

    features: Any = timm.create_model("dpn92", pretrained=False).features
    stem = features.conv1_1  # conv + batch norm with its ReLU (timm's BatchNormAct2d)
    stages = [nn.Sequential(stem.conv, stem.bn, nn.Identity())]  # index 2 stands for upstream's ReLU
    for index, prefix in enumerate(STAGE_PREFIXES):
        blocks = [module for name, module in features.named_children() if name.startswith(prefix)]
        if index == 0:
            blocks.insert(0, features.conv1_pool)
        stages.append(nn.Sequential(*blocks))
    return nn.ModuleList(stages)


class DPNUnet(nn.Module):
    """HPA-Cell-Segmentation's nuclei / cell network: ``(B, 3, H, W)`` normalised input -> ``(B, 3, H, W)``
    logits, ``H`` and ``W`` divisible by 32."""

    def __init__(self) -> None:
        super().__init__()
        deepest_first = list(reversed(FILTERS[:-1]))
        self.bottlenecks = nn.ModuleList(ConvBottleneck(2 * width, width) for width in deepest_first)
        self.decoder_stages = nn.ModuleList(
            UnetDecoderBlock(FILTERS[level], FILTERS[level - 1]) for level in range(1, len(FILTERS))
        )
        self.last_upsample = UnetDecoderBlock(FILTERS[0], FILTERS[0])
        self.final = nn.Sequential(nn.Conv2d(FILTERS[0], OUT_CHANNELS, 3, padding=1))
        self.encoder_stages = dpn92_stages()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        encoded = []
        for stage in self.encoder_stages:
            x = stage(x)
            # timm before 1.0.31 (Kaggle's image has 1.0.26) passes the two paths as a tuple, like upstream
            encoded.append(torch.cat(x, dim=1) if isinstance(x, tuple) else x)
        x = encoded[-1]
        # Deepest first: stage 4 (1/32) is upsampled and merged with stage 3 (1/16), ... down to the stem (1/2).
        for depth, bottleneck in enumerate(self.bottlenecks):
            x = bottleneck(self.decoder_stages[-(depth + 1)](x), encoded[-(depth + 2)])
        return self.final(self.last_upsample(x))
