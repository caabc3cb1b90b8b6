"""Segment Anything refinement of first-pass cells (``segment.backend=cellpose+sam``), from a local
checkpoint only.

Weights: ``segment.sam.weights`` (a file, or a folder holding ``sam_<model_type>*.pth``), else
``$WEAKCELL_SAM_WEIGHTS``, else a Kaggle dataset under ``/kaggle/input/*``. The network is built empty
(meta device) with ``sam_model_registry[model_type]`` and filled by ``weakcell.weights.load_state_dict``
(weights-only), so a checkpoint never runs code and nothing is downloaded.

Per image, at ``working_scale`` (0.5: a 2048 px image becomes 1024 px, the size SAM's encoder reads, so
nothing is resampled twice):
1. One image embedding of the composite red (microtubules) / yellow (ER) / blue (nucleus) as RGB: the
   channels that outline cell bodies.
2. Each first-pass cell's bounding box is a prompt; boxes are decoded ``box_batch_size`` at a time and the
   mask with the best predicted IoU of SAM's three is kept.
3. A SAM mask may only take the cell's own first-pass pixels and background (never another cell's
   pixels) within its box plus a margin; where two grown cells meet in former background the higher
   predicted IoU wins.
4. When SAM's mask is empty or agrees with the first-pass cell less than ``min_iou``, the first-pass mask
   is kept: a box prompt that failed must not delete or deform a cell.
Cell ids are kept, so nuclei stay those of the first pass (clipped to the refined cell).
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage as ndi

from weakcell.config import SegmentConfig
from weakcell.constants import CHANNELS
from weakcell.devices import resolve_device
from weakcell.errors import StageError
from weakcell.segment import Segmentation, starting
from weakcell.segment.cellpose_backend import resize_image, resize_labels
from weakcell.weights import WeightsError, find_weights, load_state_dict

log = logging.getLogger(__name__)

ENV_VAR = "WEAKCELL_SAM_WEIGHTS"
CONFIG_KEY = "segment.sam.weights"
OFFICIAL_FILES = {
    "vit_b": "sam_vit_b_01ec64.pth",
    "vit_l": "sam_vit_l_0b3195.pth",
    "vit_h": "sam_vit_h_4b8939.pth",
}
COMPOSITE = ("red", "yellow", "blue")  # SAM's RGB input
WINDOW_MARGIN = 0.1  # a SAM mask is read within its box grown by this fraction of the box size per side


@dataclass
class Proposal:
    """SAM's answer for one first-pass cell, at working scale.

    window: (rows, cols) slices of the image the mask covers (the cell's box plus a margin).
    mask:   bool array of the window's shape.
    score:  SAM's predicted IoU of the mask.
    """

    cell_id: int
    window: tuple[slice, slice]
    mask: np.ndarray
    score: float


def weight_patterns(model_type: str) -> tuple[str, ...]:
    """File-name globs of a SAM checkpoint, e.g. the official ``sam_vit_b_01ec64.pth``."""
    return tuple(f"sam_{model_type}*{ext}" for ext in (".pth", ".pt", ".safetensors"))


def locate_weights(weights: str | None, model_type: str) -> Path:
    """The SAM checkpoint: the config value, ``$WEAKCELL_SAM_WEIGHTS``, then ``/kaggle/input``."""
    return _located(weights, model_type, os.environ.get(ENV_VAR))


@functools.lru_cache(maxsize=8)
def _located(weights: str | None, model_type: str, env_value: str | None) -> Path:
    # Searched once per process, not per image (see cellpose_backend._located).
    example = f"/kaggle/input/segment-anything/{OFFICIAL_FILES.get(model_type, f'sam_{model_type}.pth')}"
    return find_weights(weights, ENV_VAR, weight_patterns(model_type), config_key=CONFIG_KEY, example=example)


def weights_files(cfg: SegmentConfig) -> tuple[Path, ...]:
    """The SAM checkpoint ``cfg`` names (``weakcell.segment.WEIGHTS_OF``)."""
    return (locate_weights(cfg.sam.weights, cfg.sam.model_type),)


def load_sam(path: str | Path, model_type: str, device: torch.device) -> torch.nn.Module:
    """A ``segment_anything.Sam`` of ``model_type`` holding the tensors of ``path`` (weights-only)."""
    from segment_anything import sam_model_registry

    if model_type not in sam_model_registry:
        raise StageError(
            f"segment.sam.model_type={model_type!r} unknown; known: {sorted(sam_model_registry)}"
        )
    state = load_state_dict(path)
    with torch.device("meta"):  # no memory and no random init for tensors the file overwrites
        sam = sam_model_registry[model_type](None)
    try:
        sam.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as err:
        raise WeightsError(
            f"{path} does not fit segment.sam.model_type={model_type!r} (sam_vit_b_* needs vit_b, "
            f"sam_vit_l_* vit_l, sam_vit_h_* vit_h): {str(err)[:600]}"
        ) from err
    return sam.to(device).eval()


@functools.lru_cache(maxsize=1)
def _predictor(path: str, model_type: str, device: str) -> Any:
    """One ``SamPredictor`` per process (the last configuration used)."""
    from segment_anything import SamPredictor

    return SamPredictor(load_sam(path, model_type, torch.device(device)))


def cell_windows(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[tuple[slice, slice]]]:
    """Per cell of ``labels``: ids ``(N,)``, boxes ``(N, 4)`` float32 x0, y0, x1, y1 (pixel edges, SAM's
    convention) and windows (the box grown by ``WINDOW_MARGIN`` per side, clipped to the image)."""
    ids, boxes, windows = [], [], []
    height, width = labels.shape
    for index, found in enumerate(ndi.find_objects(labels)):
        if found is None:
            continue
        rows, cols = found
        ids.append(index + 1)
        boxes.append((cols.start, rows.start, cols.stop, rows.stop))
        pad_y = max(2, round(WINDOW_MARGIN * (rows.stop - rows.start)))
        pad_x = max(2, round(WINDOW_MARGIN * (cols.stop - cols.start)))
        windows.append(
            (
                slice(max(0, rows.start - pad_y), min(height, rows.stop + pad_y)),
                slice(max(0, cols.start - pad_x), min(width, cols.stop + pad_x)),
            )
        )
    return np.asarray(ids, dtype=np.int64), np.asarray(boxes, dtype=np.float32).reshape(-1, 4), windows


def merge_proposals(first: np.ndarray, proposals: list[Proposal], min_iou: float) -> tuple[np.ndarray, int]:
    """Combine SAM's masks with the first-pass labels ``first`` ``(h, w)``; returns the refined labels
    (same ids) and how many cells fell back to their first-pass mask.

    A proposal is clipped to its cell's territory (own pixels or background, inside its window); it
    replaces the cell when it is non-empty and its IoU with the first-pass mask is at least ``min_iou``.
    Accepted masks can only meet in former background, where the higher score wins.
    """
    refined = np.zeros_like(first)
    best = np.full(first.shape, -np.inf, dtype=np.float32)  # score of the cell owning each pixel
    fallbacks = 0
    for proposal in proposals:
        own = first[proposal.window] == proposal.cell_id
        mask = proposal.mask & (own | (first[proposal.window] == 0))
        union = np.count_nonzero(mask | own)
        iou = np.count_nonzero(mask & own) / union if union else 0.0
        score = proposal.score
        if iou < min_iou or not mask.any():
            # First-pass pixels are owned by this cell alone, so the score of a fallback never matters.
            mask, score, fallbacks = own, np.inf, fallbacks + 1
        take = mask & (score > best[proposal.window])
        refined[proposal.window][take] = proposal.cell_id
        best[proposal.window][take] = score
    return refined, fallbacks


def sam_composite(image: np.ndarray) -> np.ndarray:
    """``(4, h, w)`` uint8 -> ``(h, w, 3)`` uint8 RGB of the channels in ``COMPOSITE``."""
    return np.ascontiguousarray(np.stack([image[CHANNELS.index(name)] for name in COMPOSITE], axis=-1))


@torch.no_grad()
def propose(predictor: Any, image_rgb: np.ndarray, first: np.ndarray, batch_size: int) -> list[Proposal]:
    """SAM's best mask for the bounding box of every cell of ``first``; one image embedding."""
    ids, boxes, windows = cell_windows(first)
    if len(ids) == 0:
        return []
    predictor.set_image(image_rgb, image_format="RGB")
    proposals = []
    for start in range(0, len(ids), batch_size):
        chunk = torch.as_tensor(boxes[start : start + batch_size], device=predictor.device)
        prompts = predictor.transform.apply_boxes_torch(chunk, image_rgb.shape[:2])
        masks, scores, _ = predictor.predict_torch(None, None, boxes=prompts, multimask_output=True)
        best = scores.argmax(dim=1)  # masks: (n, 3, h, w) bool, scores: (n, 3) predicted IoU
        picked = masks[torch.arange(len(best), device=masks.device), best].cpu().numpy()
        for offset, mask in enumerate(picked):
            index = start + offset
            window = windows[index]
            proposals.append(
                Proposal(int(ids[index]), window, mask[window], float(scores[offset, best[offset]]))
            )
    predictor.reset_image()
    return proposals


def refine(image: np.ndarray, seg: Segmentation, cfg: SegmentConfig) -> Segmentation:
    """Refine the cells of ``seg`` on the ``(4, H, W)`` uint8 ``image`` with SAM box prompts; ids, shapes
    (full resolution) and dtype (int32) are those of ``seg``, nuclei are clipped to the refined cells."""
    settings = cfg.sam
    with starting(cfg.backend, "SAM"):  # the configuration's fault, not an image's: stops the stage
        path = locate_weights(settings.weights, settings.model_type)  # before any model is built
        predictor = _predictor(str(path.resolve()), settings.model_type, str(resolve_device(settings.device)))

    small = resize_image(image, settings.working_scale)
    first = resize_labels(seg.cells, small.shape[1:])
    proposals = propose(predictor, sam_composite(small), first, settings.box_batch_size)
    refined, fallbacks = merge_proposals(first, proposals, settings.min_iou)
    log.debug("sam: %d cells, %d kept their first-pass mask", len(proposals), fallbacks)

    cells = resize_labels(refined, seg.cells.shape).astype(np.int32)
    nuclei = np.where(cells == seg.nuclei, seg.nuclei, 0).astype(np.int32)
    return Segmentation(cells=cells, nuclei=nuclei)
