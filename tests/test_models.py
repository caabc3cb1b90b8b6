"""Model factory, weights loading and the models of every stage, on tiny timm models at 32 px on CPU."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from weakcell.config import Config, MilConfig, ModelConfig
from weakcell.models import (
    MODELS,
    CellClassifier,
    CropNormalizer,
    DualHeadModel,
    MilClassifier,
    MultiLabelLoss,
    create_backbone,
    create_model,
    feature_dim,
)
from weakcell.models.backbone import adapt_stem
from weakcell.weights import WeightsError

N_CLASSES, SIZE = 5, 32
# timm's own tiny test models (0.1-0.4 M parameters): a deep-stem ResNet, an EfficientNet and a ViT patch
# embedding, all through the same code path.
BACKBONES = {
    "test_resnet": {},
    "test_efficientnet": {},
    "test_vit": {"img_size": SIZE},
}


def crops(*shape: int) -> torch.Tensor:
    return torch.randint(0, 256, (*shape, 4, SIZE, SIZE), dtype=torch.uint8)


def targets(batch: int) -> torch.Tensor:
    return (torch.rand(batch, N_CLASSES) > 0.5).float()


def model_config(backbone: str = "test_resnet", **changes: object) -> ModelConfig:
    return ModelConfig(backbone=backbone, backbone_kwargs=BACKBONES.get(backbone, {}), **changes)


def imagenet_checkpoint(name: str, path: Path) -> dict[str, torch.Tensor]:
    """A 3-channel, 1000-class checkpoint of ``name``, as an ImageNet release would be; saved to ``path``."""
    source = timm.create_model(name, pretrained=False, in_chans=3, **BACKBONES[name]).state_dict()
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in source.items()}, path)
    else:
        torch.save(source, path)
    return source


# -- backbone factory and weights --------------------------------------------------------------------------


@pytest.mark.parametrize("name", BACKBONES)
def test_backbone_gives_pooled_features_of_feature_dim(name: str) -> None:
    backbone = create_backbone(name, **BACKBONES[name]).eval()
    with torch.no_grad():
        features = backbone(torch.randn(2, 4, SIZE, SIZE))
    assert features.shape == (2, feature_dim(backbone))


@pytest.mark.parametrize("name", BACKBONES)
def test_imagenet_checkpoint_loads_into_the_4_channel_stem(
    name: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "imagenet.pth"
    source = imagenet_checkpoint(name, path)
    with caplog.at_level(logging.INFO, logger="weakcell.models.backbone"):
        backbone = create_backbone(name, pretrained_file=path, **BACKBONES[name])
    loaded = backbone.state_dict()
    # timm's own record of the stem is the oracle here; the loader finds it by shape.
    stems = backbone.pretrained_cfg["first_conv"]
    stem = f"{stems if isinstance(stems, str) else stems[0]}.weight"
    assert source[stem].shape[1] == 3 and loaded[stem].shape[1] == 4
    rgb = source[stem]  # RGB filters -> R, G, B, R (the yellow channel takes red's), each scaled by 3/4
    torch.testing.assert_close(loaded[stem], torch.cat([rgb, rgb[:, :1]], dim=1) * 0.75)
    for key, value in loaded.items():
        if key != stem:
            torch.testing.assert_close(value, source[key], msg=key)
    assert "stem adapted" in caplog.text and "classifier dropped" in caplog.text


def test_adapt_stem_by_hand() -> None:
    """Values worked out by hand from timm's rule (repeat the filters in order, scale by 3 / in_chans)."""
    weight = torch.tensor([[1.0, 2.0, 4.0]]).reshape(1, 3, 1, 1)
    four = adapt_stem(weight, 4)
    assert four.flatten().tolist() == [0.75, 1.5, 3.0, 0.75]  # (1, 2, 4, 1) x 3/4
    assert adapt_stem(weight, 1).flatten().tolist() == [7.0]
    assert adapt_stem(weight, 2).flatten().tolist() == [1.5, 3.0]  # x 3/2, truncated to two channels
    assert adapt_stem(weight, 3) is weight
    half = adapt_stem(weight.half(), 4)
    assert half.dtype == torch.float16 and half.flatten().tolist() == [0.75, 1.5, 3.0, 0.75]


def test_safetensors_file_loads(tmp_path: Path) -> None:
    source = imagenet_checkpoint("test_resnet", tmp_path / "test_resnet.safetensors")
    backbone = create_backbone("test_resnet", pretrained_file=tmp_path / "test_resnet.safetensors")
    torch.testing.assert_close(
        backbone.state_dict()["layer4.0.conv1.weight"], source["layer4.0.conv1.weight"]
    )


def test_folder_picks_the_backbone_file_or_the_only_weights_file(tmp_path: Path) -> None:
    named, single = tmp_path / "named", tmp_path / "single"
    named.mkdir(), single.mkdir()
    torch.save({"unrelated": torch.zeros(1)}, named / "other.pth")  # must not be picked
    (named / "README.md").write_text("weights for the kernel")
    key = "layer1.0.conv1.weight"
    for folder, filename in ((named, "test_resnet.safetensors"), (single, "weights.pth")):
        source = imagenet_checkpoint("test_resnet", folder / filename)
        backbone = create_backbone("test_resnet", pretrained_file=folder)
        torch.testing.assert_close(backbone.state_dict()[key], source[key])


def test_ambiguous_folder_and_missing_file_are_clear_errors(tmp_path: Path) -> None:
    imagenet_checkpoint("test_resnet", tmp_path / "a.pth")
    imagenet_checkpoint("test_resnet", tmp_path / "b.pth")
    with pytest.raises(FileNotFoundError, match=r"a\.pth, b\.pth"):
        create_backbone("test_resnet", pretrained_file=tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        create_backbone("test_resnet", pretrained_file=tmp_path / "absent.pth")
    torch.save({"unrelated": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(WeightsError, match="no parameter name in common"):
        create_backbone("test_resnet", pretrained_file=tmp_path / "other.pth")


def test_checkpoint_of_another_width_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "wide.pth"
    torch.save(timm.create_model("mobilenetv3_small_100", pretrained=False).state_dict(), path)
    with pytest.raises(WeightsError, match=r"does not fit backbone 'mobilenetv3_small_050'.*differ in shape"):
        create_backbone("mobilenetv3_small_050", pretrained_file=path)


# -- models of every stage ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["test_resnet", "test_efficientnet"])
def test_cell_classifier_trains_one_step(name: str) -> None:
    model = CellClassifier(model_config(name), N_CLASSES)
    out = model({"crops": crops(4), "targets": targets(4)})
    assert out["logits"].shape == (4, N_CLASSES)
    assert out["embeddings"].shape == (4, model.encoder.dim)
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert "loss" not in model.eval()({"crops": crops(2)})


def test_embedding_projection_sets_the_embedding_size() -> None:
    out = CellClassifier(model_config(embedding_dim=16), N_CLASSES)({"crops": crops(2)})
    assert out["embeddings"].shape == (2, 16)


def test_crop_normalizer_scales_uint8_and_float_alike() -> None:
    mean, std = (0.1, 0.2, 0.3, 0.4), (0.5, 0.25, 0.2, 0.1)
    normalize = CropNormalizer(mean, std)
    batch = crops(3)
    expected = (batch.float() / 255 - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    torch.testing.assert_close(normalize(batch), expected)
    torch.testing.assert_close(normalize(batch.float()), expected)


def test_channels_last_bf16_matches_fp32() -> None:
    torch.manual_seed(0)
    model = CellClassifier(model_config(), N_CLASSES).eval()
    batch = crops(4)
    with torch.no_grad():
        reference = model({"crops": batch})["logits"]
        model = model.to(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fast = model({"crops": batch.contiguous(memory_format=torch.channels_last)})["logits"]
    torch.testing.assert_close(fast.float(), reference, atol=0.1, rtol=0.1)


def test_bf16_autocast_trains_every_stage() -> None:
    cfg = Config(model=model_config())
    for name, batch in sample_batches().items():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = create_model(name, cfg, N_CLASSES, in_dim=8)(batch)["loss"]
        assert loss.dtype == torch.float32 and torch.isfinite(loss), name
        loss.backward()


@pytest.mark.parametrize("name", MODELS)
def test_heads_stay_float32_under_bf16_autocast(name: str) -> None:
    # bf16 logits carry 8 bits of mantissa: most cells would tie in the submission. Every head output
    # (logits, instance logits) must be float32 and hold values bf16 cannot represent.
    torch.manual_seed(0)
    model = create_model(name, Config(model=model_config()), N_CLASSES, in_dim=8).eval()
    batch = {k: v for k, v in sample_batches()[name].items() if k != "targets"}
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(batch)
    for key in ("logits", "instance_logits"):
        if key in out:
            values = out[key]
            assert values.dtype == torch.float32, key
            assert (values != values.to(torch.bfloat16).float()).any(), key


def sample_batches() -> dict[str, dict[str, torch.Tensor]]:
    mask = torch.tensor([[True, True, False], [True, False, False]])
    return {
        "cell": {"crops": crops(4), "targets": targets(4)},
        "mil": {"bags": torch.randn(2, 3, 8), "mask": mask, "targets": targets(2)},
        "dual": {"crops": crops(2, 3), "mask": mask, "targets": targets(2)},
        "image": {"crops": crops(2), "targets": targets(2)},  # whole images, downscaled (image_model.size)
    }


@pytest.mark.parametrize("name", MODELS)
def test_every_registered_model_returns_a_finite_loss(name: str) -> None:
    batch = sample_batches()[name]  # a KeyError here: a new model needs a sample batch above
    out = create_model(name, Config(model=model_config()), N_CLASSES, in_dim=8)(batch)
    assert out["logits"].shape == (2 if name != "cell" else 4, N_CLASSES)
    assert torch.isfinite(out["loss"])
    out["loss"].backward()


def test_unknown_model_name_lists_the_known_ones() -> None:
    with pytest.raises(KeyError, match="'cell'"):
        create_model("cells", Config(), N_CLASSES)


def test_mil_loss_is_image_bce_plus_lambda_cell_bce_on_real_cells() -> None:
    model = MilClassifier(8, N_CLASSES, MilConfig(cell_loss_weight=0.3))
    batch = sample_batches()["mil"]
    out = model(batch)
    mask, labels = batch["mask"], batch["targets"]
    image = F.binary_cross_entropy_with_logits(out["logits"], labels)
    cells = F.binary_cross_entropy_with_logits(out["instance_logits"][mask], labels[mask.nonzero()[:, 0]])
    torch.testing.assert_close(out["loss"], image + 0.3 * cells)


def test_nan_targets_are_left_out_of_the_loss() -> None:
    from weakcell.models.losses import MultiLabelLoss

    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 3.0, -2.0]])
    targets = torch.tensor([[1.0, float("nan"), 0.0], [float("nan"), 1.0, 1.0]])
    known = ~torch.isnan(targets)
    expected = F.binary_cross_entropy_with_logits(logits[known], targets[known])
    torch.testing.assert_close(MultiLabelLoss()(logits, targets), expected)
    # with a row mask too: row 1 is padding, so only row 0's two known pairs count
    mask = torch.tensor([True, False])
    torch.testing.assert_close(
        MultiLabelLoss()(logits, targets, mask),
        F.binary_cross_entropy_with_logits(logits[0, [0, 2]], targets[0, [0, 2]]),
    )


def test_dual_head_ignores_padded_crops() -> None:
    torch.manual_seed(0)
    model = DualHeadModel(model_config(), MilConfig(), N_CLASSES).eval()  # eval: BatchNorm per cell
    bag = crops(1, 2)
    padded = torch.cat([bag, crops(1, 3)], dim=1)
    mask = torch.tensor([[True, True, False, False, False]])
    with torch.no_grad():
        out, out_padded = model({"crops": bag}), model({"crops": padded, "mask": mask})
    torch.testing.assert_close(out_padded["logits"], out["logits"])
    torch.testing.assert_close(out_padded["attention"][..., :2], out["attention"])
    assert out_padded["embeddings"].shape == (1, 5, model.encoder.dim)
    assert (out_padded["embeddings"][0, 2:] == 0).all()


def test_stage1_checkpoint_loads_into_the_end_to_end_model() -> None:
    stage1 = CellClassifier(model_config(), N_CLASSES)
    dual = DualHeadModel(model_config(), MilConfig(), N_CLASSES)
    result = dual.load_state_dict(stage1.state_dict(), strict=False)
    assert not [k for k in result.missing_keys if k.startswith("encoder.")]
    assert result.unexpected_keys == ["head.weight", "head.bias"]


def test_focal_with_gamma_0_is_bce_and_pos_weight_weighs_positives() -> None:
    logits, labels = torch.randn(6, N_CLASSES), targets(6)
    weight = torch.arange(1.0, N_CLASSES + 1)
    torch.testing.assert_close(
        MultiLabelLoss("focal", gamma=0.0, pos_weight=weight)(logits, labels),
        F.binary_cross_entropy_with_logits(logits, labels, pos_weight=weight),
    )
    assert MultiLabelLoss("focal", gamma=2.0)(logits, labels) < MultiLabelLoss("bce")(logits, labels)
    with pytest.raises(ValueError, match="unknown loss"):
        MultiLabelLoss("hinge")
