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

import numpy as np

from weakcell.config import SegmentConfig
from weakcell.errors import UnknownName


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


def segment_image(image: np.ndarray, cfg: SegmentConfig) -> Segmentation:
    """Segment one ``(4, H, W)`` uint8 image with the configured backend, refiners and post-processing."""
    from weakcell.segment.postprocess import postprocess

    first, refiners = parse_backend(cfg.backend)
    result = _load(SEGMENTERS, first, "segmentation backend")(image, cfg)
    for name in refiners:
        result = _load(REFINERS, name, "refiner")(image, result, cfg)
    return postprocess(result, cfg.postprocess)
