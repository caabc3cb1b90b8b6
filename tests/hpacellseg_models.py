"""HPA-Cell-Segmentation model files made by the tests: no published weights are on disk, none may be
downloaded.

- ``thresholding_state``: U-Net weights that segment without training. Every weight is zero but one path:
  the stem's channel 0 averages the three input channels (centre tap, batch norm shifting dark pixels below
  zero, ReLU), the last bottleneck and the last upsampling pass that channel on, and the final convolution
  turns it into a foreground logit (the touching-border logit is strongly negative). The network is then a
  smooth threshold of the input intensity: nuclei where blue is bright, cells where red + yellow + blue is.
- ``save_weights``: the nuclei and cell files under their published names, as safetensors or as whole-model
  pickles (``upstream_like``).
- ``upstream_like``: a module tree shaped and named as upstream's ``torch.save(model)`` would pickle it (its
  classes carry upstream's class paths: ``pytorch_zoo.unet.DPNUnet``, ``pytorch_zoo.dpn.DualPathBlock``,
  ... registered in ``sys.modules`` while it is saved), holding given tensors.
"""

from __future__ import annotations

import contextlib
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from weakcell.segment.hpacellseg.network import DPNUnet

SLOPE, THRESHOLD, SHIFT = 6.0, 0.5, 1.8  # foreground logit = SLOPE * (relu(mean input + SHIFT) - THRESHOLD)


def thresholding_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """State dict of a ``DPNUnet`` that thresholds the mean of its (normalised) input channels."""
    torch.manual_seed(seed)
    state = {key: torch.zeros_like(value) for key, value in DPNUnet().state_dict().items()}
    for key in state:
        if key.endswith("running_var"):
            state[key].fill_(1.0)
        elif key.endswith(".weight") and state[key].ndim == 1:  # batch norm scales
            state[key].fill_(1.0)
    state["encoder_stages.0.0.weight"][0, :, 3, 3] = 1 / 3  # centre of the 7x7 stem, channel 0
    state["encoder_stages.0.1.bias"][0] = SHIFT
    state["bottlenecks.3.seq.0.weight"][0, 64, 1, 1] = 1.0  # the encoder half of the last skip
    state["last_upsample.layer.1.weight"][0, 0, 1, 1] = 1.0
    state["final.0.weight"][2, 0, 1, 1] = SLOPE
    state["final.0.bias"].copy_(torch.tensor([0.0, -30.0, -SLOPE * THRESHOLD]))
    return state


def random_state(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return DPNUnet().state_dict()


# -- upstream's whole-model pickles ---------------------------------------------------------------------------

UPSTREAM_MODULES = {
    "pytorch_zoo.unet": ("DPNUnet",),
    "pytorch_zoo.abstract_model": ("ConvBottleneck", "UnetDecoderBlock"),
    "pytorch_zoo.dpn": ("DualPathBlock", "BnActConv2d", "CatBnAct"),
}


@contextlib.contextmanager
def upstream_classes() -> Iterator[dict[str, type[nn.Module]]]:
    """Module classes named and placed like upstream's, importable (so that pickle can name them) while
    the context lasts."""
    classes: dict[str, type[nn.Module]] = {}
    saved = {name: sys.modules.get(name) for name in ("pytorch_zoo", *UPSTREAM_MODULES)}
    package = types.ModuleType("pytorch_zoo")
    sys.modules["pytorch_zoo"] = package
    try:
        for module_name, names in UPSTREAM_MODULES.items():
            module = types.ModuleType(module_name)
            for name in names:
                cls = type(name, (nn.Module,), {"__module__": module_name})
                setattr(module, name, cls)
                classes[name] = cls
            sys.modules[module_name] = module
            setattr(package, module_name.rpartition(".")[2], module)
        yield classes
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def _batch_norm(width: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(width, eps=0.001)


def _bn_act_conv(classes: dict[str, type[nn.Module]], conv: nn.Conv2d) -> nn.Module:
    block = classes["BnActConv2d"]()
    block.bn, block.act, block.conv = _batch_norm(conv.in_channels), nn.ReLU(inplace=True), conv
    return block


def _dual_path_block(classes: dict[str, type[nn.Module]], source: nn.Module) -> nn.Module:
    block = classes["DualPathBlock"]()
    for name in ("c1x1_w_s1", "c1x1_w_s2", "c1x1_a", "c3x3_b", "c1x1_c"):
        part = getattr(source, name, None)
        if part is not None:
            setattr(block, name, _bn_act_conv(classes, _conv_like(part.conv)))
    block.num_1x1_c, block.inc, block.b = source.num_1x1_c, source.inc, False
    return block


def _conv_like(conv: nn.Conv2d) -> nn.Conv2d:
    return nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        groups=conv.groups,
        bias=conv.bias is not None,
    )


def _decoder_block(classes: dict[str, type[nn.Module]], source: nn.Module) -> nn.Module:
    block = classes["UnetDecoderBlock"]()
    conv = source.layer[1]
    block.layer = nn.Sequential(nn.Upsample(scale_factor=2), _conv_like(conv), nn.ReLU(inplace=True))
    return block


def upstream_like(
    state: dict[str, torch.Tensor], classes: dict[str, type[nn.Module]], parallel: bool = False
):
    """A module tree as upstream pickles it (see the module doc) holding ``state`` (upstream's names)."""
    skeleton = DPNUnet()
    model = classes["DPNUnet"]()
    model.decoder_type, model.first_layer_stride_two, model.need_center = 1, True, False
    model.decoder_block, model.bottleneck_type = classes["UnetDecoderBlock"], classes["ConvBottleneck"]
    model.filters = [64, 336, 704, 1552, 2688]
    model.input_channel_num, model.target_channel_num = 3, 3
    bottlenecks = []
    for source in skeleton.bottlenecks:
        block = classes["ConvBottleneck"]()
        block.seq = nn.Sequential(_conv_like(source.seq[0]), nn.ReLU(inplace=True))
        bottlenecks.append(block)
    model.bottlenecks = nn.ModuleList(bottlenecks)
    model.decoder_stages = nn.ModuleList(_decoder_block(classes, block) for block in skeleton.decoder_stages)
    model.last_upsample = _decoder_block(classes, skeleton.last_upsample)
    model.final = nn.Sequential(_conv_like(skeleton.final[0]))
    stem = skeleton.encoder_stages[0]
    stages = [nn.Sequential(_conv_like(stem[0]), _batch_norm(64), nn.ReLU(inplace=True))]
    for stage in skeleton.encoder_stages[1:]:
        blocks: list[nn.Module] = []
        for module in stage:
            if isinstance(module, nn.MaxPool2d):
                blocks.append(nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
            elif hasattr(module, "c1x1_a"):
                blocks.append(_dual_path_block(classes, module))
            else:  # conv5_bn_ac
                tail = classes["CatBnAct"]()
                tail.bn, tail.act = _batch_norm(2688), nn.ReLU(inplace=True)
                blocks.append(tail)
        stages.append(nn.Sequential(*blocks))
    model.encoder_stages = nn.ModuleList(stages)
    model.load_state_dict(state, strict=True)
    return nn.DataParallel(model) if parallel else model


def tiny_upstream_like(
    classes: dict, parallel: bool = False
) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """A small module tree with upstream's class paths (the file format, not the size, is under test)."""
    torch.manual_seed(0)
    model = classes["DPNUnet"]()
    block = classes["DualPathBlock"]()
    block.c1x1_a = classes["BnActConv2d"]()
    block.c1x1_a.bn, block.c1x1_a.act, block.c1x1_a.conv = (
        torch.nn.BatchNorm2d(4, eps=0.001),
        torch.nn.ReLU(),
        torch.nn.Conv2d(4, 6, 1, bias=False),
    )
    model.encoder_stages = torch.nn.ModuleList([torch.nn.Sequential(torch.nn.MaxPool2d(3, 2, 1), block)])
    model.final = torch.nn.Sequential(torch.nn.Conv2d(6, 3, 3, padding=1))
    model.decoder_block = classes["UnetDecoderBlock"]  # upstream keeps classes as attributes
    with torch.no_grad():
        for value in model.state_dict().values():
            value.copy_(torch.randn(value.shape) * 10 if value.is_floating_point() else torch.tensor(7))
    state = {key: value.clone() for key, value in model.state_dict().items()}
    return (torch.nn.DataParallel(model) if parallel else model), state


# -- files ------------------------------------------------------------------------------------------------------


def save_weights(
    folder: Path,
    nuclei: dict[str, torch.Tensor],
    cell: dict[str, torch.Tensor],
    cell_model: str = "dpn_unet_cell_3ch_v1",
    whole_model: bool = False,
) -> Path:
    """The two model files in ``folder`` under their published names (``.safetensors``, or ``.pth`` whole-model
    pickles when ``whole_model``); returns ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for stem, state in (("dpn_unet_nuclei_v1", nuclei), (cell_model, cell)):
        if whole_model:
            with upstream_classes() as classes:
                torch.save(upstream_like(state, classes), folder / f"{stem}.pth")
        else:
            save_file(
                {key: value.contiguous() for key, value in state.items()}, folder / f"{stem}.safetensors"
            )
    return folder
