"""The 2018 competition's claim, measured: "threshold tuning has a stronger impact than architectural
changes under imbalance" (the source design), on the 2018-flavoured synthetic benchmark.

Every variant trains round 0 (cells inherit image labels, then attention MIL; ``refine.rounds=0``) on the
same data, cache and folds as ``configs/hpa2018-demo.yaml``, with the same epochs, batch and learning rate:

- baseline: the demo's backbone and plain BCE (round 0 of the demo run itself, reused when trained);
- a second backbone at the same budget (``--backbone``, default efficientnet_lite0);
- the kit's class-imbalance options: ``train.loss=focal``, ``train.class_weights=sqrt_inverse``,
  ``train.sampler=balanced``.

For each: image macro-F1 of the out-of-fold images at 0.5 and with per-class thresholds cross-fitted over
the folds (tuned on four folds' images, applied to the fifth), and of the test split at 0.5 and at the
thresholds tuned on all OOF images (``make thresholds``). The claim holds when tuning the baseline's
thresholds gains more than any variant gains over the baseline at 0.5.

    python benchmarks/bench_hpa2018.py [--config configs/hpa2018-demo.yaml] [--only NAME ...] [ARGS key=value]

Finished variants are reused (their runs are ``runs/<name>-bench-<variant>/``). Writes
``benchmarks/hpa2018.md`` from every variant that has finished.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from weakcell import folds as folds_stage
from weakcell import infer as infer_stage
from weakcell import thresholds as thresholds_stage
from weakcell import train as train_stage
from weakcell.cache import build as cache_stage
from weakcell.config import Config, load_config
from weakcell.constants import prob_columns
from weakcell.data.datasets import get_dataset
from weakcell.evaluate import image_level_scores, image_targets, submission_image_scores
from weakcell.synthetic import writer as data_stage
from weakcell.synthetic.truth import read_image_labels
from weakcell.thresholds import read_thresholds

REPO = Path(__file__).resolve().parents[1]
BASELINE = "baseline"
IMBALANCE = {
    "focal": ["train.loss=focal"],
    "class_weights": ["train.class_weights=sqrt_inverse"],
    "balanced_sampler": ["train.sampler=balanced"],
}


def variants(backbone: str) -> dict[str, list[str]]:
    """Variant name -> its overrides on top of the config (round 0 only)."""
    return {BASELINE: [], f"backbone_{backbone}": [f"model.backbone={backbone}"], **IMBALANCE}


def variant_config(config: str, base: list[str], name: str, overrides: list[str]) -> Config:
    """The variant's config: round 0 of run ``<name>-bench-<variant>``. The baseline is round 0 of the
    config's own run (``make demo`` trained it already), its test predictions written beside, not over,
    the demo's submission."""
    run = load_config(config, base).name
    own = [f"infer.output={run}-bench-{name}"] if name == BASELINE else [f"name={run}-bench-{name}"]
    return load_config(config, [*base, *own, "refine.rounds=0", *overrides])


def measure(cfg: Config) -> dict[str, float | None]:
    """Train (or reuse) one variant, tune its thresholds, infer the test split; its image scores."""
    start = time.perf_counter()
    train_stage.run(cfg)
    thresholds_stage.run(cfg)
    out_dir = infer_stage.run(cfg)
    seconds = time.perf_counter() - start
    spec = get_dataset(cfg.data.dataset)
    n = spec.n_classes
    oof = pd.read_parquet(cfg.model_dir / "oof_image.parquet")
    y_true = image_targets(oof["image_id"], read_image_labels(cfg.data_dir, spec), n)
    oof_scores = image_level_scores(
        y_true, oof[prob_columns(n)].to_numpy(), None, oof["fold"].to_numpy(), cfg.thresholds
    )
    thresholds = read_thresholds(cfg.model_dir / "thresholds.json")
    test = submission_image_scores(cfg, out_dir, thresholds)
    return {
        "oof_f1_at_05": oof_scores["macro_f1_at_05"],
        "oof_f1_tuned_cross_fitted": oof_scores["macro_f1_tuned_cross_fitted"],
        "oof_map": oof_scores["map"],
        "test_f1_at_05": test["macro_f1_at_05"],
        "test_f1_tuned": test["macro_f1_tuned"],
        "oof_classes": oof_scores["classes_scored"],
        "test_classes": test["classes_scored"],
        "seconds_this_call": round(seconds, 1),
    }


def verdict(table: pd.DataFrame) -> str:
    """Whether tuning the baseline's thresholds gains more than any other variant gains at 0.5."""
    if BASELINE not in table.index or len(table) < 2:
        return "_not decided: the baseline and at least one variant must have finished_"
    base = table.loc[BASELINE]
    lines = []
    for split, at05, tuned in (
        ("OOF (cross-fitted)", "oof_f1_at_05", "oof_f1_tuned_cross_fitted"),
        ("test", "test_f1_at_05", "test_f1_tuned"),
    ):
        tuning_gain = base[tuned] - base[at05]
        others = (table[at05] - base[at05]).drop(BASELINE)
        best = others.idxmax()
        holds = tuning_gain > others.max()
        lines.append(
            f"- {split}: tuning the baseline's thresholds {tuning_gain:+.3f} macro-F1; the best other variant "
            f"at 0.5, {best}, {others.max():+.3f} (all: "
            + ", ".join(f"{k} {v:+.3f}" for k, v in others.items())
            + f"). The claim {'holds' if holds else 'does not hold'} here."
        )
    return "\n".join(lines)


def write_report(table: pd.DataFrame, cfg: Config, command: str, out: Path, total_s: float) -> None:
    columns = [
        "oof_f1_at_05",
        "oof_f1_tuned_cross_fitted",
        "test_f1_at_05",
        "test_f1_tuned",
        "oof_map",
        "oof_classes",
        "test_classes",
        "seconds_this_call",
    ]
    header = "| variant | " + " | ".join(columns) + " |\n|---|" + "---|" * len(columns) + "\n"
    body = "\n".join(
        f"| {name} | "
        + " | ".join(
            "-" if pd.isna(row[c]) else (f"{row[c]:.3f}" if isinstance(row[c], float) else str(row[c]))
            for c in columns
        )
        + " |"
        for name, row in table.iterrows()
    )
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    text = (
        "# The 2018 competition: threshold tuning vs architecture vs imbalance options (`make bench-hpa2018`)\n\n"
        f"`{command}` ({when}; {platform.node()}, {os.cpu_count()} CPUs shared with other jobs). Data: the "
        f"2018-flavoured synthetic set of `{cfg.data_dir}` ({cfg.synthetic.n_train} train / "
        f"{cfg.synthetic.n_test} test images, 28 classes drawn with the real 2018 frequencies, so the rarest "
        f"classes are absent from so small a set), {cfg.folds.n_splits} folds, round 0 only (inheritance + "
        f"attention MIL), {cfg.train.epochs} epochs stage 1, {cfg.mil.epochs} epochs MIL, crops "
        f"{cfg.cache.crop_size} px. Macro-F1 over the classes with a positive among the scored images "
        "(`*_classes`); OOF tuned = per-class thresholds tuned on four folds' images and applied to the fifth; "
        "test tuned = thresholds tuned on every OOF image (`make thresholds`). `seconds_this_call`: wall time "
        "of this call for the variant (train + thresholds + infer; near 0 when the run was reused).\n\n"
        + header
        + body
        + "\n\n## Does the claim hold here?\n\n"
        + verdict(table)
        + f"\n\nTotal wall time of this call: {total_s:.0f} s.\n"
    )
    out.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "hpa2018-demo.yaml"))
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument(
        "--only", nargs="*", default=None, help="variants to train now (others: reused if done)"
    )
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "hpa2018.md")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value for every variant")
    args = parser.parse_args()
    start = time.perf_counter()
    base_cfg = load_config(args.config, args.overrides)
    # the shared inputs: data, folds and cache (each reused when finished)
    data_stage.run(base_cfg)
    folds_stage.run(base_cfg)
    cache_stage.run(base_cfg)
    rows = {}
    for name, overrides in variants(args.backbone).items():
        cfg = variant_config(args.config, args.overrides, name, overrides)
        finished = (cfg.model_dir / "oof_image.parquet").is_file()
        if args.only is not None and name not in args.only and not finished:
            continue
        print(f"bench_hpa2018: {name} ({' '.join(overrides) or 'the config as is'})", flush=True)
        rows[name] = measure(cfg)
        print(f"bench_hpa2018: {name} {json.dumps(rows[name])}", flush=True)
    table = pd.DataFrame.from_dict(rows, orient="index")
    command = "python benchmarks/bench_hpa2018.py " + " ".join(
        [*(f"--only {' '.join(args.only)}".split() if args.only else []), *args.overrides]
    )
    write_report(table, base_cfg, command.strip(), args.out, time.perf_counter() - start)
    print(table.to_string())
    print(verdict(table))
    print(f"bench_hpa2018 -> {args.out}")


if __name__ == "__main__":
    main()
