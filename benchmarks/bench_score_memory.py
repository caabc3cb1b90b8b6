"""Peak memory of ``weakcell score`` on one crowded image (issue 22, item 8).

A 2048 x 2048 truth image holds 3,025 square cells (a 55 x 55 grid of 37 x 37 px, every cell class 0) and a
cell-level file predicts 10,000 distinct masks of class 0 in that image: the first 3,000 cells exactly
(confidences above every other), then 7,000 3 x 3 squares inside cells (false positives, IoU 9 / 1369).
By hand, class 0's AP is 3000 / 3025 (precision 1 up to that recall, nothing after it) and so is the mAP:
no other class has a true cell.

The score runs in a fresh process whose peak resident set (``VmHWM`` of ``/proc/self/status``, Linux; the
whole Python process: interpreter, numpy, pandas, the truth image, the scoring) is read when it ends. ``--src`` measures another
checkout's ``src`` folder the same way (e.g. the commit before the sparse overlaps):

    python benchmarks/bench_score_memory.py [--src /path/to/other/checkout/src]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

SIZE, SIDE, CELL = 2048, 55, 37  # image side, cells per grid side, cell side (px)
N_EXACT, N_SMALL = 3000, 7000  # predicted cells, 3 x 3 false-positive squares
EXPECTED_MAP = N_EXACT / SIDE**2

# VmHWM, the peak resident set of this process image, not ru_maxrss: Linux carries a parent's ru_maxrss
# over fork and exec (a child of a 1 GB pytest process would report 1 GB before it allocated anything).
MEASURE = """
import json, re, sys, time
from pathlib import Path
from weakcell.score import score_main
start = time.perf_counter()
code = score_main([sys.argv[1], "--truth", sys.argv[2], "--json", sys.argv[3]])
seconds = time.perf_counter() - start
peak_kb = int(re.search(r"VmHWM:\\s+(\\d+) kB", Path("/proc/self/status").read_text()).group(1))
print(json.dumps({"code": code, "peak_mb": peak_kb / 1024, "seconds": seconds}))
"""


def cell_box(k: int) -> tuple[int, int]:
    """Top-left corner (row, column) of grid cell k."""
    return (k // SIDE) * CELL, (k % SIDE) * CELL


def write_crowded_case(folder: Path) -> tuple[Path, Path]:
    """The truth folder (``cells.csv`` + ``img_cells.png``) and the cell-level file described above."""
    from weakcell.rle import encode_crop

    truth = folder / "truth"
    truth.mkdir(parents=True, exist_ok=True)
    labels = np.zeros((SIZE, SIZE), np.uint16)
    for k in range(SIDE**2):
        y, x = cell_box(k)
        labels[y : y + CELL, x : x + CELL] = k + 1
    cv2.imwrite(str(truth / "img_cells.png"), labels)
    pd.DataFrame({"image_id": "img", "cell_id": np.arange(1, SIDE**2 + 1), "Label": "0"}).to_csv(
        truth / "cells.csv", index=False
    )
    square = np.ones((CELL, CELL), bool)
    small = np.ones((3, 3), bool)
    predictions = []
    for k in range(N_EXACT):  # confidences 0.99 .. 0.69, all above the false positives'
        y, x = cell_box(k)
        predictions.append(f"0 {0.99 - k * 1e-4:.4f} {encode_crop(square, y, x, SIZE, SIZE)}")
    for j in range(N_SMALL):  # distinct 3 x 3 squares: 9 spots in each of the first 778 cells
        y, x = cell_box(j // 9)
        dy, dx = 3 * ((j % 9) // 3) + 5, 3 * (j % 3) + 5
        predictions.append(f"0 {0.5 - j * 1e-5:.5f} {encode_crop(small, y + dy, x + dx, SIZE, SIZE)}")
    csv = folder / "cell_level.csv"
    pd.DataFrame(
        {
            "ID": ["img"],
            "ImageWidth": [SIZE],
            "ImageHeight": [SIZE],
            "PredictionString": [" ".join(predictions)],
        }
    ).to_csv(csv, index=False)
    return truth, csv


def measure(csv: Path, truth: Path, src: str | None = None) -> dict[str, float]:
    """Exit code, peak RSS (MB) and seconds of ``weakcell score`` in a fresh process (``src``: the
    weakcell source folder to import, default this checkout's), plus the mAP it wrote."""
    env = dict(os.environ)
    if src:
        env["PYTHONPATH"] = src
    result_json = csv.with_name("score.json")
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, str(csv), str(truth), str(result_json)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    last = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    if not last.startswith("{"):  # killed (out of memory) or a traceback
        return {
            "code": done.returncode,
            "peak_mb": float("nan"),
            "seconds": float("nan"),
            "map": float("nan"),
        }
    measured = json.loads(last)
    measured["map"] = json.loads(result_json.read_text())["map"] if measured["code"] == 0 else float("nan")
    return measured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", action="append", default=[], help="another weakcell src folder to measure")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        truth, csv = write_crowded_case(Path(folder))
        print(
            f"case: {SIDE**2} true cells, {N_EXACT + N_SMALL} predictions, {csv.stat().st_size / 1e6:.1f} MB CSV "
            f"({time.perf_counter() - start:.1f} s to write); expected mAP {EXPECTED_MAP:.6f}"
        )
        for src in [None, *args.src]:
            measured = measure(csv, truth, src)
            print(
                f"{src or 'this checkout'}: exit {measured['code']}, peak RSS {measured['peak_mb']:.0f} MB, "
                f"{measured['seconds']:.1f} s, mAP {measured['map']:.6f}"
            )


if __name__ == "__main__":
    main()
