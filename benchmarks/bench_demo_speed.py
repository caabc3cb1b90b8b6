"""Where the demo's time goes and whether `make demo` fits 10 minutes on a slower 2-core CPU
-> benchmarks/demo-speed.md.

    .venv/bin/python benchmarks/bench_demo_speed.py                       # (a) (b) (c) on this machine
    .venv/bin/python benchmarks/bench_demo_speed.py --stages base.txt new.txt  # + (d) from two timed demos

(a) model only: MobileNetV3-small (the demo's backbone) at 64 px, fp32, channels_last, batch 128, a step
    (forward, backward, AdamW) on batches already in memory; 2 threads (wall, best and median of short
    windows: on a shared machine the best window is the one closest to a quiet machine) and 1 thread
    (samples per CPU second: no OpenMP thread waits on a busy one, so it is steady under load).
(b) the data path of one batch, 1 thread, CPU ms: gather from the memmapped shards, the batched
    augmentations, the copy to channels_last, the normalisation in the model; against a model step.
(c) a demo fit (fold 0's stage 1, one epoch) with the next batch read in a background thread
    (``train.prefetch``) and without, alternating, 2 threads, wall samples/s.
(d) with ``--stages``: two files of ``stage user_s sys_s wall_s`` lines (``/usr/bin/time`` of each `make
    demo` stage, 1 thread, so CPU seconds measure work whatever the load), before and after; the demo's
    time on the slow machine is projected from them and the model-only rates.

Run from the repository root; the demo's data, folds and cache are made first when missing. ``--out FILE``
writes the report elsewhere (a partial run with ``--skip`` would otherwise replace the whole file).
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from weakcell.devices import cpu_model

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "demo-speed.md"
CONFIG = "configs/demo.yaml"
SLOW_MODEL_ONLY = (380.0, 440.0)  # samples/s model only on the slow 2-core AMD EPYC (issue 26)


def demo_training_set():
    from weakcell.config import load_config
    from weakcell.training_set import load_training_set

    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_train import ensure_inputs

    ensure_inputs()
    cfg = load_config(CONFIG)
    data = load_training_set(cfg)
    held_out = data.cells["fold"].isin([0]).to_numpy()
    return cfg, data, data.cells.index[~held_out].to_numpy()


def model_and_batches(cfg, data, cells, n_batches: int = 6):
    from weakcell.cache.augment import crop_augment
    from weakcell.engine import make_optimizer
    from weakcell.labelled_crops import LabelledCrops
    from weakcell.models import create_model
    from weakcell.runtime import prepare, resolve_runtime, to_device

    runtime = resolve_runtime(cfg.train)
    torch.manual_seed(0)
    model = prepare(create_model("cell", cfg, data.n_classes), runtime)
    optimizer = make_optimizer(model, cfg.train, runtime.device)
    crops = LabelledCrops(data.cache, cells, data.cell_targets, crop_augment(cfg.train.augment))
    size = cfg.train.batch_size
    batches = [
        to_device(crops.__getitems__(list(range(i * size, (i + 1) * size))), runtime)
        for i in range(n_batches)
    ]

    def step(batch) -> None:
        model(batch)["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, batches, crops, runtime


def model_only(cfg, data, cells, windows: int, steps: int) -> dict[str, float]:
    """(a): wall samples/s at 2 threads (best, median of windows) and samples per CPU s at 1 thread."""
    step, batches, _, _ = model_and_batches(cfg, data, cells)
    size = cfg.train.batch_size
    result = {}
    for threads in (2, 1):
        torch.set_num_threads(threads)
        for batch in batches[:3]:
            step(batch)  # warm-up
        wall_rates, cpu_rates = [], []
        for window in range(windows):
            wall, cpu = time.perf_counter(), time.process_time()
            for k in range(steps):
                step(batches[(window + k) % len(batches)])
            wall_rates.append(steps * size / (time.perf_counter() - wall))
            cpu_rates.append(steps * size / (time.process_time() - cpu))
        result[f"best_{threads}"] = max(wall_rates)
        result[f"median_{threads}"] = statistics.median(wall_rates)
        result[f"cpu_{threads}"] = statistics.median(cpu_rates)
    torch.set_num_threads(2)
    return result


def data_path(cfg, data, cells, repeats: int) -> dict[str, float]:
    """(b): CPU ms per batch of each part of the data path, and of a model step, 1 thread."""
    from weakcell.cache.loader import augment_batch_, batch_rng, draw_symmetries
    from weakcell.runtime import to_device

    torch.set_num_threads(1)
    step, batches, crops, runtime = model_and_batches(cfg, data, cells)
    size = cfg.train.batch_size
    rng = np.random.default_rng(0)
    from weakcell.models.classifiers import CropNormalizer

    normalizer = CropNormalizer(cfg.model.channel_mean, cfg.model.channel_std)
    parts: dict[str, list[float]] = {
        "gather": [],
        "augment": [],
        "channels_last": [],
        "normalise": [],
        "step": [],
    }
    for repeat in range(repeats):
        positions = rng.choice(len(cells), size, replace=False)
        rows = cells[positions]
        cpu = time.process_time()
        raw = data.cache.crops(np.sort(rows))
        parts["gather"].append(time.process_time() - cpu)
        cpu = time.process_time()
        batch_random = batch_rng(positions)
        codes = np.sort(draw_symmetries(size, batch_random))
        tensor = augment_batch_(raw, crops.augment, codes, crops.scratch, batch_random)
        parts["augment"].append(time.process_time() - cpu)
        cpu = time.process_time()
        moved = to_device({"crops": tensor}, runtime)["crops"]
        parts["channels_last"].append(time.process_time() - cpu)
        cpu = time.process_time()
        normalizer(moved)
        parts["normalise"].append(time.process_time() - cpu)
        cpu = time.process_time()
        step(batches[repeat % len(batches)])
        parts["step"].append(time.process_time() - cpu)
    torch.set_num_threads(2)
    return {name: 1000 * statistics.median(values) for name, values in parts.items()}


def fit_rates(cfg, data, cells, repeats: int) -> dict[str, list[float]]:
    """(c): one epoch of fold 0's stage 1 through the engine, prefetch on and off, alternating."""
    import tempfile

    from weakcell.cache.augment import crop_augment
    from weakcell.engine import fit
    from weakcell.labelled_crops import LabelledCrops
    from weakcell.models import create_model

    crops = LabelledCrops(data.cache, cells, data.cell_targets, crop_augment(cfg.train.augment))
    rates: dict[str, list[float]] = {"prefetch": [], "serial": []}
    for _ in range(repeats):
        for name, prefetch in (("prefetch", True), ("serial", False)):
            torch.manual_seed(0)
            model = create_model("cell", cfg, data.n_classes)
            train = cfg.train.model_copy(update={"epochs": 1, "prefetch": prefetch, "checkpoint_every": 0})
            with tempfile.TemporaryDirectory() as folder:
                result = fit(model, crops, None, train, folder, seed=0)
            rates[name].append(result.history[-1]["samples_per_s"])
    return rates


def read_stages(path: Path) -> dict[str, tuple[float, float]]:
    """``stage -> (CPU s, wall s)`` of a demo_run file."""
    stages = {}
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 4:
            stages[parts[0]] = (float(parts[1]) + float(parts[2]), float(parts[3]))
    return stages


# The demo before this work: 5 min 39 s on this kit's 2-core sandbox, quiet (README), 17.5 min on the slow
# 2-core AMD EPYC (issue 26; a demo fold 140 s there against 44 s here).
BEFORE_QUIET_S, BEFORE_SLOW_S = 339.0, 17.5 * 60
# What the prefetch can win on the training stages: nothing (1.0), part of the loader's share, or all of it
# on the slow machine (fits 200-270 samples/s against 380-440 model only: 410 / 235 = 1.74).
OVERLAPS = (1.0, 1.5, 1.74)
STAGE_MODULES = {
    "data": "weakcell.synthetic.writer",
    "preview": "weakcell.synthetic.preview",
    "folds": "weakcell.folds",
    "cache": "weakcell.cache.build",
    "train": "weakcell.train",
    "refine": "weakcell.refine",
    "thresholds": "weakcell.thresholds",
    "infer": "weakcell.infer",
    "evaluate": "weakcell.evaluate",
}


def import_cpu() -> dict[str, float]:
    """CPU seconds of an interpreter start + the stage's imports, each in a fresh process: what running
    the demo's stages in one process (``weakcell demo``) pays once instead of per stage."""
    costs = {}
    for stage, module in STAGE_MODULES.items():
        code = f"import resource, weakcell.cli, {module}; u = resource.getrusage(resource.RUSAGE_SELF); print(u.ru_utime + u.ru_stime)"
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True
        )
        costs[stage] = float(out.stdout.strip())
    return costs


def projection(cpu_before: float, cpu_after: float, trained_after: float) -> list[str]:
    """The demo's time after, projected on both machines: the work ratio (1-thread CPU seconds, (d)) times
    the time before, the training stages' part divided by what the prefetch wins (``OVERLAPS``)."""
    work = cpu_after / cpu_before
    share = trained_after / cpu_after
    rows = []
    for overlap in OVERLAPS:
        factor = work * ((1 - share) + share / overlap)
        rows.append(
            f"| {overlap:.2f}x | x{factor:.2f} | {BEFORE_QUIET_S * factor / 60:.1f} min | {BEFORE_SLOW_S * factor / 60:.1f} min |"
        )
    return [
        "## Projection",
        "",
        f"Work after / before: x{work:.2f} (1-thread CPU seconds, (d), the one-process chain included); the "
        f"training stages are {share:.0%} of it after, and the prefetch speeds their fits up by what the loader "
        "costs there. Before: 5.6 min on this sandbox, quiet (README), 17.5 min on the slow machine (issue 26).",
        "",
        "| prefetch gain on training | time factor | this sandbox, quiet | the slow 2-core AMD EPYC |",
        "|---|---|---|---|",
        *rows,
        "",
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--windows", type=int, default=25)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--stages", nargs=2, type=Path, metavar=("BEFORE", "AFTER"))
    parser.add_argument("--skip", nargs="*", default=[], choices=["model", "data", "fit"])
    parser.add_argument("--out", type=Path, default=OUT, help="where the report goes (default: %(default)s)")
    parser.add_argument(
        "--chained",
        action="store_true",
        help="AFTER ran as one process (`weakcell demo`): count its imports once",
    )
    args = parser.parse_args()
    cfg, data, cells = demo_training_set()
    lines = [
        "# The demo's speed on 2 CPU cores (issue 26)",
        "",
        f"Machine: {cpu_model()}, 2 cores, shared with other engineers' jobs (load average "
        f"{os.getloadavg()[0]:.1f} when it started), torch {torch.__version__}. Command: `{' '.join(['.venv/bin/python', *sys.argv])}` "
        f"({datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC). Training cells of fold 0: {len(cells)}.",
        "",
    ]
    if "model" not in args.skip:
        rates = model_only(cfg, data, cells, args.windows, args.steps)
        lines += [
            "## (a) Model only: MobileNetV3-small at 64 px, fp32, channels_last, batch 128",
            "",
            "| threads | best window (samples/s) | median window (samples/s) | samples per CPU second |",
            "|---|---|---|---|",
            f"| 2 | {rates['best_2']:.0f} | {rates['median_2']:.0f} | {rates['cpu_2']:.0f} |",
            f"| 1 | {rates['best_1']:.0f} | {rates['median_1']:.0f} | {rates['cpu_1']:.0f} |",
            "",
        ]
        print("\n".join(lines[-6:]))
    if "data" not in args.skip:
        parts = data_path(cfg, data, cells, max(20, args.repeats * 10))
        path_ms = sum(v for k, v in parts.items() if k != "step")
        lines += [
            "## (b) The data path of one batch of 128, 1 thread (CPU ms, medians)",
            "",
            "| gather | augment | channels_last copy | normalise | all | a model step |",
            "|---|---|---|---|---|---|",
            f"| {parts['gather']:.1f} | {parts['augment']:.1f} | {parts['channels_last']:.1f} | "
            f"{parts['normalise']:.1f} | {path_ms:.1f} ({path_ms / parts['step']:.0%} of a step) | {parts['step']:.0f} |",
            "",
        ]
        print("\n".join(lines[-5:]))
    if "fit" not in args.skip:
        fits = fit_rates(cfg, data, cells, args.repeats)
        lines += [
            "## (c) A demo fit, one epoch of fold 0 (wall samples/s, 2 threads, alternating)",
            "",
            "| variant | runs | median | best |",
            "|---|---|---|---|",
            *(
                f"| {name} | {', '.join(f'{r:.0f}' for r in runs)} | {statistics.median(runs):.0f} | {max(runs):.0f} |"
                for name, runs in fits.items()
            ),
            "",
        ]
        print("\n".join(lines[-6:]))
    if args.stages:
        before, after = (read_stages(path) for path in args.stages)
        rows = [
            f"| {stage} | {before[stage][0]:.0f} | {after[stage][0]:.0f} | {after[stage][0] / before[stage][0]:.2f} |"
            for stage in before
            if stage in after
        ]
        total_before = sum(cpu for cpu, _ in before.values())
        total_after = sum(cpu for cpu, _ in after.values())
        imports = import_cpu()
        saved = sum(imports.values()) - max(imports.values())  # one interpreter and one set of imports
        if not args.chained:
            total_after -= saved
        rows.append(f"| one process (`weakcell demo`): imports counted once | | -{saved:.0f} | |")
        lines += [
            "## (d) `make demo`, each stage with 1 thread: CPU seconds before and after",
            "",
            "| stage | before | after | after / before |",
            "|---|---|---|---|",
            *rows,
            f"| all | {total_before:.0f} | {total_after:.0f} | {total_after / total_before:.2f} |",
            "",
        ]
        # training stages read batches through the engine: the prefetch's gain applies to them alone
        trained = sum(after[stage][0] for stage in ("train", "refine") if stage in after)
        lines += projection(total_before, total_after, trained)
        print("\n".join(lines[-(len(rows) + 14) :]))
    args.out.write_text("\n".join(lines) + "\n")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
