"""``train.augment``: the training augmentations as a list, each step a dict with a ``name``.

Two kinds of step, run in this order whatever their place in the list:

* batched, on the whole ``(B, 4, S, S)`` batch at once (``weakcell.cache.loader.augment_batch_``, ~1 ms per
  256 crops): ``symmetries`` (the 8 symmetries of the square) and ``gain`` (per-channel gain in
  ``[1 - limit, 1 + limit]``);
* per crop, any albumentations transform by class name with its keyword arguments, e.g.
  ``{name: Affine, scale: [0.9, 1.1], rotate: [-15, 15], p: 0.5}``, applied to each ``(S, S, 4)`` uint8
  crop in the DataLoader workers. ``per_channel: true`` applies the transform to each channel on its own
  (independent draws: per-channel brightness, contrast, gamma). Geometric transforms fill with 0, the
  masked crops' background.

Names are looked up among albumentations' transform classes only (nothing is evaluated). Each worker
process reseeds the per-crop transforms from torch's per-worker seed, so workers never repeat each other
and a run is reproducible from ``seed``.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from weakcell.config import ConfigError

BATCHED = ("symmetries", "gain")


@dataclass
class CropPipeline:
    """Per-crop albumentations steps: ``(transform, per_channel)`` pairs, applied in order."""

    steps: list[tuple[Any, bool]]
    _seeded_pid: int | None = field(default=None, repr=False)

    def __getstate__(self) -> dict[str, Any]:
        return {"steps": self.steps, "_seeded_pid": None}  # a worker reseeds its copy

    def _seed(self) -> None:
        """Reseed every step from torch's seed of this process (DataLoader workers get distinct ones)."""
        pid = os.getpid()
        if self._seeded_pid == pid:
            return
        base = torch.initial_seed() % 2**31
        for number, (transform, _) in enumerate(self.steps):
            transform.set_random_seed(base + number)
        self._seeded_pid = pid

    def __call__(self, crop: np.ndarray) -> np.ndarray:
        """Augment one ``(S, S, C)`` uint8 crop; returns a new ``(S, S, C)`` uint8 array."""
        self._seed()
        for transform, per_channel in self.steps:
            if per_channel:
                crop = np.stack(
                    [
                        transform(image=crop[..., c : c + 1])["image"].reshape(crop.shape[:2])
                        for c in range(crop.shape[2])
                    ],
                    axis=-1,
                )
            else:
                crop = transform(image=crop)["image"]
        return crop

    def apply_batch_(self, crops: np.ndarray) -> None:
        """Augment a ``(B, C, S, S)`` uint8 batch in place, crop by crop."""
        for i in range(len(crops)):
            crops[i] = self(np.ascontiguousarray(crops[i].transpose(1, 2, 0))).transpose(2, 0, 1)


@dataclass(frozen=True)
class CropAugment:
    """Batch augmentations of cell crops; every one keeps the crop's content and its value range. Built from
    ``train.augment`` by ``crop_augment``; applied by ``weakcell.cache.loader.augment_batch_``."""

    symmetries: bool = True  # random flips and 90° rotations: the 8 symmetries of the square
    intensity: float = 0.2  # per-channel gain drawn uniformly from [1 - intensity, 1 + intensity]
    pipeline: CropPipeline | None = None  # per-crop albumentations steps, after the batched ones

    def __post_init__(self) -> None:
        if not 0 <= self.intensity <= 1:
            raise ValueError(f"intensity jitter must be in [0, 1], got {self.intensity}")


def _albumentations_step(spec: dict[str, Any], where: str) -> tuple[Any, bool]:
    # albumentations asks PyPI for a newer version on import unless told not to: training is offline
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    import albumentations as A
    from albumentations.core.transforms_interface import BasicTransform

    name = str(spec["name"])
    cls = getattr(A, name, None)
    if not (isinstance(cls, type) and issubclass(cls, BasicTransform)):
        raise ConfigError(
            f"{where}: {name!r} is not an albumentations transform (batched steps: {', '.join(BATCHED)}; "
            "per-crop: albumentations class names such as Affine, RandomGamma, CoarseDropout)"
        )
    kwargs = {
        k: tuple(v) if isinstance(v, list) else v for k, v in spec.items() if k not in ("name", "per_channel")
    }
    accepted = inspect.signature(cls).parameters
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:  # albumentations only warns about them, and the step would silently run its defaults
        valid = ", ".join(p for p in accepted if p not in ("self", "args", "kwargs"))
        raise ConfigError(f"{where}: {name} takes no {', '.join(unknown)} (it takes {valid}, per_channel)")
    if "border_mode" in accepted and "border_mode" not in kwargs:
        kwargs["border_mode"] = 0  # cv2.BORDER_CONSTANT: the masked crops' background is 0
    try:
        transform = cls(**kwargs)
    except (TypeError, ValueError) as err:
        first = (str(err).strip().splitlines() or [""])[0][:300]
        raise ConfigError(f"{where}: {name}({kwargs}) is invalid: {first}") from err
    return transform, bool(spec.get("per_channel", False))


def crop_augment(specs: Sequence[dict[str, Any]]) -> CropAugment:
    """The training augmentation of ``train.augment`` (``[]``: one that changes nothing, so samplers that
    draw cells only when training, e.g. ``stage2.CropBags``, still do)."""
    symmetries, gain, pipeline = parse_augment(specs)
    return CropAugment(symmetries=symmetries, intensity=gain, pipeline=pipeline)


def parse_augment(specs: Sequence[dict[str, Any]]) -> tuple[bool, float, CropPipeline | None]:
    """``train.augment`` -> (symmetries on, gain limit (0 = off), per-crop pipeline or None)."""
    symmetries, gain, steps = False, 0.0, []
    for number, spec in enumerate(specs):
        where = f"train.augment[{number}]"
        name = spec.get("name")
        if not isinstance(name, str):
            raise ConfigError(f"{where}: each step needs a name, e.g. {{name: symmetries}}; got {spec}")
        if name == "symmetries":
            symmetries = True
        elif name == "gain":
            gain = float(spec.get("limit", 0.2))
            if not 0 <= gain <= 1:
                raise ConfigError(f"{where}: gain limit must be in [0, 1], got {gain}")
        else:
            steps.append(_albumentations_step(spec, where))
    return symmetries, gain, CropPipeline(steps) if steps else None
