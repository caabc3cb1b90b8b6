"""Cell-crop cache benchmark: building speed against PNG decoding, reading speed of the training input path,
and peak memory against the number of images. One core throughout.

Run from the repository root:

    python benchmarks/bench_cache.py [--repeats 5]

Sections (each skipped with a reason when its data is absent):
1. Build, real 2048² images (``../shared/data/hpa2021/train``): seconds per image end to end (read 4 PNGs,
   segment with the configured backend, write masks, cut crops) beside decoding the same 4 PNGs alone, with
   the split into its steps; the whole ``weakcell cache`` stage on those images; a 3072² image (a real one
   resized x1.5) with its time and peak memory in a fresh process.
2. Read, random batches of 256 crops at 64 px: the raw memmap read (the ceiling), the training input path
   (``CellCrops`` + ``CropAugment`` through a ``DataLoader``: read + augment + collate), and cutting the
   same crops out of the PNGs every time, as notebook pipelines do.
3. Peak RSS of a whole cache build for 20 vs 80 images (fresh processes).
Prints the tables and writes ``benchmarks/cache.md``.
"""

from __future__ import annotations

import os

# One core, as the benchmark promises: set before numpy / OpenCV / torch load their thread pools.
os.environ["OMP_NUM_THREADS"] = "1"
os.environ["OPENBLAS_NUM_THREADS"] = "1"
os.environ["MKL_NUM_THREADS"] = "1"

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from importlib.metadata import version
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

import weakcell.cache.build as build
from weakcell.cache.crops import cut_crops
from weakcell.cache.store import CellCache, read_masks
from weakcell.config import ClassicalSegmentConfig, Config, load_config
from weakcell.data.images import list_image_ids, read_image, write_image
from weakcell.segment import segment_image

REPO = Path(__file__).resolve().parents[1]
HPA_TRAIN = REPO.parent / "shared" / "data" / "hpa2021" / "train"
OUTPUT = REPO / "benchmarks" / "cache.md"
BATCH = 256
# CPU seconds of this process, not wall time: the benchmark runs single-threaded, and on a machine shared
# with other jobs wall time mostly measures them. ``--wall`` switches to wall time for an idle machine.
clock = time.process_time
CROP = 64
# Real 2048² HPA images need the backend's HPA defaults (nucleus ~180 px, working scale 0.125), not demo.yaml's
# synthetic-cell settings (45 px, 0.25), which over-segment them and cost ~3x the segmentation time.
HPA_SEGMENT = [
    f"segment.classical.{key}={getattr(ClassicalSegmentConfig(), key)}"
    for key in ("nucleus_diameter", "working_scale")
]


def median_seconds(work: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``repeats`` calls after one warm-up call (page cache, lazy imports)."""
    work()
    times = []
    for _ in range(repeats):
        start = clock()
        work()
        times.append(clock() - start)
    return statistics.median(times)


def config(*overrides: str) -> Config:
    return load_config(REPO / "configs" / "demo.yaml", ["cache.workers=1", *overrides])


def dataset_of(images: dict[str, Path], root: Path) -> Path:
    """An hpa2021-layout folder under ``root`` whose train/ links to the given images' channel files."""
    train = root / "train"
    train.mkdir(parents=True)
    for image_id, folder in images.items():
        for path in folder.glob(f"{image_id}_*.png"):
            (train / path.name).symlink_to(path.resolve())
    pd.DataFrame({"ID": list(images), "Label": "0"}).to_csv(root / "train.csv", index=False)
    return root


def peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over
    from the parent across fork + exec, so a child of a big parent would report the parent's size."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise OSError("no VmHWM in /proc/self/status (Linux only)")


def in_fresh_process(*args: str) -> dict[str, float]:
    """Run this script's ``--child`` mode and return what it reports (its own peak RSS included)."""
    out = subprocess.run(
        [sys.executable, __file__, *(["--wall"] if clock is time.perf_counter else []), "--child", *args],
        check=True,
        capture_output=True,
        text=True,
        cwd=REPO,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def child(args: list[str]) -> None:
    """``--child image FOLDER ID`` caches one image; ``--child build DATA_DIR CACHE_DIR`` runs the stage."""
    cv2.setNumThreads(1)
    before = peak_rss_mb()
    start = clock()
    if args[0] == "image":
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "masks").mkdir()
            build.cache_image(build.ImageTask(args[2], "train", args[1]), config(*HPA_SEGMENT), Path(tmp))
    else:
        build.run(config("data.dataset=hpa2021", f"data.dir={args[1]}", f"cache.dir={args[2]}", *args[3:]))
    seconds = clock() - start
    print(json.dumps({"seconds": seconds, "peak_rss_mb": peak_rss_mb(), "rss_after_imports_mb": before}))


# -- 1. build speed on real images -----------------------------------------------------------------------


def bench_build(repeats: int, lines: list[str]) -> None:
    lines.append("## 1. Building, real HPA 2021 images (2048², one core, `workers=1`)\n")
    if not HPA_TRAIN.is_dir():
        lines.append(f"Skipped: {HPA_TRAIN} is absent (../shared/data is not part of a plain clone).\n")
        return
    cfg = config(*HPA_SEGMENT)
    ids = list_image_ids(HPA_TRAIN)
    lines.append(
        f"Backend `{cfg.segment.backend}` with its HPA defaults (`{' '.join(HPA_SEGMENT)}`, the settings "
        f"`benchmarks/segmentation.md` scores), crop {cfg.cache.crop_size} px, medians of {repeats} runs per image.\n"
    )
    lines.append(
        "| image | cells | decode s | segment s | masks s | crops s | end to end s | end to end / decode |"
    )
    lines.append("|---|---|---|---|---|---|---|---|")
    totals = []
    with tempfile.TemporaryDirectory() as tmp:
        cache_dir = Path(tmp)
        (cache_dir / "masks").mkdir()
        for image_id in ids:
            image = read_image(HPA_TRAIN, image_id)
            seg = segment_image(image, cfg.segment)
            decode = median_seconds(lambda i=image_id: read_image(HPA_TRAIN, i), repeats)
            segment = median_seconds(lambda im=image: segment_image(im, cfg.segment), repeats)
            masks = median_seconds(
                lambda i=image_id, s=seg: build.write_masks(cache_dir, i, s.cells, s.nuclei), repeats
            )
            crops = median_seconds(lambda im=image, s=seg: cut_crops(im, s.cells, s.nuclei, CROP), repeats)
            task = build.ImageTask(image_id, "train", str(HPA_TRAIN))
            whole = median_seconds(lambda t=task: build.cache_image(t, cfg, cache_dir), repeats)
            totals.append((decode, segment, masks, crops, whole))
            lines.append(
                f"| {image_id[:8]} | {seg.n_cells} | {decode:.3f} | {segment:.3f} | {masks:.3f} | {crops:.3f} "
                f"| {whole:.3f} | {whole / decode:.2f}x |"
            )
    mean = np.mean(totals, axis=0)
    lines.append(
        f"| **mean** | | {mean[0]:.3f} | {mean[1]:.3f} | {mean[2]:.3f} | {mean[3]:.3f} | {mean[4]:.3f} "
        f"| {mean[4] / mean[0]:.2f}x |\n"
    )
    floor = (mean[0] + mean[1]) / mean[0]  # decode + segmentation, before any caching work
    verdict = "met" if mean[4] <= 1.5 * mean[0] else f"NOT met, decode + segmentation alone take {floor:.2f}x"
    lines.append(
        f"Caching's own work (masks + crops) is {(mean[2] + mean[3]) / mean[0]:.2f}x decode; the rest is "
        f"segmentation ({mean[1] / mean[0]:.2f}x decode with `{cfg.segment.backend}`). "
        f"Target end to end <= 1.5x decode: {verdict}.\n"
    )

    with tempfile.TemporaryDirectory() as tmp:
        data = dataset_of(dict.fromkeys(ids, HPA_TRAIN), Path(tmp) / "data")
        stage = [
            in_fresh_process("build", str(data), str(Path(tmp) / f"cache{r}"), *HPA_SEGMENT) for r in range(3)
        ]
        seconds = statistics.median(s["seconds"] for s in stage)
        lines.append(
            f"Whole stage (`build.run`: plan, cache, shard, index, merge) on the {len(ids)} images in a fresh "
            f"process, median of 3: {seconds:.2f} s = {seconds / len(ids):.3f} s/image, "
            f"peak RSS {statistics.median(s['peak_rss_mb'] for s in stage):.0f} MB.\n"
        )

        big = read_image(HPA_TRAIN, ids[0])
        big = np.stack([cv2.resize(plane, (3072, 3072), interpolation=cv2.INTER_LINEAR) for plane in big])
        write_image(Path(tmp) / "big", ids[0], big)
        decode = median_seconds(lambda: read_image(Path(tmp) / "big", ids[0]), repeats)
        runs = [in_fresh_process("image", str(Path(tmp) / "big"), ids[0]) for _ in range(3)]
        seconds = statistics.median(r["seconds"] for r in runs)
        lines.append(
            f"3072² image ({ids[0][:8]} resized x1.5): decode {decode:.3f} s, end to end {seconds:.3f} s "
            f"({seconds / decode:.2f}x decode, first call in a fresh process, median of 3), peak RSS "
            f"{runs[0]['peak_rss_mb']:.0f} MB of which {runs[0]['rss_after_imports_mb']:.0f} MB after imports.\n"
        )


# -- 2. read speed ---------------------------------------------------------------------------------------


def reading_cache(
    synthetic: Path, workdir: Path, lines: list[str]
) -> tuple[CellCache, Callable[[int], np.ndarray] | None]:
    """A cache of a few thousand 64 px cells, and a function that cuts cell i out of its PNGs again (or
    None when the cache has no source images)."""
    if synthetic.joinpath("train.csv").is_file():
        cfg = config(f"data.dir={synthetic}", f"cache.dir={workdir / 'synthetic'}", "cache.workers=0")
        build.run(cfg)
        cache = CellCache(cfg.cache_dir)
        lines.append(
            f"Cache: the synthetic set (`{os.path.relpath(synthetic, REPO)}`, {len(cache)} cells of {CROP} px), built here.\n"
        )
        folders = {"train": synthetic / "train", "test": synthetic / "test"}

        def cut_again(i: int) -> np.ndarray:
            row = cache.cells.iloc[i]
            image = read_image(folders[row["split"]], row["image_id"])
            masks = read_masks(cache.folder, row["image_id"])
            own = np.where(masks.cells == row["cell_id"], masks.cells, 0)
            return cut_crops(image, own, np.where(own > 0, masks.nuclei, 0), CROP)[0][0]

        return cache, cut_again
    n = 8192
    folder = workdir / "random"
    (folder / "shards").mkdir(parents=True)
    crops = np.random.default_rng(0).integers(0, 256, (n, 4, CROP, CROP), dtype=np.uint8)
    for part in range(2):
        np.save(folder / "shards" / f"part000-{part:05d}.npy", crops[part * n // 2 : (part + 1) * n // 2])
    cells = pd.DataFrame(
        {
            "image_id": [f"img{i // 16}" for i in range(n)],
            "cell_id": np.arange(n) % 16 + 1,
            "shard": [f"part000-{i // (n // 2):05d}.npy" for i in range(n)],
            "row": np.arange(n) % (n // 2),
        }
    )
    cells.to_parquet(folder / "cells.parquet")
    pd.DataFrame({"image_id": cells["image_id"].unique()}).to_parquet(folder / "images.parquet")
    lines.append(
        f"Cache: random uint8 crops of the right shape ({n} x (4, {CROP}, {CROP}) in 2 shards), because "
        f"`{os.path.relpath(synthetic, REPO)}` does not exist; the PNG column needs source images and is skipped.\n"
    )
    return CellCache(folder), None


def interleaved_rates(paths: dict[str, Iterator[object]], n_batches: int) -> dict[str, float]:
    """Crops/s of each path from the median time of one batch; the paths take turns batch by batch, so
    other processes sharing the core slow them alike and the comparison stays fair."""
    times: dict[str, list[float]] = {name: [] for name in paths}
    for step in range(n_batches + 5):
        for name, batches in paths.items():
            start = clock()
            next(batches)
            if step >= 5:  # warm-up: page cache, first allocations
                times[name].append(clock() - start)
    return {name: BATCH / statistics.median(values) for name, values in times.items()}


def forever(loader: Iterable[object]) -> Iterator[object]:
    while True:
        yield from loader


def bench_read(synthetic: Path, repeats: int, lines: list[str]) -> None:
    # torch only here, so that the fresh processes of sections 1 and 3 measure the cache's memory, not torch's.
    import torch

    from weakcell.cache.augment import CropAugment
    from weakcell.cache.loader import CellCrops, make_loader

    lines.append(f"## 2. Reading random batches of {BATCH} crops at {CROP} px (one core, page cache warm)\n")
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        cache, cut_again = reading_cache(synthetic, Path(tmp), lines)
        rng = np.random.default_rng(0)
        n_batches = 100 * repeats
        raw = (cache.crops(rng.choice(len(cache), BATCH, replace=len(cache) < BATCH)) for _ in iter(int, 1))
        augmented = make_loader(CellCrops(cache, augment=CropAugment()), batch_size=BATCH, drop_last=True)
        plain = make_loader(CellCrops(cache), batch_size=BATCH, drop_last=True)
        rates = interleaved_rates(
            {"raw": raw, "plain": forever(plain), "augmented": forever(augmented)}, n_batches
        )
        lines.append(
            f"Median time of one batch over {n_batches} batches per path (paths interleaved), as crops/s.\n"
        )
        lines.append("| path | crops/s |")
        lines.append("|---|---|")
        lines.append(f"| raw memmap read, `CellCache.crops` (ceiling) | {rates['raw']:,.0f} |")
        lines.append(
            f"| training input path without augmentation (read + collate, DataLoader) | {rates['plain']:,.0f} |"
        )
        lines.append(
            f"| **training input path** (`CellCrops` + `CropAugment()`: read, 8 symmetries, "
            f"per-channel gain, collate, DataLoader) | **{rates['augmented']:,.0f}** |"
        )
        path_rate = rates["augmented"]
        if cut_again is None:
            lines.append("| cut from the PNGs each time | skipped (no source images) |\n")
        else:
            sample = rng.choice(len(cache), min(32, len(cache)), replace=False)
            png_rate = len(sample) / median_seconds(lambda: [cut_again(int(i)) for i in sample], 1)
            lines.append(
                f"| cut from the PNGs each time (decode image + masks per crop) | {png_rate:,.0f} |\n"
            )
        lines.append(
            f"Target >= 50,000 crops/s through the training input path: {'met' if path_rate >= 5e4 else 'NOT met'}.\n"
        )


# -- 3. memory against the number of images -------------------------------------------------------------


def blob_image(rng: np.random.Generator, size: int = 512, n_cells: int = 20) -> np.ndarray:
    """A synthetic-like (4, size, size) image: bright noisy ellipses with a blue nucleus each."""
    image = rng.integers(0, 8, (4, size, size), dtype=np.uint8)
    for _ in range(n_cells):
        center = tuple(int(v) for v in rng.integers(40, size - 40, 2))
        axes = tuple(int(v) for v in rng.integers(18, 36, 2))
        angle = float(rng.uniform(0, 180))
        for channel in (0, 1, 3):
            cv2.ellipse(image[channel], center, axes, angle, 0, 360, int(rng.integers(60, 200)), -1)
        cv2.ellipse(image[2], center, (axes[0] // 2, axes[1] // 2), angle, 0, 360, 180, -1)
    return image


def bench_memory(synthetic: Path, lines: list[str]) -> None:
    lines.append("## 3. Peak RSS of a whole build against the number of images (fresh process each)\n")
    with tempfile.TemporaryDirectory() as tmp:
        counts = (20, 80)
        if synthetic.joinpath("train").is_dir() and len(list_image_ids(synthetic / "train")) >= max(counts):
            ids = list_image_ids(synthetic / "train")[: max(counts)]
            source = dict.fromkeys(ids, synthetic / "train")
            what = f"the first images of `{os.path.relpath(synthetic, REPO)}/train`"
        else:
            rng = np.random.default_rng(0)
            folder = Path(tmp) / "blobs"
            ids = [f"blob{i:03d}" for i in range(max(counts))]
            for image_id in ids:
                write_image(folder, image_id, blob_image(rng))
            source = dict.fromkeys(ids, folder)
            what = f"512² images of 20 noisy elliptic cells each (`{os.path.relpath(synthetic, REPO)}` holds fewer than {max(counts)} train images)"
        lines.append(f"Images: {what}; `workers=1`, `cache.shard_mb=4` so that several shards are flushed.\n")
        lines.append("| images | cells | seconds | peak RSS MB |")
        lines.append("|---|---|---|---|")
        for count in counts:
            data = dataset_of({i: source[i] for i in ids[:count]}, Path(tmp) / f"data{count}")
            cache_dir = Path(tmp) / f"cache{count}"
            result = in_fresh_process("build", str(data), str(cache_dir), "cache.shard_mb=4")
            n_cells = len(pd.read_parquet(cache_dir / "cells.parquet"))
            lines.append(f"| {count} | {n_cells} | {result['seconds']:.1f} | {result['peak_rss_mb']:.0f} |")
        lines.append("")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--synthetic", type=Path, default=REPO / "data" / "synthetic", help="a synthetic set (hpa2021 layout)"
    )
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--wall", action="store_true", help="time with wall clock instead of CPU time")
    args = parser.parse_args()
    global clock
    clock = time.perf_counter if args.wall else time.process_time
    if args.child:
        child(args.child)
        return
    cv2.setNumThreads(1)
    lines = [
        "# Cell-crop cache benchmark\n",
        f"`python {' '.join(sys.argv)}` on {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores (one used), Python {platform.python_version()}, OpenCV {cv2.__version__}, "
        f"torch {version('torch')}; medians of repeats, timed in "
        f"{'wall-clock seconds' if args.wall else 'CPU seconds of the process (time.process_time)'}. Load average at the start "
        f"{' / '.join(f'{v:.1f}' for v in os.getloadavg())} (1 / 5 / 15 min): other processes share these cores.\n",
    ]
    bench_build(args.repeats, lines)
    bench_read(args.synthetic, args.repeats, lines)
    bench_memory(args.synthetic, lines)
    text = "\n".join(lines)
    print(text)
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT}")


if __name__ == "__main__":
    main()
