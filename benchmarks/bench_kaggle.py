"""Wall time of the inference kernel's work per test image (`weakcell cache` of the test split, then
`weakcell infer`), measured on real-size HPA images, and its projection to the 559 images of the 2021 test
set on Kaggle. Writes benchmarks/kaggle.md.

Each model setting first gets a quick run (synthetic set, one epoch: the timing does not depend on how good
the weights are); then the kernel's two stages run as separate processes, as in the kernel, on a test folder
of the five real 2021 images in ../shared/data/hpa2021 (2048²) plus one copy resized to 3072² and one to
1728² (the test set's three sizes).

    python benchmarks/bench_kaggle.py [--variants demo,competition]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
REAL = REPO.parent / "shared" / "data" / "hpa2021"
OUT = REPO / "benchmarks" / "kaggle.md"
CHANNELS = ("red", "green", "blue", "yellow")
TEST_SIZES = {1728: 68, 2048: 462, 3072: 29}  # the 2021 test set (its sample_submission.csv): side -> images
KAGGLE_LIMIT_H = 9.0
QUICK_RUN = [
    "synthetic.n_train=12",
    "synthetic.n_test=0",
    "synthetic.image_size=256",
    "synthetic.cell_scale=0.15",
    "synthetic.cells_per_image=[3,6]",
    "segment.classical.nucleus_diameter=27",
    "segment.classical.working_scale=0.5",
    "train.epochs=1",
    "train.batch_size=16",
    "mil.batch_size=4",
    "mil.epochs=1",
    "refine.rounds=0",
    "data.dataset=synthetic",
    "data.dir=null",
]
VARIANTS = {
    "demo": ("configs/hpa2021.yaml", []),  # the demo's networks (hpa2021.yaml = demo + real-data settings)
    # the competition networks (ResNet-50 at 128 px) on the CPU: classical segmentation, random init
    "competition": (
        "configs/competition.yaml",
        ["segment.backend=classical", "model.pretrained_file=null", "train.device=auto", "train.amp=auto"],
    ),
}


def weakcell(stage: str, config: str, *overrides: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "weakcell", stage, config, *overrides], check=True, cwd=REPO)
    return time.perf_counter() - start


def test_folder(root: Path) -> list[tuple[str, int]]:
    """The real images as a 2021 test split, plus two resized copies; returns (ID, side) pairs."""
    test = root / "test"
    test.mkdir(parents=True)
    images = []
    ids = sorted(p.name[: -len("_red.png")] for p in (REAL / "train").glob("*_red.png"))
    for image_id in ids:
        for channel in CHANNELS:
            shutil.copy2(REAL / "train" / f"{image_id}_{channel}.png", test / f"{image_id}_{channel}.png")
        images.append((image_id, 2048))
    for side, source in ((3072, ids[0]), (1728, ids[1])):
        new_id = f"{source}-{side}"
        for channel in CHANNELS:
            plane = cv2.imread(str(REAL / "train" / f"{source}_{channel}.png"), cv2.IMREAD_UNCHANGED)
            cv2.imwrite(str(test / f"{new_id}_{channel}.png"), cv2.resize(plane, (side, side)))
        images.append((new_id, side))
    pd.DataFrame(
        {
            "ID": [i for i, _ in images],
            "ImageWidth": [s for _, s in images],
            "ImageHeight": [s for _, s in images],
            "PredictionString": "0 1 eNoLCAgIMAEABJkBdQ==",
        }
    ).to_csv(root / "sample_submission.csv", index=False)
    return images


def measure(name: str, config: str, extra: list[str], work: Path, real: Path, n_images: int) -> dict:
    root = work / name
    base = [f"paths.root={root}", f"name=bench-{name}", *extra]
    weakcell("data", config, *base, *QUICK_RUN)
    weakcell("folds", config, *base, *QUICK_RUN)
    weakcell("cache", config, *base, *QUICK_RUN)
    weakcell("train", config, *base, *QUICK_RUN)
    weakcell("thresholds", config, *base, *QUICK_RUN)
    kernel = [*base, "data.dataset=hpa2021", f"data.dir={real}", "refine.rounds=0"]
    cache_s = weakcell("cache", config, *kernel, "cache.splits=[test]")
    infer_s = weakcell("infer", config, *kernel, "infer.split=test")
    cells = pd.read_parquet(next((root / "cache" / "hpa2021").glob("*/cells.parquet")))
    return {"cache_s": cache_s, "infer_s": infer_s, "cells": len(cells), "images": n_images}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args()
    if not (REAL / "train").is_dir():
        raise SystemExit(f"needs the real 2021 images in {REAL}")
    load = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-kaggle-") as tmp:
        work = Path(tmp)
        images = test_folder(work / "real")
        area = sum(side**2 for _, side in images) / len(images)
        test_area = sum(side**2 * n for side, n in TEST_SIZES.items()) / sum(TEST_SIZES.values())
        rows = []
        for name in args.variants.split(","):
            config, extra = VARIANTS[name]
            result = measure(name, config, extra, work, work / "real", len(images))
            per_image = (result["cache_s"] + result["infer_s"]) / len(images)
            # the test set's mean image is (test_area / area) x ours: scale by pixels
            here_h = per_image * test_area / area * sum(TEST_SIZES.values()) / 3600
            rows.append((name, config, extra, result, per_image, here_h))
            print(name, result, f"{per_image:.2f} s/image, 559 images here: {here_h:.2f} h", flush=True)
    lines = [
        "# Kaggle runtime budget: the inference kernel's cache + infer per test image",
        "",
        f"`python benchmarks/bench_kaggle.py` on {platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, load average at the start {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} "
        "(other processes share these cores). Test folder: the 5 real 2021 images (2048²) + one resized to "
        "3072² and one to 1728²; wall time of `weakcell cache` (test split) and `weakcell infer` as separate "
        "processes, as the kernel runs them (interpreter start and imports included). Each model comes from a "
        "one-epoch run on the synthetic set: its speed, not its quality, is measured.",
        "",
        "| models | config | cells | cache s | infer s | s / image | 559 images here (2 cores, CPU) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, config, extra, result, per_image, here_h in rows:
        setting = f"`{config}`" + (f" `{' '.join(extra)}`" if extra else "")
        lines.append(
            f"| {name} | {setting} | {result['cells']} | {result['cache_s']:.1f} | {result['infer_s']:.1f} | "
            f"{per_image:.2f} | {here_h:.2f} h |"
        )
    lines += [
        "",
        f"Projection: the test set's mean image has {test_area / area:.2f}x the pixels of this folder's "
        "(68 x 1728², 462 x 2048², 29 x 3072²), and segmentation, masks and crops scale with pixels.",
    ]
    OUT.write_text("\n".join(lines) + "\n")
    print(f"-> {OUT}")


if __name__ == "__main__":
    main()
