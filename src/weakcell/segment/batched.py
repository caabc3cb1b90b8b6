"""Segmentation around a network, split so that one process owns the model and CPU workers do the rest.

A backend built around a network (``cellpose``, ``hpacellseg``) registers a ``NetworkStage`` of three
functions:

- ``prepare(image, cfg)`` (CPU worker): the network input of one image (resized, normalised, padded);
- ``predict(inputs, cfg)`` (the one process holding the model, on its device): outputs of a batch of inputs
  of one shape;
- ``finish(image, input, output, cfg)`` (CPU worker): the ``Segmentation`` (labelling, upscaling).

Inputs are batched only with inputs of the same shape: no image sees another's padding, so an image gets
the same masks in any batch (with ``segment.reference_size`` set every image has the same working shape, so
batches fill whatever the image sizes). ``segment_batch`` runs the three steps in this process, the path of
``segment_image`` and of the tests; ``weakcell.cache.batched`` runs ``prepare`` / ``finish`` in a pool of
workers around a bounded queue and ``predict`` in the parent. Refiners (``+sam``) hold models too: they run
in the parent after ``finish``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from weakcell.config import SegmentConfig
from weakcell.segment import NETWORK_STAGES, Segmentation, for_image, parse_backend, refiners_of, starting


@dataclass(frozen=True)
class NetworkInput:
    """What ``prepare`` hands to ``predict``: arrays the network reads (their shapes are the batch key) and
    whatever ``finish`` needs besides the image."""

    arrays: tuple[np.ndarray, ...]
    context: Any = None

    @property
    def key(self) -> tuple[tuple[int, ...], ...]:
        return tuple(array.shape for array in self.arrays)


@dataclass(frozen=True)
class NetworkStage:
    """A backend's segmentation split around its network (see the module doc)."""

    prepare: Callable[[np.ndarray, SegmentConfig], NetworkInput]
    predict: Callable[[Sequence[NetworkInput], SegmentConfig], list[Any]]
    finish: Callable[[np.ndarray, NetworkInput, Any, SegmentConfig], Segmentation]
    batch_size: Callable[[SegmentConfig], int]
    device: Callable[[SegmentConfig], str]  # the configured device (auto, cpu, cuda, cuda:N)
    ready: Callable[[SegmentConfig], object]  # fails at once when the weights are missing

    def segment(self, image: np.ndarray, cfg: SegmentConfig) -> Segmentation:
        """One ``(4, H, W)`` uint8 image through the three steps in this process (the backend's
        ``Segmenter``); a missing weights file fails before the image is resampled."""
        with starting(cfg.backend, "its weights"):
            self.ready(cfg)
        item = self.prepare(image, cfg)
        return self.finish(image, item, self.predict([item], cfg)[0], cfg)


def network_stage(cfg: SegmentConfig) -> NetworkStage | None:
    """The configured segmenter's ``NetworkStage``, None for one without a network (``classical``)."""
    first, _ = parse_backend(cfg.backend)
    if first not in NETWORK_STAGES:
        return None
    module, _, attribute = NETWORK_STAGES[first].partition(":")
    return getattr(importlib.import_module(module), attribute)


def runs_on_gpu(stage: NetworkStage, cfg: SegmentConfig) -> bool:
    """Whether the stage's network would run on a GPU here (``device: auto`` resolved)."""
    from weakcell.devices import resolve_device

    return resolve_device(stage.device(cfg)).type == "cuda"


def batches(keys: Sequence[Any], size: int) -> list[list[int]]:
    """Indices grouped by equal key, in order of first appearance, at most ``size`` per group."""
    groups: dict[Any, list[list[int]]] = {}
    for index, key in enumerate(keys):
        runs = groups.setdefault(key, [[]])
        if len(runs[-1]) == size:
            runs.append([])
        runs[-1].append(index)
    return [run for runs in groups.values() for run in runs]


def segment_batch(images: Sequence[np.ndarray], cfg: SegmentConfig) -> list[Segmentation]:
    """Segment ``(4, H, W)`` uint8 images with a network backend in this process: every input prepared,
    the network run on batches of equal shape, every result finished, refined and post-processed. Gives
    each image the masks ``segment_image`` gives it alone."""
    from weakcell.segment.postprocess import postprocess

    stage = network_stage(cfg)
    if stage is None:
        raise ValueError(f"segment.backend={cfg.backend!r} has no network stage to batch")
    configs = [for_image(cfg, image.shape[1:]) for image in images]
    inputs = [stage.prepare(image, image_cfg) for image, image_cfg in zip(images, configs)]
    outputs: list[Any] = [None] * len(images)
    for group in batches([item.key for item in inputs], stage.batch_size(cfg)):
        for index, output in zip(group, stage.predict([inputs[i] for i in group], configs[group[0]])):
            outputs[index] = output
    results = []
    for image, image_cfg, item, output in zip(images, configs, inputs, outputs):
        segmentation = stage.finish(image, item, output, image_cfg)
        for refine in refiners_of(image_cfg):
            segmentation = refine(image, segmentation, image_cfg)
        results.append(postprocess(segmentation, image_cfg.postprocess))
    return results
