"""Cross-fitted stage 2 (issue 24, Deliver 2): does the MIL head do better when it learns from embeddings of
cells its backbone never trained on?

The run's MIL head learns from its fold backbone's embeddings of that backbone's own training cells
(in-sample) and predicts from embeddings of held-out cells, which sit elsewhere (``benchmarks/mil-shift.md``).
Refinement's round-0 inner models give, for outer fold k, backbones that never saw fold j (model {k, j}
holds out both). So for each outer fold k and each j != k, on the same inner backbone {k, j}:

- **in-sample head**: the inner model's own MIL head (trained on its in-sample embeddings of the three other
  folds), predicting fold k;
- **cross-fitted head**: a fresh MIL head trained on the backbone's embeddings of fold j (cells it never
  saw), predicting fold k (cells it never saw either: training and prediction see the same kind of input);

each averaged over the four j. Both therefore use the same backbones, and differ only in what the head
learnt from. The run's own outer head (in-sample, on the full outer backbone) is the reference row.

Columns: image mAP and macro-F1 at 0.5 out of fold, expected calibration error over every (image, class)
pair (10 equal-width bins), and the competition mAP of the cells when the image term is used
(``cell x image term ** 3``, the leaderboard's "+ attention MIL" formula, cell probabilities from the outer
models), under the organisers' reading and with every class judged in every image.

Run from the repository root after ``make ablate CONFIG=configs/bench.yaml`` (or ``make refine`` of any run
with ``refine.rounds`` >= 1, which trains the inner models):

    python benchmarks/bench_cross_fit.py [--config configs/bench.yaml] [--seeds 43 44]

Prints the table and writes ``benchmarks/cross-fit.md``; each run's rows are kept in ``cross-fit.json``, so a
call for some seeds reports them beside the runs measured before (``--seeds``: which to measure now).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from weakcell.ablate import seed_config
from weakcell.config import load_config
from weakcell.constants import prob_columns
from weakcell.data.labels import to_multi_hot
from weakcell.devices import cpu_model
from weakcell.fold_model import BagSplit, FoldModel, HeldOut, embed, oof_tables, stage2
from weakcell.metrics import expected_calibration_error, macro_f1, mean_average_precision
from weakcell.models import create_model
from weakcell.scoring import cell_confidence
from weakcell.training_set import load_training_set
from weakcell.weights import load_state_dict

IMAGE_POWER, BEST_CELL = 3.0, 0.25  # the leaderboard's "+ attention MIL" image term (ablate.IMAGE_TERM)
OUT = Path(__file__).with_name("cross-fit.md")
RECORDS = OUT.with_suffix(".json")  # every run's rows, so that a call for some seeds keeps the others


def inner_folder(run_dir: Path, a: int, b: int) -> Path:
    return run_dir / "inner" / f"fold{min(a, b)}-{max(a, b)}"


def cross_fitted_images(cfg, data, outer: int, inner: int, work: Path) -> pd.DataFrame:
    """Fold ``outer``'s image probabilities from inner backbone {outer, inner} with a MIL head trained on
    that backbone's embeddings of fold ``inner`` (cells it never trained on)."""
    source = inner_folder(cfg.run_dir, outer, inner)
    model = create_model("cell", cfg, data.n_classes)
    model.load_state_dict(load_state_dict(source / "cell" / "model.pt"))
    plan = FoldModel((outer,), work / f"fold{outer}-on{inner}", cfg.seed + 100 * outer + inner)
    held_out = HeldOut.of(data, plan)
    embedded = embed(cfg, data, plan, held_out, model)
    fit_images = data.images[data.images["fold"] == inner]
    bags = BagSplit(
        train=data.bags(fit_images["image_id"].tolist()),
        train_targets=to_multi_hot(fit_images["labels"].tolist(), data.n_classes).astype(np.float32),
        val=data.bags(held_out.image_ids),
        val_targets=held_out.image_targets.astype(np.float32),
    )
    mil_out = stage2(cfg, data, plan, held_out, bags, embedded.embeddings)
    return oof_tables(data, held_out, bags, mil_out, embedded.cell_probs)[0]


def mean_images(tables: list[pd.DataFrame], columns: list[str]) -> pd.DataFrame:
    """The per-image mean of several image tables' probabilities."""
    return pd.concat(tables).groupby("image_id", sort=False)[columns].mean().reset_index()


def run_rows(cfg, work: Path) -> list[dict[str, object]]:
    """The three image models of one run, scored out of fold."""
    data = load_training_set(cfg)
    n = data.n_classes
    columns = prob_columns(n)
    folds = sorted(data.images["fold"].unique().tolist())
    outer_images = pd.read_parquet(cfg.run_dir / "oof_image.parquet")
    outer_cells = pd.read_parquet(cfg.run_dir / "oof_cell.parquet")
    in_sample, crossed = [], []
    for k in folds:
        for j in (f for f in folds if f != k):
            own = pd.read_parquet(inner_folder(cfg.run_dir, k, j) / "oof_image.parquet")
            in_sample.append(own[own["fold"] == k])
            crossed.append(cross_fitted_images(cfg, data, k, j, work))
    labels = data.images.set_index("image_id")["labels"]
    alone = outer_cells[["image_id", "cell_id", *columns]]  # the cells' own probability: no image term
    rows: list[dict[str, object]] = [
        {"run": cfg.name, "image model": "none: cells alone (the default submission)", "head's images": 0}
        | {f"cell mAP x image term ({r})": data.cell_truth.score(alone, r)["map"] for r in ("image", "all")}
    ]
    n_images, n_folds = len(data.images), len(folds)
    variants = {  # each with the images its head learns from: the outer's 4 folds, the inner's 3, one fold
        "outer model, in-sample head (the run's)": (outer_images, n_images * (n_folds - 1) // n_folds),
        "inner backbones, in-sample heads": (
            mean_images(in_sample, columns),
            n_images * (n_folds - 2) // n_folds,
        ),
        "inner backbones, cross-fitted heads": (mean_images(crossed, columns), n_images // n_folds),
    }
    for name, (table, head_images) in variants.items():
        table = table.set_index("image_id").loc[outer_images["image_id"]]
        y_true = to_multi_hot(labels.loc[table.index].tolist(), n)
        probs = table[columns].to_numpy()
        image_of_cell = table.loc[outer_cells["image_id"], columns].to_numpy()
        confidence = cell_confidence(
            outer_cells[columns].to_numpy(),
            image_of_cell,
            outer_cells["image_id"].to_numpy(),
            IMAGE_POWER,
            BEST_CELL,
        )
        scores = outer_cells[["image_id", "cell_id"]].assign(**dict(zip(columns, confidence.T)))
        row: dict[str, object] = {
            "run": cfg.name,
            "image model": name,
            "head's images": head_images,
            "image mAP": mean_average_precision(y_true, probs),
            "image F1 @0.5": macro_f1(y_true, probs >= 0.5),
            "ECE": expected_calibration_error(y_true, probs),
        }
        for reading in ("image", "all"):
            row[f"cell mAP x image term ({reading})"] = data.cell_truth.score(scores, reading)["map"]
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/bench.yaml")
    parser.add_argument(
        "--seeds",
        nargs="*",
        type=int,
        help="training seeds to measure now (default: the config's ablate.seeds)",
    )
    args = parser.parse_args()
    base = load_config(args.config)
    seeds = args.seeds or base.ablate.seeds or [base.seed]
    start = time.perf_counter()
    measured = {}
    for seed in seeds:
        cfg = seed_config(base, seed)  # make ablate's run of that seed
        measured[cfg.name] = run_rows(cfg, cfg.run_dir.parent / f"{cfg.name}-crossfit")
    kept = json.loads(RECORDS.read_text()) if RECORDS.is_file() else {}
    by_run = {name: rows for name, rows in kept.items() if name not in measured} | measured
    RECORDS.write_text(json.dumps(by_run, indent=1))
    names = sorted(by_run, key=lambda name: (name != base.name, name))
    table = pd.DataFrame([row for name in names for row in by_run[name]])
    numbers = [c for c in table.columns if c not in ("run", "image model")]
    summary = table.groupby("image model", sort=False)[numbers].agg(["mean", "std"])
    lines = [
        "| image model | " + " | ".join(numbers) + " |",
        "|---|" + "---|" * len(numbers),
    ]
    for model, values in summary.iterrows():
        cells = [
            "-"
            if pd.isna(values[(c, "mean")])
            else f"{values[(c, 'mean')]:.0f}"  # a count of images
            if c == "head's images"
            else f"{values[(c, 'mean')]:.3f}" + (f" ± {values[(c, 'std')]:.3f}" if len(names) > 1 else "")
            for c in numbers
        ]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    per_run = "\n".join(
        ["| " + " | ".join(table.columns) + " |", "|---" * len(table.columns) + "|"]
        + [
            "| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in row) + " |"
            for row in table.itertuples(index=False)
        ]
    )
    text = (
        f"# Cross-fitted stage 2 (`python benchmarks/bench_cross_fit.py --config {args.config}`)\n\n"
        f"Runs {', '.join(names)} (mean ± sd over them), round 0 of each, its outer models and its refinement's "
        f"inner models; {cpu_model()}, {time.perf_counter() - start:.0f} s for {', '.join(measured)} "
        f"(the other runs' rows from `{RECORDS.name}`).\n\n"
        + (__doc__ or "").split("\n\n", 1)[1].split("Run from")[0]
        + "\n".join(lines)
        + "\n\n## Every run\n\n"
        + per_run
        + "\n"
    )
    OUT.write_text(text)
    print("\n".join(lines))
    print(f"-> {OUT}")


if __name__ == "__main__":
    main()
