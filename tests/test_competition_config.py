"""configs/competition.yaml resolves to the GPU settings the README describes (so neither drifts)."""

from __future__ import annotations

import importlib.util

from tests.conftest import REPO
from weakcell.config import load_config

EXPECTED = {
    "name": "competition",
    "data.dataset": "hpa2021",
    "folds.n_splits": 5,
    "segment.backend": "hpacellseg",
    "segment.reference_size": 2048,
    "segment.hpacellseg.weights": "weights",
    "segment.hpacellseg.batch_size": 16,
    "segment.cellpose.weights": "weights",
    "segment.sam.weights": "weights",
    "cache.crop_size": 128,
    "model.backbone": "resnet50",
    "model.pretrained_file": "weights",
    "train.epochs": 10,
    "train.batch_size": 256,
    "train.lr": 0.0005,
    "train.amp": "bf16",
    "train.channels_last": True,
    "train.workers": 8,
    "train.device": "cuda",
    "refine.rounds": 1,
    "weights.fetch": ["backbone", "hpacellseg"],
}


def resolved(overrides: list[str] | None = None) -> dict[str, object]:
    cfg = load_config(REPO / "configs" / "competition.yaml", overrides)
    values = {}
    for key in EXPECTED:
        node: object = cfg
        for part in key.split("."):
            node = getattr(node, part)
        values[key] = node
    return values


def test_competition_config_resolves_to_the_gpu_settings() -> None:
    assert resolved() == EXPECTED


def test_readme_describes_the_resolved_competition_config() -> None:
    values = resolved()
    row = next(
        line
        for line in (REPO / "README.md").read_text().splitlines()
        if line.startswith("| `configs/competition.yaml` |")
    )
    for text in (
        f"`{values['model.backbone']}` at {values['cache.crop_size']} px",
        f"ImageNet weights in `{values['model.pretrained_file']}/`",
        f"{values['train.amp']}, channels_last",
        f"batch {values['train.batch_size']}",
        f"{values['train.workers']} workers",
        f"{values['train.epochs']} epochs at lr {values['train.lr']}",
        f"{values['refine.rounds']} refinement round",
        f"`{values['segment.backend']}` segmentation",
    ):
        assert text in row, f"README's configs/competition.yaml row lacks {text!r}: {row}"


def test_the_gpu_benchmark_presets_resolve() -> None:
    """bench_pipeline_gpu --real-size and bench_train_gpu run the file on a machine without its weights."""
    spec = importlib.util.spec_from_file_location(
        "bench_pipeline_gpu", REPO / "benchmarks" / "bench_pipeline_gpu.py"
    )
    assert spec and spec.loader
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    cfg = load_config(REPO / "configs" / "competition.yaml", bench.REAL_SIZE)
    assert (cfg.data.dataset, cfg.synthetic.image_size, cfg.segment.backend) == (
        "synthetic",
        2048,
        "classical",
    )
    assert cfg.model.pretrained_file is None and cfg.model.backbone == "resnet50"
