"""Cell segmentation backends behind one registry.

``segment.backend`` names a segmenter, optionally followed by ``+``-joined refiners
(``classical``, ``cellpose``, ``cellpose+sam``). Backends are imported only when used, so
cellpose / segment-anything are never loaded for the classical default. Every result goes through the
same ``postprocess`` rules.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from weakcell.config import SegmentConfig
from weakcell.errors import BackendError, UnknownName


@dataclass
class Segmentation:
    """Instance masks at full image resolution.

    cells:  (H, W) int32, 0 = background, 1..n = cell instances.
    nuclei: (H, W) int32, the nucleus of cell k labelled k (0 elsewhere).
    """

    cells: np.ndarray
    nuclei: np.ndarray

    @property
    def n_cells(self) -> int:
        return int(self.cells.max(initial=0))


Segmenter = Callable[[np.ndarray, SegmentConfig], Segmentation]  # (4, H, W) uint8 image -> Segmentation
Refiner = Callable[[np.ndarray, Segmentation, SegmentConfig], Segmentation]

# name -> "module:function"; imported lazily.
SEGMENTERS: dict[str, str] = {
    "classical": "weakcell.segment.classical:segment",
    "cellpose": "weakcell.segment.cellpose_backend:segment",
}
REFINERS: dict[str, str] = {
    "sam": "weakcell.segment.sam_refine:refine",
}


def _load(registry: dict[str, str], name: str, kind: str) -> Callable[..., Segmentation]:
    if name not in registry:
        raise UnknownName(f"unknown {kind} {name!r}; known: {', '.join(sorted(registry))}")
    module, _, function = registry[name].partition(":")
    return getattr(importlib.import_module(module), function)


def parse_backend(backend: str) -> tuple[str, list[str]]:
    """``"cellpose+sam"`` -> ``("cellpose", ["sam"])``, checking every name against the registries."""
    first, *refiners = [part.strip() for part in backend.split("+")]
    _load(SEGMENTERS, first, "segmentation backend")
    for name in refiners:
        _load(REFINERS, name, "refiner")
    return first, refiners


# Parts that read a weights file: name -> "module:function" taking the SegmentConfig, returning the file
# (FileNotFoundError listing where it looked when there is none).
WEIGHTS_OF: dict[str, str] = {
    "cellpose": "weakcell.segment.cellpose_backend:weights_file",
    "sam": "weakcell.segment.sam_refine:weights_file",
}


def backend_weights(cfg: SegmentConfig) -> dict[str, Path | FileNotFoundError]:
    """Each weights-reading part of ``cfg.backend`` -> its weights file, or the error of looking for it
    (every part is looked for, so all missing files are named at once). Unknown names raise UnknownName."""
    first, refiners = parse_backend(cfg.backend)
    found: dict[str, Path | FileNotFoundError] = {}
    for part in (first, *refiners):
        if part in WEIGHTS_OF:
            module, _, function = WEIGHTS_OF[part].partition(":")
            try:
                found[part] = getattr(importlib.import_module(module), function)(cfg)
            except FileNotFoundError as err:
                found[part] = err
    return found


def check_backend(cfg: SegmentConfig) -> None:
    """Raise ``BackendError`` (one line naming every problem) unless ``cfg.backend`` can start: its names
    are registered and every weights file it reads is there. Loading the networks is left to the first
    image (a failure there is a ``BackendError`` too, raised by the backend)."""
    try:
        found = backend_weights(cfg)
    except UnknownName as err:
        raise BackendError(f"segment.backend={cfg.backend!r} cannot start: {err}") from None
    missing = [f"{part}: {error}" for part, error in found.items() if isinstance(error, FileNotFoundError)]
    if missing:
        raise BackendError(f"segment.backend={cfg.backend!r} cannot start: {' | '.join(missing)}")


def segment_image(image: np.ndarray, cfg: SegmentConfig) -> Segmentation:
    """Segment one ``(4, H, W)`` uint8 image with the configured backend, refiners and post-processing."""
    from weakcell.segment.postprocess import postprocess

    try:
        first, refiners = parse_backend(cfg.backend)
    except UnknownName as err:  # the configuration's fault, not the image's
        raise BackendError(f"segment.backend={cfg.backend!r} cannot start: {err}") from None
    result = _load(SEGMENTERS, first, "segmentation backend")(image, cfg)
    for name in refiners:
        result = _load(REFINERS, name, "refiner")(image, result, cfg)
    return postprocess(result, cfg.postprocess)
