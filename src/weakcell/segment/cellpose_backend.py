"""Cellpose 4 (Cellpose-SAM) as a segmentation backend, from a local weights file only.

Weights: ``segment.cellpose.weights`` (a file, or a folder holding ``cpsam``), else the folder in
``$CELLPOSE_LOCAL_MODELS_PATH``, else a Kaggle dataset under ``/kaggle/input/*``. The official weights
(``cpsam``, ~1.2 GB, a SAM ViT-L encoder) must be attached to the kernel as a dataset, e.g.
``segment.cellpose.weights=/kaggle/input/cellpose-sam/cpsam``.

Why not ``cellpose.models.CellposeModel(pretrained_model=...)``: its constructor resolves model names
through ``cache_model_path``, which downloads whatever is not on disk, and loads the file itself. Here the
network skeleton is built on the meta device (no memory, no random init), the tensors come from
``weakcell.weights.load_state_dict`` (weights-only), and cellpose's ``eval`` runs on a ``CellposeModel``
whose constructor is never called. Nothing can reach the network.

Per image, split for batching (``weakcell.segment.batched``): ``prepare`` (1-2) in a CPU worker,
``predict`` (the network and cellpose's mask reconstruction, in the one process that holds the model),
``finish`` (3-4) in a CPU worker:
1. Downscale to ``working_scale`` (area averaging): HPA cells at 2048 px span ~100-250 px, at 0.25 they
   are near the ~30 px Cellpose-SAM was trained around.
2. Input channels: cell body = mean of ``cytoplasm_channels`` (red + yellow by default), nucleus = blue,
   third channel empty (Cellpose-SAM reads cytoplasm, nucleus, other).
3. Masks go back to full resolution by nearest-neighbour upscaling.
4. Nuclei: the blue-channel foreground (Otsu on the lightly smoothed full-resolution plane) inside each
   cell, labelled with that cell's id. No second network pass: on CPU it would double the cost, and the
   DAPI stain is bright and clean enough for a global threshold once cells are known.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from weakcell.config import SegmentConfig
from weakcell.constants import CHANNELS
from weakcell.devices import resolve_device
from weakcell.errors import StageError
from weakcell.segment import Segmentation, starting
from weakcell.segment.batched import NetworkInput, NetworkStage
from weakcell.weights import WeightsError, find_weights, load_state_dict

ENV_VAR = "CELLPOSE_LOCAL_MODELS_PATH"  # the folder cellpose itself reads its models from
WEIGHT_PATTERNS: tuple[str, ...] = ("cpsam_v2", "cpsam", "cpsam*.pth", "cpsam*.pt", "cpsam*.safetensors")
CONFIG_KEY = "segment.cellpose.weights"
EXAMPLE = "/kaggle/input/cellpose-sam/cpsam"  # the official file, attached as a dataset named cellpose-sam
TILE = 256  # Cellpose-SAM's position embeddings are sized for 256-px tiles of 8-px patches
PATCH = 8


def resize_labels(labels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of an ``(h, w)`` label image to ``shape`` (pixel centres are matched,
    labels are never blended)."""
    rows = np.minimum(
        ((np.arange(shape[0]) + 0.5) * labels.shape[0] / shape[0]).astype(np.intp), labels.shape[0] - 1
    )
    cols = np.minimum(
        ((np.arange(shape[1]) + 0.5) * labels.shape[1] / shape[1]).astype(np.intp), labels.shape[1] - 1
    )
    return labels[rows[:, None], cols[None, :]]


def resize_image(image: np.ndarray, scale: float) -> np.ndarray:
    """``(C, H, W)`` uint8 -> ``(C, h, w)`` uint8 at ``scale`` with area averaging (no aliasing)."""
    if scale == 1:
        return image
    height, width = image.shape[1:]
    size = (max(1, round(width * scale)), max(1, round(height * scale)))  # cv2 takes (w, h)
    return np.stack([cv2.resize(plane, size, interpolation=cv2.INTER_AREA) for plane in image])


def nuclei_in_cells(blue: np.ndarray, cells: np.ndarray) -> np.ndarray:
    """The blue-channel foreground (Otsu after a 2-px blur against shot noise) inside each cell,
    labelled with the cell's id: ``(H, W)`` int32, nuclei ⊆ cells by construction."""
    smooth = cv2.GaussianBlur(blue, (0, 0), 2.0)
    if int(smooth.max()) == int(smooth.min()):  # a flat plane has no foreground
        return np.zeros_like(cells)
    threshold, _ = cv2.threshold(smooth, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return np.where(smooth > threshold, cells, 0).astype(np.int32)


def _cpsam_skeleton(backbone: str) -> torch.nn.Module:
    """A ``cellpose.vit.CPSAM`` on the meta device, its encoder of SAM size ``backbone``.

    For ``vit_l`` this is cellpose's own class untouched. Other sizes swap in that SAM encoder and repeat
    the surgery of ``CPSAM.__init__``: 8-px patch embedding, position embeddings subsampled for 256-px tiles,
    global attention in every block; the parameter names stay those of CPSAM.
    """
    from cellpose.vit import CPSAM
    from segment_anything import sam_model_registry

    if backbone not in sam_model_registry:
        raise StageError(
            f"segment.cellpose.backbone={backbone!r} is not a SAM encoder size; known: {sorted(sam_model_registry)}"
        )
    with torch.device("meta"):
        net = CPSAM(ps=PATCH, bsize=TILE)
        if backbone != "vit_l":
            encoder = sam_model_registry[backbone](None).image_encoder
            embed = encoder.patch_embed.proj
            encoder.patch_embed.proj = torch.nn.Conv2d(3, embed.out_channels, stride=PATCH, kernel_size=PATCH)
            step = (encoder.pos_embed.shape[1]) // (TILE // PATCH)
            encoder.pos_embed = torch.nn.Parameter(encoder.pos_embed[:, ::step, ::step])
            for block in encoder.blocks:
                block.window_size = 0
            net.encoder = encoder
    return net


def load_network(path: str | Path, backbone: str, device: torch.device) -> torch.nn.Module:
    """Cellpose-SAM network with the tensors of ``path`` (weights-only), on ``device``: bfloat16 on GPU
    as cellpose does by default, float32 on CPU where bfloat16 matmuls are slow on most chips."""
    state = load_state_dict(path)
    if "W2" not in state:
        raise WeightsError(
            f"{path} is not a Cellpose 4 (Cellpose-SAM) model: it has no 'W2' tensor; Cellpose 3 models "
            f"(cyto3, nuclei) do not fit this network"
        )
    # Older CP4 files may lack the diameter statistics; cellpose loads non-strictly for that reason.
    for key in ("diam_labels", "diam_mean"):
        state.setdefault(key, torch.tensor([30.0]))
    net: Any = _cpsam_skeleton(backbone)  # a cellpose BaseModel: its dtype setter casts the weights
    try:
        net.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as err:
        raise WeightsError(
            f"{path} does not fit segment.cellpose.backbone={backbone!r} (the official cpsam weights need "
            f"vit_l): {str(err)[:600]}"
        ) from err
    net.to(device)
    net.dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return net.eval()


@functools.lru_cache(maxsize=1)
def _model(path: str, backbone: str, device: str) -> Any:
    """One ``CellposeModel`` per process (the last configuration used), loaded once, never downloaded."""
    logging.getLogger("cellpose.vit").setLevel(logging.ERROR)  # its optional-DINOv3 import warning is noise
    from cellpose.models import CellposeModel

    torch_device = torch.device(device)
    # __init__ is skipped on purpose (it downloads); these are the attributes eval() reads.
    model = CellposeModel.__new__(CellposeModel)
    model.device = torch_device
    model.gpu = torch_device.type == "cuda"
    model.pretrained_model = path
    model.backbone = "sam_vitl"  # cellpose's name for the CPSAM family: 256-px tiles
    model.net = load_network(path, backbone, torch_device)
    return model


def locate_weights(weights: str | None) -> Path:
    """The Cellpose-SAM weights file: the config value, ``$CELLPOSE_LOCAL_MODELS_PATH``, then ``/kaggle/input``."""
    return _located(weights, os.environ.get(ENV_VAR))


@functools.lru_cache(maxsize=8)
def _located(weights: str | None, env_value: str | None) -> Path:
    # The search globs /kaggle/input a few levels deep: once per process, not per image. The variable's
    # value is part of the key; failures are not cached, so weights attached later are still found.
    return find_weights(weights, ENV_VAR, WEIGHT_PATTERNS, config_key=CONFIG_KEY, example=EXAMPLE)


def weights_files(cfg: SegmentConfig) -> tuple[Path, ...]:
    """The Cellpose-SAM weights file ``cfg`` names (``weakcell.segment.WEIGHTS_OF``)."""
    return (locate_weights(cfg.cellpose.weights),)


def network_input(image: np.ndarray, cytoplasm_channels: Sequence[str]) -> np.ndarray:
    """``(4, h, w)`` uint8 -> ``(h, w, 3)`` float32: cell body (mean of the cytoplasm channels), nucleus
    (blue), empty. Cellpose normalises each channel to its 1st-99th percentiles itself."""
    body = np.mean([image[CHANNELS.index(name)] for name in cytoplasm_channels], axis=0, dtype=np.float32)
    nucleus = image[CHANNELS.index("blue")].astype(np.float32)
    return np.stack([body, nucleus, np.zeros_like(body)], axis=-1)


def prepare(image: np.ndarray, cfg: SegmentConfig) -> NetworkInput:
    """The network input of one ``(4, H, W)`` uint8 image (CPU): resized to ``working_scale``, ``(h, w, 3)``."""
    settings = cfg.cellpose
    return NetworkInput(
        (network_input(resize_image(image, settings.working_scale), settings.cytoplasm_channels),)
    )


def predict(inputs: Sequence[NetworkInput], cfg: SegmentConfig) -> list[np.ndarray]:
    """Masks at working scale, int32, of each input: Cellpose-SAM's network and its flow following, in the
    process that holds the model (cellpose tiles each image into ``batch_size`` tiles per forward pass)."""
    settings = cfg.cellpose
    with starting(cfg.backend, "Cellpose-SAM"):  # the configuration's fault, not an image's: stops the stage
        path = locate_weights(settings.weights)  # fails at once, before any model is built
        model = _model(str(path.resolve()), settings.backbone, str(resolve_device(settings.device)))
    diameter = settings.diameter * settings.working_scale if settings.diameter else None
    masks = []
    for item in inputs:
        labels, _, _ = model.eval(
            item.arrays[0],
            channel_axis=-1,
            diameter=diameter,
            batch_size=settings.batch_size,
            flow_threshold=settings.flow_threshold,
            cellprob_threshold=settings.cellprob_threshold,
            min_size=settings.min_size,
        )
        masks.append(np.asarray(labels, dtype=np.int32))
    return masks


def finish(image: np.ndarray, item: NetworkInput, masks: np.ndarray, cfg: SegmentConfig) -> Segmentation:
    """Masks back to full resolution, nuclei from the blue plane inside each cell (CPU)."""
    cells = resize_labels(masks, image.shape[1:])
    return Segmentation(cells=cells, nuclei=nuclei_in_cells(image[CHANNELS.index("blue")], cells))


STAGE = NetworkStage(
    prepare,
    predict,
    finish,
    batch_size=lambda cfg: cfg.cellpose.batch_size,
    device=lambda cfg: cfg.cellpose.device,
    ready=lambda cfg: locate_weights(cfg.cellpose.weights),
)
segment = STAGE.segment  # the registry's Segmenter: one image, masks at full resolution
