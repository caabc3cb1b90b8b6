"""Stage-1 training throughput of the competition config on a CUDA machine (``make bench-train-gpu``).

    .venv/bin/python benchmarks/bench_train_gpu.py [--cells 60000] [--workers 8] [--compile] [--out FILE]

ResNet-50, 128 px crops, bf16 autocast, channels_last, batch 256, AdamW, the engine's own loader and step.
Three numbers in cells/s, medians of ``--repeats``:

* model only: forward/backward/optimizer step on batches already on the GPU;
* loader only: the engine's DataLoader over ``labelled_crops.LabelledCrops`` (random crops in a fake memmap cache in
  the real format, symmetries + intensity jitter, ``--workers`` worker processes, pinned memory);
* with loader: both, as ``fit`` runs them.

The loader keeps up when loader-only >= model-only cells/s (with-loader then ~ model-only). Without a
CUDA device the script says so and exits with status 2. Results: stdout and ``--out`` (markdown).
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

COMPETITION = [
    "model.backbone=resnet50",
    "cache.crop_size=128",
    "train.amp=bf16",
    "train.channels_last=true",
    "train.batch_size=256",
    "train.device=cuda",
    "model.pretrained_file=null",  # throughput does not depend on the initial weights; the machine has none
]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cells", type=int, default=60_000, help="cells in the fake cache (64 KB each)")
    parser.add_argument("--workers", type=int, default=8, help="DataLoader workers (train.workers)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (train.compile)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="where to write the fake cache")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "train_gpu.md")
    parser.add_argument("--smoke-cpu", action="store_true", help=argparse.SUPPRESS)  # code-path check only
    args = parser.parse_args()

    import numpy as np
    import torch

    if not torch.cuda.is_available() and not args.smoke_cpu:
        print(
            "bench_train_gpu: no CUDA device visible (torch.cuda.is_available() is False); this benchmark "
            "measures the competition config on a GPU machine. On CPU run benchmarks/bench_train.py instead.",
            file=sys.stderr,
        )
        return 2

    from bench_train import write_fake_cache

    from weakcell.batches import EpochBatches, batch_loader
    from weakcell.cache.augment import CropAugment
    from weakcell.cache.store import CellCache
    from weakcell.config import load_config
    from weakcell.engine import make_optimizer
    from weakcell.labelled_crops import LabelledCrops
    from weakcell.models import create_model
    from weakcell.runtime import prepare, resolve_runtime, to_device

    overrides = [*COMPETITION, f"train.workers={args.workers}", f"train.compile={str(args.compile).lower()}"]
    if args.smoke_cpu:  # tiny and on the CPU: checks the code path, measures nothing
        overrides += [
            "model.backbone=resnet18",
            "cache.crop_size=64",
            "train.batch_size=32",
            "train.device=cpu",
        ]
        overrides += ["train.amp=bf16"]
        args.cells, args.steps, args.repeats = 600, 2, 1

    def sync() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    cfg = load_config(REPO / "configs" / "competition.yaml", overrides)
    size = cfg.cache.crop_size
    folder = Path(tempfile.mkdtemp(prefix="weakcell-gpu-cache-", dir=args.cache_dir))
    try:
        started = time.perf_counter()
        write_fake_cache(folder, args.cells, crop_size=size, per_shard=5_000)
        print(
            f"fake cache: {args.cells} cells at {size} px in {time.perf_counter() - started:.0f} s -> {folder}"
        )
        cache = CellCache(folder)
        rows = np.arange(len(cache))
        targets = (np.random.default_rng(0).random((len(cache), 19)) < 0.1).astype(np.float32)
        data = LabelledCrops(cache, rows, targets, CropAugment(symmetries=True, intensity=0.2))

        runtime = resolve_runtime(cfg.train)
        torch.backends.cudnn.benchmark = True
        model = prepare(create_model("cell", cfg, 19), runtime)
        optimizer = make_optimizer(model, cfg.train, runtime.device)
        trained = torch.compile(model) if cfg.train.compile else model
        sampler = EpochBatches(len(data), cfg.train.batch_size, 1, runtime.world, seed=0)

        def stream():
            for epoch in itertools.count():
                sampler.set_epoch(epoch)
                yield from batch_loader(data, sampler, None, cfg.train, runtime, seed=0)

        def step(batch) -> None:
            with runtime.autocast():
                loss = trained(batch)["loss"]
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        batches = stream()
        gpu_batches = [to_device(next(batches), runtime) for _ in range(4)]
        for batch in gpu_batches * 3:  # warm-up: cudnn autotune, compile
            step(batch)
        sync()

        def timed(run_steps) -> float:
            sync()
            t0 = time.perf_counter()
            run_steps()
            sync()
            return args.steps * cfg.train.batch_size / (time.perf_counter() - t0)

        def model_only() -> None:
            for i in range(args.steps):
                step(gpu_batches[i % len(gpu_batches)])

        def loader_only() -> None:
            for _ in range(args.steps):
                to_device(next(batches), runtime)

        def with_loader() -> None:
            for _ in range(args.steps):
                step(to_device(next(batches), runtime))

        results: dict[str, list[float]] = {"model only": [], "loader only": [], "with loader": []}
        for _ in range(args.repeats):
            results["model only"].append(timed(model_only))
            results["loader only"].append(timed(loader_only))
            results["with loader"].append(timed(with_loader))
        medians = {k: statistics.median(v) for k, v in results.items()}
        keeps_up = medians["loader only"] >= medians["model only"]
        lines = [
            "# Stage-1 training throughput on GPU (competition config)",
            "",
            f"Date: {datetime.date.today().isoformat()}. Device: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'CPU (smoke)'}; torch "
            f"{torch.__version__}; {args.workers} DataLoader workers; compile={cfg.train.compile}.",
            f"Config: configs/competition.yaml + {' '.join(overrides)}; fake memmap cache of {args.cells} cells.",
            f"Command: `python benchmarks/bench_train_gpu.py {' '.join(sys.argv[1:])}`",
            "",
            "| path | cells/s (median) | repeats |",
            "|---|---|---|",
            *[f"| {k} | {medians[k]:.0f} | {', '.join(f'{x:.0f}' for x in v)} |" for k, v in results.items()],
            "",
            f"Loader keeps up: {'yes' if keeps_up else 'NO'} (loader only / model only = "
            f"{medians['loader only'] / medians['model only']:.2f}; with loader / model only = "
            f"{medians['with loader'] / medians['model only']:.2f}). Peak GPU memory "
            f"{torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0:.1f} GiB.",
            "",
        ]
        text = "\n".join(lines)
        print(text)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        return 0
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
