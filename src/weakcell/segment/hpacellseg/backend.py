"""HPA-Cell-Segmentation as a segmentation backend (``segment.backend=hpacellseg``), from local files only.

The organisers' pipeline (``hpacellseg.cellsegmentator.CellSegmentator`` + ``utils.label_cell``), per image:

1. ``prepare`` (CPU worker): the nuclei input is the blue plane three times, the cell input red, yellow, blue
   (the 2-channel model: red, zeros, blue); each rescaled to ``network_scale`` as upstream does
   (``skimage.transform.rescale``: Gaussian anti-aliasing, bilinear), padded by 32 reflected pixels and to
   a multiple of 32 (``padding``), normalised with upstream's mean and std, float32 ``(3, h, w)``;
2. ``predict`` (the process holding the two U-Nets): a batch of inputs through each network, softmax;
3. ``finish`` (CPU worker): padding cropped, channel 0 zeroed, resized (``INTER_AREA``) to ``label_scale``
   and quantised to uint8 in upstream's order (the nuclei map before resizing, the cell map after), then
   ``label_cell`` with sizes scaled to that resolution; labels back to full resolution.

At ``network_scale=0.25``, ``label_scale=1`` this is upstream's procedure with ``padding=True``, the setting
the organisers recommended for the challenge. Weights: ``segment.hpacellseg.weights`` (a folder), else
``$WEAKCELL_HPACELLSEG_WEIGHTS``, else ``/kaggle/input/*``, holding ``dpn_unet_nuclei_v1`` and the cell
model as ``.safetensors`` (``make weights`` converts the published files) or as the published whole-model
``.pth``, read by the restricted unpickler of ``weakcell.segment.hpacellseg.pickles`` (no pickled code
runs).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch

from weakcell.config import HpaCellSegConfig, SegmentConfig
from weakcell.constants import CHANNELS
from weakcell.devices import resolve_device
from weakcell.segment import Segmentation, size_factor, starting
from weakcell.segment.batched import NetworkInput, NetworkStage
from weakcell.segment.cellpose_backend import resize_labels
from weakcell.segment.hpacellseg.labels import label_cell
from weakcell.segment.hpacellseg.network import DPNUnet
from weakcell.weights import WeightsError, find_weights, load_state_dict

ENV_VAR = "WEAKCELL_HPACELLSEG_WEIGHTS"
CONFIG_KEY = "segment.hpacellseg.weights"
EXAMPLE = "/kaggle/input/hpa-cell-segmentation"
NUCLEI_MODEL = "dpn_unet_nuclei_v1"
CELL_MODELS = {"3ch": "dpn_unet_cell_3ch_v1", "2ch": "dpn_unet_cell_v2"}
# Upstream's input normalisation (``cellsegmentator.NORMALIZE``), float32 as torch applies it.
MEAN = np.array([124 / 255, 117 / 255, 104 / 255], dtype=np.float32)
STD = np.array([1 / (0.0167 * 255)] * 3, dtype=np.float32)
PAD = 32  # upstream pads 32 px on top / left and up to the next multiple of 32 on the bottom / right


def model_files(settings: HpaCellSegConfig) -> tuple[str, str]:
    """The (nuclei, cell) model names of the configuration, without extension."""
    return NUCLEI_MODEL, CELL_MODELS[settings.cell_model]


def weight_patterns(stem: str) -> tuple[str, ...]:
    return (f"{stem}.safetensors", f"{stem}.pth")


def locate_weights(settings: HpaCellSegConfig) -> tuple[Path, Path]:
    """The nuclei and cell model files; when one is missing, one error naming every missing file and
    every place searched."""
    return _located(settings.weights, settings.cell_model, os.environ.get(ENV_VAR))


@functools.lru_cache(maxsize=8)
def _located(weights: str | None, cell_model: str, env_value: str | None) -> tuple[Path, Path]:
    found, missing = [], []
    for stem in (NUCLEI_MODEL, CELL_MODELS[cell_model]):
        try:
            found.append(
                find_weights(weights, ENV_VAR, weight_patterns(stem), config_key=CONFIG_KEY, example=EXAMPLE)
            )
        except FileNotFoundError as err:
            missing.append(str(err))
    if missing:
        raise FileNotFoundError(
            " | ".join(missing) + " (`make weights` with weights.fetch=[hpacellseg] writes them)"
        )
    return found[0], found[1]


def read_state(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a model file: safetensors, or a published whole-model pickle / state dict read without
    running pickled code."""
    if path.suffix == ".safetensors":
        return load_state_dict(path)
    from weakcell.segment.hpacellseg.pickles import load_whole_model

    return load_whole_model(path)


def load_network(path: Path, device: torch.device) -> DPNUnet:
    """A ``DPNUnet`` holding the tensors of ``path``, on ``device``, in eval mode."""
    state = read_state(path)
    with torch.device("meta"):  # no memory and no random init for tensors about to be replaced
        network = DPNUnet()
    try:
        network.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as err:
        first = " ".join(line.strip() for line in str(err).splitlines())[:300]
        raise WeightsError(
            f"{path} does not fit HPA-Cell-Segmentation's DPN-92 U-Net ({first}); use the published "
            "dpn_unet_*.pth files (Zenodo record 4665863) or their conversion by `make weights`"
        ) from err
    return network.to(device).eval()


@functools.lru_cache(maxsize=1)
def _networks(nuclei: str, cell: str, device: str) -> tuple[DPNUnet, DPNUnet]:
    """Both U-Nets, loaded once per process (the last configuration used)."""
    torch_device = torch.device(device)
    return load_network(Path(nuclei), torch_device), load_network(Path(cell), torch_device)


def weights_files(cfg: SegmentConfig) -> tuple[Path, ...]:
    """The nuclei and cell model files ``cfg`` names (``weakcell.segment.WEIGHTS_OF``)."""
    return locate_weights(cfg.hpacellseg)


def networks(settings: HpaCellSegConfig) -> tuple[DPNUnet, DPNUnet]:
    """Both U-Nets; a missing or unreadable file is a fault of the configuration, not of an image: it
    stops the stage (``BackendError``)."""
    with starting("hpacellseg", "HPA-Cell-Segmentation"):
        nuclei, cell = locate_weights(settings)  # fails at once, before anything is built
        return _networks(str(nuclei.resolve()), str(cell.resolve()), str(resolve_device(settings.device)))


# -- the three steps -------------------------------------------------------------------------------------------


def _rescale(planes: np.ndarray, scale: float) -> np.ndarray:
    """``(h, w, C)`` float64 in [0, 1]: upstream's ``skimage.transform.rescale`` of ``(H, W, C)`` uint8."""
    from skimage.transform import rescale

    if scale == 1:
        return planes.astype(np.float64) / 255
    return rescale(planes, scale, channel_axis=-1)


def _network_input(planes: np.ndarray, settings: HpaCellSegConfig) -> tuple[np.ndarray, tuple[int, int]]:
    """``(3, h', w')`` float32 normalised input of ``(H, W, 3)`` uint8 planes (or ``(H, W, 1)``, used for
    all three channels), and the unpadded (h, w)."""
    scaled = _rescale(planes, settings.network_scale)
    if scaled.shape[2] == 1:  # the same plane thrice: resampled once
        scaled = np.repeat(scaled, 3, axis=2)
    rows, cols = scaled.shape[:2]
    if settings.padding:
        scaled = cv2.copyMakeBorder(scaled, PAD, PAD - rows % PAD, PAD, PAD - cols % PAD, cv2.BORDER_REFLECT)
    else:  # the U-Net needs sides divisible by 32: the least reflected border that gives them
        scaled = cv2.copyMakeBorder(scaled, 0, -rows % PAD, 0, -cols % PAD, cv2.BORDER_REFLECT)
    normalised = (scaled.astype(np.float32) - MEAN) / STD
    return np.ascontiguousarray(normalised.transpose(2, 0, 1)), (rows, cols)


def prepare(image: np.ndarray, cfg: SegmentConfig) -> NetworkInput:
    """Step 1 for one ``(4, H, W)`` uint8 image (CPU)."""
    settings = cfg.hpacellseg
    red, yellow, blue = (image[CHANNELS.index(name)] for name in ("red", "yellow", "blue"))
    nuclei, size = _network_input(blue[:, :, None], settings)
    middle = yellow if settings.cell_model == "3ch" else np.zeros_like(yellow)
    cells, _ = _network_input(np.dstack([red, middle, blue]), settings)
    return NetworkInput((nuclei, cells), context=size)


def predict(inputs: Sequence[NetworkInput], cfg: SegmentConfig) -> list[tuple[np.ndarray, np.ndarray]]:
    """Step 2: ``(nuclei, cell)`` softmax maps, float32 ``(3, h', w')`` each, of same-shape inputs."""
    nuclei_net, cell_net = networks(cfg.hpacellseg)
    device = next(nuclei_net.parameters()).device
    maps = []
    with torch.inference_mode():
        for index, network in enumerate((nuclei_net, cell_net)):
            batch = torch.from_numpy(np.stack([item.arrays[index] for item in inputs])).to(device)
            maps.append(torch.softmax(network(batch), dim=1).float().cpu().numpy())
    return list(zip(maps[0], maps[1]))


def _restore(
    probabilities: np.ndarray, size: tuple[int, int], padded: bool, shape: tuple[int, int]
) -> np.ndarray:
    """Upstream's ``_restore_scaling_padding``: ``(h, w, 3)`` cropped out of the padding, channel 0 zeroed,
    resized to ``shape`` (H, W) with ``INTER_AREA``."""
    start = PAD if padded else 0
    restored = probabilities.transpose(1, 2, 0)[start : start + size[0], start : start + size[1]].copy()
    restored[..., 0] = 0
    if restored.shape[:2] != shape:
        restored = cv2.resize(restored, (shape[1], shape[0]), interpolation=cv2.INTER_AREA)
    return restored


def network_maps(
    output: tuple[np.ndarray, np.ndarray], size: tuple[int, int], padded: bool, shape: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """uint8 ``(H, W, 3)`` nuclei and cell maps at ``shape``, quantised as upstream does: the nuclei map
    before resizing, the cell map after."""
    from skimage.util import img_as_ubyte

    nuclei, cells = (np.clip(probabilities, 0, 1) for probabilities in output)
    nuclei_map = _restore(img_as_ubyte(nuclei), size, padded, shape)
    cell_map = img_as_ubyte(_restore(cells, size, padded, shape))
    return nuclei_map, cell_map


def finish(
    image: np.ndarray, item: NetworkInput, output: tuple[np.ndarray, np.ndarray], cfg: SegmentConfig
) -> Segmentation:
    """Step 3 (CPU): labels at ``label_scale``, back to full resolution."""
    settings = cfg.hpacellseg
    full = image.shape[1:]
    shape = (max(1, round(full[0] * settings.label_scale)), max(1, round(full[1] * settings.label_scale)))
    nuclei_map, cell_map = network_maps(output, item.context, settings.padding, shape)
    # Upstream's sizes hold at the reference resolution: these maps have label_scale x (image / reference).
    scale = settings.label_scale * size_factor(full, cfg.reference_size)
    nuclei, cells = label_cell(nuclei_map, cell_map, scale=scale)
    if shape != full:
        nuclei, cells = resize_labels(nuclei, full), resize_labels(cells, full)
    return Segmentation(cells=cells, nuclei=nuclei)


STAGE = NetworkStage(
    prepare,
    predict,
    finish,
    batch_size=lambda cfg: cfg.hpacellseg.batch_size,
    device=lambda cfg: cfg.hpacellseg.device,
    ready=lambda cfg: networks(cfg.hpacellseg),
)
segment = STAGE.segment  # the registry's Segmenter: one image, masks at full resolution
