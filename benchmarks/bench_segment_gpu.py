"""Learned segmentation backends on a GPU: network throughput by batch size and the batched cache end to end.

For a GPU machine (no weights needed: timing only, with the thresholding U-Nets of the tests and a random
Cellpose-SAM ViT-L when cellpose is installed). From the repository root, with ``../shared/data/hpa2021``:

    python benchmarks/bench_segment_gpu.py [--images 48] [--batches 1,4,8,16,32] [--workers 4,8,16]

1. Network alone (``NetworkStage.predict``, CUDA-synchronised): images/s and peak GPU memory per batch size,
   for HPA-Cell-Segmentation (both U-Nets, 576² inputs of 2048² images) and Cellpose-SAM.
2. ``make cache``'s loop (``weakcell.cache.build.cache_images``) over ``--images`` copies of the real images
   at 1728², 2048² and 3072² (``segment.reference_size=2048``: every size gets the same network input, so
   batches fill): images/s by number of CPU workers, the network in the parent.
Writes ``benchmarks/segmentation_gpu.md``.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.hpacellseg_models import save_weights, thresholding_state  # noqa: E402

from weakcell.cache import build  # noqa: E402
from weakcell.config import load_config  # noqa: E402
from weakcell.data.images import list_image_ids, read_image, write_image  # noqa: E402
from weakcell.segment import for_image  # noqa: E402
from weakcell.segment.batched import network_stage  # noqa: E402

HPA_DIR = REPO.parent / "shared" / "data" / "hpa2021"
OUTPUT = REPO / "benchmarks" / "segmentation_gpu.md"
SIDES = (1728, 2048, 3072)


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def backend_overrides(folder: Path) -> dict[str, list[str]]:
    """Config overrides of each backend, with weights made in ``folder``."""
    found = {
        "hpacellseg": [
            f"segment.hpacellseg.weights={save_weights(folder / 'hpa', thresholding_state(), thresholding_state())}"
        ]
    }
    try:
        from cellpose.vit import CPSAM  # noqa: F401

        from weakcell.segment.cellpose_backend import _cpsam_skeleton

        net = _cpsam_skeleton("vit_l").to_empty(device="cpu")
        for parameter in net.parameters():
            torch.nn.init.normal_(parameter, std=0.02)
        (folder / "cellpose").mkdir()
        torch.save(net.state_dict(), folder / "cellpose" / "cpsam")
        found["cellpose"] = [f"segment.cellpose.weights={folder / 'cellpose' / 'cpsam'}"]
    except ImportError:
        pass
    return found


def network_throughput(
    name: str, overrides: list[str], image: np.ndarray, batch_sizes: list[int]
) -> list[list[str]]:
    cfg = load_config(None, [f"segment.backend={name}", "segment.reference_size=2048", *overrides]).segment
    stage = network_stage(cfg)
    assert stage is not None
    image_cfg = for_image(cfg, image.shape[1:])
    item = stage.prepare(image, image_cfg)
    stage.predict([item], image_cfg)  # loads the model, warms the kernels up
    rows = []
    for size in batch_sizes:
        torch.cuda.reset_peak_memory_stats()
        batch = [item] * size
        stage.predict(batch, image_cfg)
        torch.cuda.synchronize()
        start, rounds = time.perf_counter(), max(1, 32 // size)
        for _ in range(rounds):
            stage.predict(batch, image_cfg)
        torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / rounds
        shape = "x".join(str(side) for side in item.arrays[0].shape[-2:])
        rows.append(
            [
                name,
                shape,
                f"{size}",
                f"{size / seconds:.1f}",
                f"{torch.cuda.max_memory_allocated() / 2**30:.1f}",
            ]
        )
    return rows


def cache_throughput(
    name: str, overrides: list[str], count: int, workers: list[int], tmp: Path
) -> list[list[str]]:
    data = tmp / "data"
    ids = list_image_ids(HPA_DIR / "train")
    names = []
    for index in range(count):
        image_id, side = ids[index % len(ids)], SIDES[index % len(SIDES)]
        image = read_image(HPA_DIR / "train", image_id)
        name_ = f"{image_id[:-4]}{index:04d}"
        write_image(
            data / "train",
            name_,
            np.stack([cv2.resize(p, (side, side), interpolation=cv2.INTER_AREA) for p in image]),
        )
        names.append(name_)
    pd.DataFrame({"ID": names, "Label": ["0"] * count}).to_csv(data / "train.csv", index=False)
    rows = []
    for n in workers:
        root = tmp / f"run{n}"
        cfg = load_config(
            None,
            [
                f"paths.root={root}",
                "data.dataset=hpa2021",
                f"data.dir={data}",
                "cache.splits=[train]",
                f"cache.workers={n}",
                f"segment.backend={name}",
                "segment.reference_size=2048",
                *overrides,
            ],
        )
        tasks = build.plan_images(cfg)
        (cfg.cache_dir / "masks").mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        cells = sum(len(result.cells) for result in build.cache_images(tasks, cfg, cfg.cache_dir, n))
        seconds = time.perf_counter() - start
        rows.append([name, f"{n}", f"{count}", f"{seconds:.1f}", f"{count / seconds:.2f}", f"{cells}"])
        shutil.rmtree(root)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--batches", default="1,4,8,16,32")
    parser.add_argument("--workers", default="4,8,16")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit(
            "no CUDA GPU: this benchmark is for a GPU machine (bench_segment_backends.py is the CPU one)"
        )
    batch_sizes = [int(b) for b in args.batches.split(",")]
    workers = [int(w) for w in args.workers.split(",")]
    image = read_image(HPA_DIR / "train", list_image_ids(HPA_DIR / "train")[0])
    with tempfile.TemporaryDirectory() as tmp:
        backends = backend_overrides(Path(tmp))
        network_rows, cache_rows = [], []
        for name, overrides in backends.items():
            network_rows += network_throughput(name, overrides, image, batch_sizes)
            cache_rows += cache_throughput(name, overrides, args.images, workers, Path(tmp) / name)
    report = "\n".join(
        [
            "# Segmentation on a GPU\n",
            f"`python benchmarks/bench_segment_gpu.py --images {args.images} --batches {args.batches} --workers "
            f"{args.workers}` on {torch.cuda.get_device_name()}, {platform.processor() or platform.machine()}, torch "
            f"{torch.__version__}; weights made by the tests (timing only).\n",
            "## 1. Network alone\n",
            table(["backend", "input", "batch", "images/s", "peak GiB"], network_rows),
            "",
            "## 2. The cache, network in the parent, workers decode and finish\n",
            table(["backend", "workers", "images", "seconds", "images/s", "cells"], cache_rows),
            "",
        ]
    )
    print(report)
    OUTPUT.write_text(report)
    print(f"wrote {OUTPUT.relative_to(REPO)}")


if __name__ == "__main__":
    main()
