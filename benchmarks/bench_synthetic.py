"""Speed of the synthetic benchmark and how wrong label inheritance is on it -> benchmarks/synthetic.md.

    .venv/bin/python benchmarks/bench_synthetic.py [--repeats 3] [--images 32]

Throughput is the median of ``--repeats`` timed runs (the machine is shared, medians resist noise):
generation alone in one process, and the whole writer (generation + PNG writing) with one process and
with the pool, at the default 512² and at real HPA size 2048². The inheritance errors are measured on
the full default set (240 train + 40 test), whose one-off generation time is reported too.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from weakcell.config import load_config
from weakcell.synthetic import generate_image, image_seed, inheritance_errors, read_image_labels, read_truth
from weakcell.synthetic.writer import run

REPORT = Path(__file__).with_name("synthetic.md")
FULL_SIZE = ["synthetic.image_size=2048", "synthetic.cell_scale=1.0"]


def median_rate(
    n_images: int, job: Callable[[], object], repeats: int, clock: Callable[[], float] = time.perf_counter
) -> float:
    """Median images/s of ``job`` (which makes ``n_images``) over ``repeats`` runs, timed by ``clock``."""
    seconds = []
    for _ in range(repeats):
        start = clock()
        job()
        seconds.append(clock() - start)
    return n_images / statistics.median(seconds)


def generation_rate(
    overrides: list[str], n_images: int, repeats: int, clock: Callable[[], float] = time.perf_counter
) -> float:
    """images/s of ``generate_image`` alone, one process; with ``time.process_time`` as ``clock`` it is
    per CPU second, which other load on a shared machine disturbs far less than wall time."""
    synthetic = load_config(None, overrides).synthetic
    return median_rate(
        n_images,
        lambda: [generate_image(synthetic, image_seed(synthetic.seed, "train", i)) for i in range(n_images)],
        repeats,
        clock,
    )


def writer_rate(overrides: list[str], n_images: int, workers: int, repeats: int) -> float:
    """images/s of the whole writer (``force=true``) into a temporary folder."""
    with tempfile.TemporaryDirectory() as root:
        cfg = load_config(
            None,
            [*overrides, f"paths.root={root}", f"synthetic.n_train={n_images}", "synthetic.n_test=0",
             f"synthetic.workers={workers}", "force=true"],
        )  # fmt: skip
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            return median_rate(n_images, lambda: run(cfg), repeats)


def default_set_figures() -> dict[str, float]:
    """Generate the full default set once (pool), time it, and measure inheritance errors on it."""
    with tempfile.TemporaryDirectory() as root:
        cfg = load_config(None, [f"paths.root={root}"])
        start = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            run(cfg)
        seconds = time.perf_counter() - start
        cells = read_truth(cfg.data_dir)
        errors = inheritance_errors(cells, read_image_labels(cfg.data_dir))
        negative_cells = float((cells["Label"] == "18").mean())
    n_images = cfg.synthetic.n_train + cfg.synthetic.n_test
    return {"seconds": seconds, "images": n_images, "negative_cells": negative_cells, **errors}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--images", type=int, default=32, help="images per timed run at 512²")
    args = parser.parse_args()
    workers = os.cpu_count() or 1
    n_full = max(2, args.images // 16)
    rows = [
        (
            "512², generate only, per CPU second",
            generation_rate([], args.images, args.repeats, time.process_time),
        ),
        ("512², generate only, 1 process", generation_rate([], args.images, args.repeats)),
        ("512², writer, 1 process", writer_rate([], args.images, 1, args.repeats)),
        (f"512², writer, pool of {workers}", writer_rate([], 2 * args.images, 0, args.repeats)),
        (
            "2048² (cell_scale=1.0), generate only, per CPU second",
            generation_rate(FULL_SIZE, n_full, args.repeats, time.process_time),
        ),
        (
            "2048² (cell_scale=1.0), generate only, 1 process",
            generation_rate(FULL_SIZE, n_full, args.repeats),
        ),
        (
            f"2048² (cell_scale=1.0), writer, pool of {workers}",
            writer_rate(FULL_SIZE, 2 * n_full, 0, args.repeats),
        ),
    ]
    full = default_set_figures()
    lines = [
        "# Synthetic benchmark: speed and label-inheritance error",
        "",
        f"`.venv/bin/python benchmarks/bench_synthetic.py --repeats {args.repeats} --images {args.images}` "
        f"on {workers} cores (medians of {args.repeats} runs; load average {os.getloadavg()[0]:.1f} at the end, "
        "so wall-clock rows on a shared machine are lower bounds; 'per CPU second' rows are load-independent).",
        "",
        "| setting | images/s |",
        "|---|---|",
        *(f"| {name} | {rate:.2f} |" for name, rate in rows),
        "",
        f"Full default set (`make data`: {full['images']:.0f} images at 512², pool of {workers}): "
        f"{full['seconds']:.1f} s, {full['cells']:.0f} cells.",
        "",
        "Inheriting the image label for every cell (stage 1 of weak supervision), on that set:",
        "",
        f"- pair error {full['pair_error']:.3f}: fraction of inherited (cell, class) pairs the cell does not express",
        f"- cell error {full['cell_error']:.3f}: fraction of cells whose inherited label set differs from their own",
        f"- {full['negative_cells']:.3f} of cells are Negative (express none of their image's classes)",
        "",
    ]
    REPORT.write_text("\n".join(lines))
    print("\n".join(lines))
    print(f"wrote {REPORT}")


if __name__ == "__main__":
    main()
