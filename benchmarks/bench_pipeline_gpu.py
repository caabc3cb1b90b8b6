"""Wall time of each pipeline stage, run as ``make demo`` runs it, on whatever device ``train.device`` picks.

    python benchmarks/bench_pipeline_gpu.py [--config configs/demo.yaml] [--stages data,folds,...]
        [--budget 480] [--out benchmarks/pipeline_gpu.md] [key=value ...]

Each stage is ``python -m weakcell <stage> CONFIG key=value ...`` in a fresh process (as make runs it),
timed end to end. Stages run in order until one fails or the time budget (seconds) would be exceeded by
the next stage's estimate (the longest stage so far); the table says which ran. Meant for a lent GPU machine
(``train.device=cuda train.workers=8``), where the 2-core CPU figures of the README are the baseline.

``--real-size`` runs ``configs/competition.yaml`` (ResNet-50, 128 px, bf16, batch 256) end to end on a
synthetic set at the real images' size (``REAL_SIZE``: 2048 px, real cell size, 300 + 40 images, the classical
backend at its real-data settings, random init since the machine has no internet), into
``benchmarks/pipeline_gpu_competition.md``::

    python benchmarks/bench_pipeline_gpu.py --real-size --budget 540 train.workers=12
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO = "data,folds,cache,train,refine,thresholds,infer,evaluate"
# The competition config on a synthetic set shaped like the real one: what a lent GPU can run without the
# 2021 data or internet. Segmentation stays classical (Cellpose-SAM needs weights the machine lacks).
REAL_SIZE = [
    "name=competition-real-size",
    "data.dataset=synthetic",
    "synthetic.image_size=2048",
    "synthetic.cell_scale=1.0",
    "synthetic.n_train=300",
    "synthetic.n_test=40",
    "segment.backend=classical",
    "segment.classical.nucleus_diameter=180",
    "segment.classical.working_scale=0.125",
    "model.pretrained_file=null",
]


def device_name() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
        return f"CPU ({os.cpu_count()} cores), torch {torch.__version__}"
    except ImportError:  # pragma: no cover - the package needs torch anyway
        return platform.processor()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--stages", default=DEMO, help="comma-separated weakcell commands, in order")
    parser.add_argument("--budget", type=float, default=480.0, help="seconds; later stages are skipped")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "pipeline_gpu.md")
    parser.add_argument(
        "--real-size", action="store_true", help="configs/competition.yaml on a 2048-px synthetic set"
    )
    parser.add_argument("overrides", nargs="*", help="key=value config overrides for every stage")
    args = parser.parse_args()
    if args.real_size:
        args.config = "configs/competition.yaml"
        args.overrides = [*REAL_SIZE, *args.overrides]
        if args.out == REPO / "benchmarks" / "pipeline_gpu.md":
            args.out = REPO / "benchmarks" / "pipeline_gpu_competition.md"

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    rows: list[tuple[str, str, str]] = []
    started = time.perf_counter()
    longest = 0.0
    for stage in args.stages.split(","):
        spent = time.perf_counter() - started
        if spent + longest > args.budget:
            rows.append((stage, "-", f"skipped: {spent:.0f} s spent of a {args.budget:.0f} s budget"))
            continue
        command = [sys.executable, "-m", "weakcell", stage, args.config, *args.overrides]
        print(f"$ {' '.join(command)}", flush=True)
        t0 = time.perf_counter()
        code = subprocess.call(command, cwd=REPO, env=env)
        seconds = time.perf_counter() - t0
        longest = max(longest, seconds)
        rows.append((stage, f"{seconds:.1f}", "ok" if code == 0 else f"exit {code}"))
        if code != 0:
            break
    total = time.perf_counter() - started
    text = "\n".join(
        [
            "# Pipeline stages, wall time",
            "",
            f"Date: {datetime.date.today().isoformat()}. Device: {device_name()}; {os.cpu_count()} CPU cores.",
            f"Command: `python benchmarks/bench_pipeline_gpu.py {' '.join(sys.argv[1:])}`",
            "",
            "| stage | seconds | status |",
            "|---|---|---|",
            *[f"| {stage} | {seconds} | {status} |" for stage, seconds, status in rows],
            f"| **total** | {total:.1f} | |",
            "",
        ]
    )
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    return 0 if all(status == "ok" or status.startswith("skipped") for _, _, status in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
