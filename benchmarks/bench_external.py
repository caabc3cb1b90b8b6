"""What external data buys, on the synthetic bench (issue 23): the competition's training images alone,
against the same images plus an external set made the way the public HPA images differ.

``configs/external-bench.yaml``: the demo's 240 training images, settings and 3 folds, round 0 (cells
inherit their image's labels, then attention MIL), 300 held-out test images. The external set: 240 more
images of the generator (``make data`` with another seed and flatter class frequencies,
``synthetic.class_balance=0.5``) through ``weakcell.synthetic.external``: another intensity scale per
channel, sizes of 256, 432, 512 and 768 px (1024, 1728, 2048, 3072 over 2048), JPEG at quality 85 or
16-bit, stored as ``make external`` stores them. It trains in every fold (``folds: train_only``: fold -1,
never validated), read through its measured intensity gain.

Variants, each trained once per seed of ``ablate.seeds`` at the same epochs, batch and learning rate:
``without`` (competition images alone), ``with`` (+ the external set), and ``with-no-gain`` (+ the set,
read as cached: what the gain does; ``--variants`` picks). Each run: ``make train``, ``make thresholds``
(competition images), ``make infer`` on the test split, scored with the organisers' metric (``weakcell
score``'s engine) with its 95% interval over 500 bootstrap resamples of the test images; the difference
with - without is paired by seed, its interval over the same resamples for both runs.

    python benchmarks/bench_external.py [--config configs/external-bench.yaml] [--seeds 42 43 44]
        [--variants without with] [--report-only] [key=value ...]

Finished runs are reused (``runs/external-bench-<variant>-seed<s>/``). Writes ``benchmarks/external.md``
and the records to ``benchmarks/external.json``.
"""

from __future__ import annotations

import os

# one thread per process: on cores shared with other jobs, torch's second OpenMP thread spin-waits at every
# barrier (measured here: 4x the wall time and 7x the CPU time of one thread for the same training steps)
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import json
import platform
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from weakcell import folds as folds_stage
from weakcell import infer as infer_stage
from weakcell import thresholds as thresholds_stage
from weakcell import train as train_stage
from weakcell.cache import build as cache_stage
from weakcell.cell_truth import read_truth_folder
from weakcell.competition_metric import (
    Matched,
    bootstrap_interval,
    match_images,
    mean_ap,
    paired_interval,
    submission_detections,
)
from weakcell.config import Config, load_config
from weakcell.constants import CHANNELS
from weakcell.data.datasets import get_dataset
from weakcell.data.labels import read_label_file, to_multi_hot
from weakcell.outputs import read_json
from weakcell.synthetic import writer as data_stage
from weakcell.synthetic.external import ExternalLook, make_external_set
from weakcell.synthetic.truth import TRUTH

REPO = Path(__file__).resolve().parents[1]
EXTERNAL = "data/synthetic-extbench-external"
LOOK = ExternalLook(id_prefix="x", seed=2023)
RAW = [f"data.dir={EXTERNAL}-raw", "synthetic.seed=2023", "synthetic.n_test=0", "synthetic.class_balance=0.5"]
SOURCE = f"{{dir: {EXTERNAL}, folds: train_only"
VARIANTS = {
    "without": [],
    "with": [f"data.sources=[{SOURCE}}}]", "folds.file=folds/synthetic-extbench-ext.csv"],
    "with-no-gain": [
        f"data.sources=[{SOURCE}, intensity: none}}]",
        "folds.file=folds/synthetic-extbench-ext.csv",
    ],
}


def prepare(config: str, overrides: list[str]) -> dict[str, object]:
    """The competition's set, the external set (raw generator output, then transformed) and what the
    external set is: formats, sizes, class frequencies beside the competition's."""
    cfg = load_config(config, overrides)
    data_stage.run(cfg)
    raw = load_config(config, [*overrides, *RAW])
    data_stage.run(raw)
    spec = get_dataset(cfg.data.dataset)
    folder = make_external_set(raw.data_dir, cfg.path(EXTERNAL), spec, LOOK)
    sources = pd.read_csv(folder / "sources.csv")
    frequency = {
        name: to_multi_hot(
            read_label_file(path / spec.label_file, spec)["labels"].tolist(), spec.n_classes
        ).mean(0)
        for name, path in (("competition", cfg.data_dir), ("external", folder))
    }
    return {
        "formats": sources["format"].value_counts().to_dict(),
        "sizes": sources["stored_width"].value_counts().sort_index().to_dict(),
        "frequency": {name: [round(float(f), 3) for f in values] for name, values in frequency.items()},
    }


def variant_config(config: str, overrides: list[str], variant: str, seed: int) -> Config:
    plain = load_config(config, overrides)
    return load_config(
        config, [*overrides, *VARIANTS[variant], f"seed={seed}", f"name={plain.name}-{variant}-seed{seed}"]
    )


def test_truth(cfg: Config) -> dict:
    """The test split's true cells (the file ``weakcell score`` scores against)."""
    return read_truth_folder(cfg.data_dir / TRUTH, get_dataset(cfg.data.dataset).n_classes, "test")


def measure(cfg: Config, truth: dict | None, earlier: dict) -> tuple[dict[str, object], Matched, dict]:
    """Train (or reuse) one run, tune thresholds, infer the test split; its scores and matched detections."""
    folds_stage.run(cfg)
    cache_stage.run(cfg)
    # a run trained (or resumed) in an earlier call: this call's CPU seconds are a part of its cost, not it
    fresh = not cfg.run_dir.exists()
    cpu = time.process_time()
    metrics = train_stage.run(cfg)
    cpu = time.process_time() - cpu if fresh else earlier.get("train_cpu_s")
    thresholds_stage.run(cfg)
    folder = infer_stage.run(cfg)
    csv = folder / "cell_level.csv"
    truth = truth if truth is not None else test_truth(cfg)
    reading = cfg.evaluate.verified
    matched = match_images(
        submission_detections(csv, truth)[0], truth, get_dataset(cfg.data.dataset).n_classes, reading
    )
    low, high = bootstrap_interval(matched, cfg.ablate.bootstrap)
    run = read_json(cfg.model_dir / "run.json")
    gains = {s["name"]: s["gain"] for s in run.get("sources", []) if s.get("gain")}
    record = {
        "test_map": mean_ap(matched.ap()),
        "test_low": low,
        "test_high": high,
        "oof_cell_map": metrics.get("cell_map_confidence"),
        "oof_image_map": metrics.get("image_map"),
        "train_wall_s": round(float(metrics.get("seconds", 0.0))),
        "train_cpu_s": None if cpu is None else round(float(cpu)),
        "gains": gains,
    }
    return record, matched, truth


def paired(records: list[dict], matched: dict, bootstrap: int) -> list[dict]:
    """Per seed and variant other than ``without``: the difference to ``without`` and its paired interval."""
    rows = []
    for record in records:
        if record["variant"] == "without" or ("without", record["seed"]) not in matched:
            continue
        base = matched[("without", record["seed"])]
        low, high = paired_interval(matched[(record["variant"], record["seed"])], base, bootstrap)
        without = next(r for r in records if r["variant"] == "without" and r["seed"] == record["seed"])
        rows.append(
            {
                "variant": record["variant"],
                "seed": record["seed"],
                "difference": record["test_map"] - without["test_map"],
                "low": low,
                "high": high,
            }
        )
    return rows


def f3(value: object) -> str:
    return "-" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{value:.3f}"


def write_report(saved: dict, cfg: Config, out: Path) -> str:
    records, differences, external = saved["records"], saved["differences"], saved["external"]
    table = pd.DataFrame(records)
    load = ""
    if "load" in saved:
        load = (
            f" (1-minute load average {saved['load'][0]:.1f} at the start, {saved['load'][1]:.1f} at the end)"
        )
    lines = [
        "# What external data buys (`make bench-external`)",
        "",
        f"`{saved['command']}` ({saved['when']}; {saved['cpu']}, {os.cpu_count()} cores shared with other "
        f"engineers' jobs{load}, no GPU, one thread per process "
        f"(OMP_NUM_THREADS=1); {saved['seconds'] / 60:.0f} min wall for this call, finished runs reused). "
        "Wall times on a shared machine say little: the CPU seconds of each training are the cost.",
        "",
        *slice_note(records, cfg),
        (__doc__ or "").split("\n\n")[1].replace("\n", " "),
        "",
        (__doc__ or "").split("\n\n")[2].replace("\n", " "),
        "",
        f"The external set: {sum(external['formats'].values())} images, formats {external['formats']}, "
        f"stored sides {external['sizes']} px; per-channel intensity scale {list(LOOK.gain)} (so the gain "
        f"that undoes it is {[round(1 / g, 2) for g in LOOK.gain]}).",
        "",
        f"## Test mAP per seed (organisers' metric, verified={cfg.evaluate.verified}, "
        f"{cfg.synthetic.n_test} test images)",
        "",
        "| seed | variant | test mAP | 95% interval | difference to `without` | paired 95% interval | excludes 0 |",
        "|---:|---|---:|---|---:|---|---|",
    ]
    by_key = {(d["variant"], d["seed"]): d for d in differences}
    for r in sorted(records, key=lambda r: (r["seed"], list(VARIANTS).index(r["variant"]))):
        d = by_key.get((r["variant"], r["seed"]))
        diff = (
            f"{d['difference']:+.3f} | [{d['low']:+.3f}, {d['high']:+.3f}] | "
            f"{'yes' if d['low'] > 0 or d['high'] < 0 else 'no'}"
            if d
            else "- | - | -"
        )
        lines.append(
            f"| {r['seed']} | {r['variant']} | {f3(r['test_map'])} | [{f3(r['test_low'])}, {f3(r['test_high'])}] | {diff} |"
        )
    lines += [
        "",
        "## Mean ± sd over the seeds",
        "",
        "| variant | test mAP | difference | OOF cell mAP | OOF image mAP | train wall s | train CPU s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    diffs = pd.DataFrame(differences)
    for variant, group in table.groupby("variant", sort=False):
        d = diffs[diffs["variant"] == variant]["difference"] if len(diffs) else pd.Series(dtype=float)
        diff = f"{d.mean():+.3f} ± {d.std():.3f}" if len(d) > 1 else (f"{d.mean():+.3f}" if len(d) else "-")
        cpu = group["train_cpu_s"].dropna()
        spread = f" ± {group['test_map'].std():.3f}" if len(group) > 1 else ""
        lines.append(
            f"| {variant} | {group['test_map'].mean():.3f}{spread} | {diff} | "
            f"{group['oof_cell_map'].mean():.3f} | {group['oof_image_map'].mean():.3f} | "
            f"{group['train_wall_s'].mean():.0f} | {f'{cpu.mean():.0f}' if len(cpu) else '-'} |"
        )
    gains = [g for r in records for g in r["gains"].values()]
    if gains:
        measured = np.mean(gains, axis=0)
        lines += [
            "",
            "Measured intensity gain of the external set (R, G, B, Y; the same for every run that reads it): "
            + ", ".join(f"{c[0].upper()} {g:.2f}" for c, g in zip(CHANNELS, measured))
            + f" against {', '.join(f'{1 / g:.2f}' for g in LOOK.gain)} that undoes the set's scale.",
        ]
    lines += ["", "## Reading", "", *verdict(table, diffs), ""]
    out.write_text("\n".join(lines))
    return "\n".join(verdict(table, diffs))


def slice_note(records: list[dict], cfg: Config) -> list[str]:
    """A line saying the report covers fewer seeds than the benchmark's (``ablate.seeds``), when it does."""
    seeds, planned = sorted({r["seed"] for r in records}), list(cfg.ablate.seeds or [cfg.seed])
    if set(planned) <= set(seeds):
        return []
    return [
        f"**A slice of the benchmark**: seed(s) {seeds} of {planned}; one seed says how much this seed's "
        "runs differ, not how much the difference moves with the seed.",
        "",
    ]


def verdict(table: pd.DataFrame, diffs: pd.DataFrame) -> list[str]:
    lines = []
    for variant in diffs["variant"].unique() if len(diffs) else []:
        d = diffs[diffs["variant"] == variant]
        excluding = int(((d["low"] > 0) | (d["high"] < 0)).sum())
        lines.append(
            f"- `{variant}` vs `without`: {d['difference'].mean():+.3f} test mAP over {len(d)} seed(s) "
            f"({', '.join(f'{v:+.3f}' for v in d['difference'])}); the paired interval excludes 0 at "
            f"{excluding} of {len(d)} seeds."
        )
    return lines


def main() -> None:
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "external-bench.yaml"))
    parser.add_argument(
        "--seeds", type=int, nargs="*", default=None, help="default: the config's ablate.seeds"
    )
    parser.add_argument("--variants", nargs="*", default=["without", "with"], choices=list(VARIANTS))
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "external.md")
    parser.add_argument("--report-only", action="store_true", help="rewrite the report from <out>.json")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value for every run")
    args = parser.parse_args()
    records_file = args.out.with_suffix(".json")
    cfg = load_config(args.config, args.overrides)
    if args.report_only:
        print(write_report(json.loads(records_file.read_text()), cfg, args.out))
        return
    start, load = time.perf_counter(), os.getloadavg()[0]
    earlier = json.loads(records_file.read_text()) if records_file.is_file() else {"records": []}
    external = prepare(args.config, args.overrides)
    records, matched, truth = [], {}, None
    for seed in args.seeds or cfg.ablate.seeds or [cfg.seed]:
        for variant in args.variants:
            run_cfg = variant_config(args.config, args.overrides, variant, seed)
            before = next((r for r in earlier["records"] if (r["variant"], r["seed"]) == (variant, seed)), {})
            print(f"bench_external: {variant}, seed {seed} -> {run_cfg.run_dir}", flush=True)
            record, matched[(variant, seed)], truth = measure(run_cfg, truth, before)
            records.append({"variant": variant, "seed": seed, **record})
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    saved = {
        "command": "python benchmarks/bench_external.py "
        + " ".join(
            [
                *(["--seeds", *map(str, args.seeds)] if args.seeds else []),
                "--variants",
                *args.variants,
                *args.overrides,
            ]
        ),
        "when": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": next(
            (line.split(":", 1)[1].strip() for line in cpu.splitlines() if "Model name" in line),
            platform.processor(),
        ),
        "seconds": time.perf_counter() - start,
        "load": [load, os.getloadavg()[0]],
        "external": external,
        "records": records,
        "differences": paired(records, matched, cfg.ablate.bootstrap),
    }
    # runs of an earlier call that this one did not score (other seeds or variants) stay in the report
    done = {(r["variant"], r["seed"]) for r in records}
    for key in ("records", "differences"):
        saved[key] += [r for r in earlier.get(key, []) if (r["variant"], r["seed"]) not in done]
    records_file.write_text(json.dumps(saved, indent=2, default=float) + "\n")
    print(write_report(saved, cfg, args.out))
    print(f"bench_external -> {args.out} (records {records_file})")


if __name__ == "__main__":
    main()
