"""Training augmentations (``train.augment``): loader throughput per worker process, and which path wins.

    OMP_NUM_THREADS=1 python benchmarks/bench_augment.py [--cells 4096] [--batches 12] [--repeats 3]
        [--sizes 64,128] [--quality RUN=LABEL ...] [--out benchmarks/augment.md]

Part 1, loader cells per CPU-second: ``CellCrops.__getitems__`` (read from a fake memmap cache in the real format, augment,
collate) in this process, which is what each DataLoader worker does; so cells/s x ``train.workers`` bounds
what the loader feeds. Variants: no augmentation; the batched path (8 symmetries + per-channel gain, the
default); the same two steps done per crop by albumentations (``D4`` + a per-channel ``MultiplicativeNoise``),
to show where the batched path wins; and the batched path + the albumentations list of
``configs/demo-augment.yaml``. Medians of ``--repeats``, ``--batches`` batches of 256 each.

Part 2, quality (``--quality runs/<name>=<label>``): each run's OOF cell mAP, test cell mAP and OOF image mAP from
its ``evaluation.json`` (``make evaluate``), runs trained at equal epochs by the caller.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

BATCH = 256
PER_CROP_TWINS = [  # the batched path's two steps, per crop in albumentations
    {"name": "D4", "p": 1.0},
    {
        "name": "MultiplicativeNoise",
        "multiplier": [0.8, 1.2],
        "per_channel": True,
        "elementwise": False,
        "p": 1.0,
    },
]


def variants() -> dict[str, list[dict[str, object]]]:
    from weakcell.config import load_config

    batched = load_config(None).train.augment
    return {
        "none": [],
        "batched: symmetries + gain (default)": batched,
        "per crop: albumentations D4 + per-channel gain": PER_CROP_TWINS,
        "batched + albumentations list (configs/demo-augment.yaml)": load_config(
            REPO / "configs" / "demo-augment.yaml"
        ).train.augment,
    }


def loader_cells_per_s(
    folder: Path, specs: list[dict[str, object]], batches: int, repeats: int
) -> list[float]:
    import numpy as np

    from weakcell.cache.augment import crop_augment
    from weakcell.cache.loader import CellCrops
    from weakcell.cache.store import CellCache

    dataset = CellCrops(CellCache(folder), augment=crop_augment(specs))
    rng = np.random.default_rng(0)
    dataset.__getitems__(rng.integers(0, len(dataset), BATCH).tolist())  # warm-up: imports, page cache
    rates = []
    for _ in range(repeats):
        positions = [rng.integers(0, len(dataset), BATCH).tolist() for _ in range(batches)]
        start = (
            time.process_time()
        )  # CPU time of this process: wall time on a shared machine measures the others
        for batch in positions:
            dataset.__getitems__(batch)
        rates.append(batches * BATCH / (time.process_time() - start))
    return rates


def quality_rows(pairs: list[str]) -> list[str]:
    """One row per ``runs/<name>=<label>``: scores from the run's ``evaluation.json`` (``make evaluate``)."""
    rows = []
    for pair in pairs:
        run, _, label = pair.partition("=")
        evaluation = json.loads((REPO / run / "evaluation.json").read_text())
        oof = evaluation["cell_oof"][evaluation["plotted_variant"]]["map"]
        test = evaluation["cell_test"]["submission"]["map"]
        image = evaluation["image_oof"]["map"]
        rows.append(f"| {label or run} | `{run}` | {oof:.4f} | {test:.4f} | {image:.4f} |")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cells", type=int, default=4096)
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sizes", default="64,128")
    parser.add_argument("--quality", nargs="*", default=[], help="runs/<name>=<label> pairs")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "augment.md")
    args = parser.parse_args()

    from bench_train import write_fake_cache

    lines = [
        "# Training augmentations (`train.augment`)",
        "",
        f"Date: {datetime.date.today().isoformat()}. Machine: {platform.machine()}, {os.cpu_count()} cores shared "
        f"with other jobs, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, Python "
        f"{platform.python_version()}.",
        f"Command: `python benchmarks/bench_augment.py {' '.join(sys.argv[1:])}`",
        "",
        "## Loader cells per CPU-second, per worker process",
        "",
        f"`CellCrops.__getitems__` on a fake {args.cells}-cell memmap cache: read + augment + collate, batches of "
        f"{BATCH}, timed in CPU seconds of the process (the machine is shared: wall time would measure the "
        f"other jobs), median of {args.repeats} x {args.batches} batches (per-repeat figures in parentheses). Each "
        "DataLoader worker runs this; `train.workers` multiplies it.",
        "",
    ]
    sizes = [int(s) for s in args.sizes.split(",")]
    lines += [
        "| variant | " + " | ".join(f"{s} px cells/CPU-s" for s in sizes) + " |",
        "|---|" + "---|" * len(sizes),
    ]
    table: dict[str, dict[int, list[float]]] = {}
    for size in sizes:
        folder = Path(tempfile.mkdtemp(prefix="weakcell-augment-bench-"))
        try:
            write_fake_cache(folder, args.cells, crop_size=size, per_shard=args.cells)
            for name, specs in variants().items():
                rates = loader_cells_per_s(folder, specs, args.batches, args.repeats)
                table.setdefault(name, {})[size] = rates
                print(f"{size} px  {name}: {statistics.median(rates):,.0f} cells/s", flush=True)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    for name, figures in table.items():
        cells = [
            f"{statistics.median(figures[s]):,.0f} ({', '.join(f'{r:,.0f}' for r in figures[s])})"
            for s in sizes
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if args.quality:
        lines += [
            "",
            "## Quality at equal epochs",
            "",
            "| variant | run | OOF cell mAP | test cell mAP | OOF image mAP |",
            "|---|---|---|---|---|",
            *quality_rows(args.quality),
        ]
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
