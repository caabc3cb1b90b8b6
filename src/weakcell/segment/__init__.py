"""Cell segmentation backends behind one registry.

``segment.backend`` names a segmenter, optionally followed by ``+``-joined refiners
(``classical``, ``cellpose``, ``hpacellseg``, ``cellpose+sam``). Backends are imported only when used, so
cellpose / segment-anything are never loaded for the classical default. Every result goes through the
same ``postprocess`` rules.

Backends built around a network also register a ``NetworkStage`` (``weakcell.segment.batched``): the
cache then runs the network in one process, on batches, and everything else in CPU workers.

Sizes are resolution-aware: with ``segment.reference_size`` set, ``for_image`` rescales every pixel size and
working scale of the config to the image at hand (an image twice the reference side gets nuclei twice as
wide and half the working scale), so 1728², 2048², 3072² and 4096² images of the same field give the same
cells.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from weakcell.config import SegmentConfig
from weakcell.errors import BackendError, UnknownName, WeakcellError


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
    "hpacellseg": "weakcell.segment.hpacellseg.backend:segment",
}
REFINERS: dict[str, str] = {
    "sam": "weakcell.segment.sam_refine:refine",
}
# Segmenters built around a network: name -> "module:attribute" of their ``NetworkStage``.
NETWORK_STAGES: dict[str, str] = {
    "cellpose": "weakcell.segment.cellpose_backend:STAGE",
    "hpacellseg": "weakcell.segment.hpacellseg.backend:STAGE",
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


def refiners_of(cfg: SegmentConfig) -> list[Refiner]:
    """The configured refiners, in order."""
    return [_load(REFINERS, name, "refiner") for name in parse_backend(cfg.backend)[1]]


# -- resolution-aware sizes ------------------------------------------------------------------------------------

# Config fields (section, field) that are lengths in full-resolution pixels, areas in them, or fractions of
# full resolution; ``for_image`` multiplies them by the size factor f, f², 1 / f.
LENGTHS = (("classical", "nucleus_diameter"), ("cellpose", "diameter"))
AREAS = (("postprocess", "min_cell_area"),)
SCALES = (
    ("classical", "working_scale"),
    ("cellpose", "working_scale"),
    ("sam", "working_scale"),
    ("hpacellseg", "network_scale"),
    ("hpacellseg", "label_scale"),
)


def size_factor(shape: tuple[int, ...], reference_size: int | None) -> float:
    """Pixels of an image of ``shape`` (H, W) per pixel of the reference image: its side (the geometric mean
    of height and width) over ``reference_size``; 1 when sizes are absolute (``None``)."""
    if reference_size is None:
        return 1.0
    return math.sqrt(shape[0] * shape[1]) / reference_size


def for_image(cfg: SegmentConfig, shape: tuple[int, ...]) -> SegmentConfig:
    """``cfg`` with every pixel size and working scale rescaled to an image of ``shape`` (H, W), see
    ``size_factor``; ``cfg`` itself when the factor is 1. A scale never exceeds full resolution."""
    factor = size_factor(shape, cfg.reference_size)
    if factor == 1:
        return cfg
    sections: dict[str, dict[str, object]] = {}
    for fields, change in (
        (LENGTHS, lambda value: value * factor),
        (AREAS, lambda value: round(value * factor * factor)),
        (SCALES, lambda value: min(1.0, value / factor)),
    ):
        for section, field in fields:
            value = getattr(getattr(cfg, section), field)
            if value is not None:
                sections.setdefault(section, {})[field] = change(value)
    return cfg.model_copy(
        update={name: getattr(cfg, name).model_copy(update=values) for name, values in sections.items()}
    )


# -- can the backend start -------------------------------------------------------------------------------------

# Parts that read weights files: name -> "module:function" taking the SegmentConfig, returning the files
# (FileNotFoundError listing where it looked when one is missing).
WEIGHTS_OF: dict[str, str] = {
    "cellpose": "weakcell.segment.cellpose_backend:weights_files",
    "hpacellseg": "weakcell.segment.hpacellseg.backend:weights_files",
    "sam": "weakcell.segment.sam_refine:weights_files",
}


def backend_weights(cfg: SegmentConfig) -> dict[str, tuple[Path, ...] | FileNotFoundError]:
    """Each weights-reading part of ``cfg.backend`` -> its weights files, or the error of looking for them
    (every part is looked for, so all missing files are named at once). Unknown names raise UnknownName."""
    first, refiners = parse_backend(cfg.backend)
    found: dict[str, tuple[Path, ...] | FileNotFoundError] = {}
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


@contextmanager
def starting(backend: str, what: str) -> Iterator[None]:
    """Faults while a backend starts (a weights file missing or unreadable, a model that fails to load) are
    the configuration's, not an image's: raised as one ``BackendError`` that stops the stage."""
    try:
        yield
    except BackendError:
        raise
    except (OSError, WeakcellError) as err:
        raise BackendError(f"segment.backend={backend!r} cannot start ({what}): {err}") from err


def segment_image(image: np.ndarray, cfg: SegmentConfig) -> Segmentation:
    """Segment one ``(4, H, W)`` uint8 image with the configured backend, refiners and post-processing,
    at sizes rescaled to the image (``for_image``)."""
    from weakcell.segment.postprocess import postprocess

    cfg = for_image(cfg, image.shape[1:])
    try:
        first, _ = parse_backend(cfg.backend)
    except UnknownName as err:  # the configuration's fault, not the image's
        raise BackendError(f"segment.backend={cfg.backend!r} cannot start: {err}") from None
    result = _load(SEGMENTERS, first, "segmentation backend")(image, cfg)
    for refine in refiners_of(cfg):
        result = refine(image, result, cfg)
    return postprocess(result, cfg.postprocess)
