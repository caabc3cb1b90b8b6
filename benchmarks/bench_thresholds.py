"""Threshold tuning, measured honestly: image macro-F1 of per-class thresholds tuned on four folds' OOF
images and applied to the fifth (cross-fitted), against a plain 0.5, for several ``thresholds.shrinkage``.

Run from the repository root after training (``make ablate`` leaves a dozen rounds to compare):

    python benchmarks/bench_thresholds.py [RUN_OR_ROUND_DIR ...] [--config configs/demo.yaml]

Without directories it takes every folder under ``runs/`` that holds an ``oof_image.parquet``. Prints the
table and writes ``benchmarks/thresholds.md``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from weakcell.config import ThresholdsConfig, load_config
from weakcell.constants import prob_columns
from weakcell.data.datasets import get_dataset
from weakcell.data.labels import read_label_file
from weakcell.evaluate import image_targets
from weakcell.metrics import macro_f1
from weakcell.thresholds import cross_fitted_f1

SHRINKAGE = (0.0, 10.0, 20.0, 40.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="*", type=Path)
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/thresholds.md"))
    args = parser.parse_args()
    cfg = load_config(args.config, [])
    spec = get_dataset(cfg.data.dataset)
    labels = read_label_file(cfg.data_dir / spec.label_file, spec)
    dirs = args.dirs or sorted(p.parent for p in cfg.path(cfg.paths.runs).glob("**/oof_image.parquet"))
    dirs = [d for d in dirs if not d.name.startswith("fold")]  # folds hold their own OOF share only
    if not dirs:
        raise SystemExit("no runs/**/oof_image.parquet: run `make demo` (and `make ablate`) first")
    rows = []
    for folder in dirs:
        oof = pd.read_parquet(folder / "oof_image.parquet")
        y = image_targets(oof["image_id"], labels, spec.n_classes)
        probs = oof[prob_columns(spec.n_classes)].to_numpy()
        row = {"round": str(folder), "at 0.5": macro_f1(y, probs >= 0.5)}
        for k in SHRINKAGE:
            tuning = ThresholdsConfig(shrinkage=k)
            row[f"shrinkage {k:g}"] = cross_fitted_f1(y, probs, oof["fold"].to_numpy(), tuning)
        rows.append(row)
        print(" ".join(f"{v:.3f}" if isinstance(v, float) else v for v in row.values()), flush=True)
    table = pd.DataFrame(rows)
    gains = {c: float((table[c] - table["at 0.5"]).mean()) for c in table.columns[2:]}
    wins = {c: int((table[c] > table["at 0.5"]).sum()) for c in table.columns[2:]}
    header = "| " + " | ".join(table.columns) + " |\n|" + "---|" * len(table.columns) + "\n"
    body = "\n".join(
        "| " + " | ".join(v if isinstance(v, str) else f"{v:.3f}" for v in r.values()) + " |"
        for r in table.to_dict(orient="records")
    )
    summary = (
        f"| mean gain over 0.5 ({len(table)} rounds) | - | "
        + " | ".join(f"{gains[c]:+.3f}" for c in gains)
        + " |\n| rounds where tuning beats 0.5 | - | "
        + " | ".join(f"{wins[c]} of {len(table)}" for c in wins)
        + " |"
    )
    text = (
        "# Threshold tuning, cross-fitted (`python benchmarks/bench_thresholds.py`)\n\n"
        "Image macro-F1 of the out-of-fold predictions: at 0.5, and with per-class thresholds tuned on the "
        "other four folds' images and applied to each fold's own, for each `thresholds.shrinkage` "
        "(0 = each class's own best threshold, rare classes 0.5).\n\n" + header + body + "\n" + summary + "\n"
    )
    args.out.write_text(text)
    print(
        f"bench_thresholds: {len(table)} rounds; mean gain over 0.5 "
        + ", ".join(f"{c} {g:+.3f}" for c, g in gains.items())
        + f" -> {args.out}"
    )


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
