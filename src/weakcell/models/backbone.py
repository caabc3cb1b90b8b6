"""One backbone factory for every timm model name: 4 input channels, no classifier, weights from a local
file or folder only (Kaggle kernels have no internet).

A 3-channel ImageNet checkpoint is adapted to the 4-channel stem the way timm adapts ``in_chans`` itself
(``adapt_stem``: the RGB filters repeated over the new channels, scaled by 3/4). The stem is found by
shape, not by name: the one checkpoint conv whose input dimension differs from the model's while the
model's equals ``in_chans``. That needs no table of stem names per architecture.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from weakcell.config import ConfigError
from weakcell.weights import WeightsError, load_state_dict

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES: tuple[str, ...] = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")


# timm builds these from elsewhere than its registry (the hub, a local folder); only their source can tell
REMOTE_PREFIXES = ("hf-hub:", "hf_hub:", "local-dir:")


def check_backbone(name: str) -> None:
    """Raise ``ConfigError`` (one line, the closest timm names) unless timm can build ``name``: checked
    when a config is loaded for a stage that builds a network, before any folder is created."""
    if name.startswith(REMOTE_PREFIXES) or timm.is_model(name):
        return
    import difflib

    close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise ConfigError(
        f"model.backbone={name!r} is not a timm model{hint} (every name: python -c "
        f'"import timm; print(timm.list_models())")'
    )


def create_backbone(
    name: str,
    in_chans: int = 4,
    pretrained_file: str | os.PathLike[str] | None = None,
    drop_rate: float = 0.0,
    **timm_kwargs: Any,
) -> nn.Module:
    """A timm model that maps (B, in_chans, S, S) to globally pooled features (B, D).

    ``name`` is any ``timm.list_models()`` name (a pretrained tag such as ``resnet18.a1_in1k`` is allowed);
    ``timm_kwargs`` go to ``timm.create_model`` (``drop_path_rate``, ``img_size`` for a ViT, ...).
    ``pretrained_file`` is a weights file or a folder holding one (see ``resolve_weights_file``); None =
    random init. Nothing is ever downloaded. ``feature_dim(model)`` gives D.
    """
    check_backbone(name)
    model = timm.create_model(
        name, pretrained=False, num_classes=0, in_chans=in_chans, drop_rate=drop_rate, **timm_kwargs
    )
    if pretrained_file is not None:
        load_backbone_weights(model, resolve_weights_file(pretrained_file, name), in_chans)
    return model


def feature_dim(model: nn.Module) -> int:
    """D of the pooled features a ``num_classes=0`` timm model returns. Models with a pre-logits layer
    (MobileNetV3's conv head) return ``head_hidden_size`` features, all others ``num_features``."""
    features = getattr(model, "head_hidden_size", None) or getattr(model, "num_features", None)
    if not features:
        raise TypeError(
            f"{type(model).__name__} has neither head_hidden_size nor num_features: not a timm model"
        )
    return int(features)


def resolve_weights_file(path: str | os.PathLike[str], backbone: str) -> Path:
    """The weights file named by ``path``: a file as is; in a folder, ``{backbone}{suffix}`` (with or
    without the pretrained tag), else the folder's only weights file (a Hugging Face layout holding
    ``model.safetensors`` beside ``pytorch_model.bin`` gives the safetensors one)."""
    path = Path(path).expanduser()
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"backbone weights not found: model.pretrained_file={path} does not exist")
    for stem in dict.fromkeys([backbone, backbone.split(".")[0]]):
        for suffix in WEIGHT_SUFFIXES:
            if (path / f"{stem}{suffix}").is_file():
                return path / f"{stem}{suffix}"
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    safetensors = [p for p in files if p.suffix == ".safetensors"]
    if len(files) > 1 and len(safetensors) == 1:
        files = safetensors
    if len(files) == 1:
        return files[0]
    found = ", ".join(p.name for p in files) or "no weights file"
    raise FileNotFoundError(
        f"backbone weights folder {path} holds {found}; name the file in model.pretrained_file or call it "
        f"{backbone}.safetensors"
    )


def adapt_stem(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """A conv weight ``(O, I, k, k)`` trained on I image channels, for ``in_chans`` channels: for 1, the sum
    of the I filters; otherwise the I filters repeated in order over the new channels (RGB -> RGBR) and
    scaled by I / in_chans, which keeps the stem's output on the scale it was trained at.

    timm's ``adapt_input_conv(in_chans, weight, base_chans=I)`` does the same, but ``base_chans`` exists
    only from timm 1.0.31 (Kaggle's image has 1.0.26), hence this copy of the rule."""
    if weight.ndim != 4:
        raise NotImplementedError(f"only 4-D conv weights can be adapted, got {tuple(weight.shape)}")
    base = weight.shape[1]
    if in_chans == base:
        return weight
    work = weight.float()  # half-precision checkpoints: sum and scale in float32
    if in_chans == 1:
        adapted = work.sum(dim=1, keepdim=True)
    else:
        repeat = -(-in_chans // base)  # ceil
        adapted = work.repeat(1, repeat, 1, 1)[:, :in_chans] * (base / in_chans)
    return adapted.to(weight.dtype)


def _is_stem(source: torch.Tensor, target: torch.Tensor, in_chans: int) -> bool:
    """True for a conv weight (O, I, k, k) that only differs from the model's in I, the model's I being
    the image channels: the input stem of a checkpoint trained on another channel count."""
    return (
        source.ndim == 4
        and target.ndim == 4
        and target.shape[1] == in_chans
        and source.shape[1] != in_chans
        and source.shape[:1] + source.shape[2:] == target.shape[:1] + target.shape[2:]
    )


@dataclass(frozen=True)
class LoadReport:
    """What ``load_backbone_weights`` did with each tensor of the file: loaded (stems adapted among them) or
    dropped as the checkpoint's classifier; ``layout`` is the naming the file came in (``weakcell.models.layouts``)."""

    loaded: tuple[str, ...]
    adapted: tuple[str, ...]
    dropped: tuple[str, ...]
    layout: str


# Buffers a checkpoint may lack without losing anything learned: BatchNorm's step counter (older PyTorch
# checkpoints and some exports leave it out; it only matters for momentum=None).
UNLEARNED_SUFFIXES: tuple[str, ...] = (".num_batches_tracked",)


def load_backbone_weights(model: nn.Module, path: Path, in_chans: int) -> LoadReport:
    """Load ``path`` into ``model``: rename a foreign layout to timm's names, adapt the input stem to
    ``in_chans``, drop the checkpoint's classifier, and account for every tensor: a shape that does not fit,
    a file tensor the model has no place for, or a model tensor the file lacks is a ``WeightsError``
    (nothing is skipped silently; only BatchNorm's ``num_batches_tracked`` counters may be absent)."""
    from weakcell.models.layouts import to_timm_names

    try:
        state, layout = to_timm_names(load_state_dict(path), model)
    except KeyError as err:
        raise WeightsError(f"{path}: cannot map its keys to {type(model).__name__}: {err.args[0]}") from err
    own = model.state_dict()
    pretrained_cfg: dict[str, Any] = getattr(model, "pretrained_cfg", {})  # timm's description of the model
    classifiers = pretrained_cfg.get("classifier") or ()
    prefixes = tuple(f"{c}." for c in ((classifiers,) if isinstance(classifiers, str) else classifiers))
    dropped = [key for key in state if key.startswith(prefixes) and key not in own]
    state = {key: value for key, value in state.items() if key not in dropped}

    adapted = []
    for key, value in state.items():
        if key in own and _is_stem(value, own[key], in_chans):
            try:
                state[key] = adapt_stem(value, in_chans)
            except NotImplementedError as err:
                raise WeightsError(
                    f"{path}: cannot adapt the stem {key} {tuple(value.shape)} to {in_chans} channels: {err}"
                ) from err
            adapted.append(f"{key} {value.shape[1]}->{in_chans}")

    misfits = [
        f"{key} {tuple(value.shape)} in the file vs {tuple(own[key].shape)} in the model"
        for key, value in state.items()
        if key in own and value.shape != own[key].shape
    ]
    matched = [key for key in state if key in own]
    architecture = pretrained_cfg.get("architecture", type(model).__name__)
    if misfits or not matched:
        detail = f"{len(misfits)} tensors differ in shape, e.g. {'; '.join(misfits[:3])}"
        raise WeightsError(
            f"{path} does not fit backbone {architecture!r} (in_chans={in_chans}): "
            f"{detail if misfits else 'no parameter name in common'}. "
            f"Is it a checkpoint of another architecture? Set model.backbone to the one it was trained with."
        )
    unexpected = [key for key in state if key not in own]
    missing = [key for key in own if key not in state and not key.endswith(UNLEARNED_SUFFIXES)]
    if unexpected or missing:
        raise WeightsError(
            f"{path} does not cover backbone {architecture!r}: {len(missing)} model tensors missing "
            f"{missing[:3]}, {len(unexpected)} file tensors without a place {unexpected[:3]}. Is it a "
            f"checkpoint of another variant? Set model.backbone to the one it was trained with."
        )

    model.load_state_dict(state, strict=False)
    log.info(
        "loaded %s into %s: %d tensors (%s layout); stem adapted: %s; classifier dropped: %d",
        path,
        architecture,
        len(matched),
        layout,
        ", ".join(adapted) or "none",
        len(dropped),
    )
    return LoadReport(tuple(matched), tuple(adapted), tuple(dropped), layout)
