"""Gated vs plain attention in the MIL head (``mil.gated``), on the same fold backbones.

The MIL head's attention is gated by default (Ilse et al. 2018: ``tanh(Vh) * sigmoid(Uh)`` instead of
``tanh(Vh)``). For each outer fold of a trained run's final round this embeds every training cell once with
that fold's backbone, trains two MIL heads on the same embeddings, seed and schedule, one gated and one
plain, and scores the held-out fold's predictions out of fold:

- the image level (``image_level.csv``, the 2018 submission): image mAP, macro-F1 at 0.5, expected
  calibration error over every (image, class) pair;
- the cell level through the competition engine, organisers' reading and every class judged in every
  image: the cell x image term (``infer.image_power=3``, ``image_best_cell=0.25``: the leaderboard's
  "+ attention MIL" formula), the MIL head's own instance probabilities, and the attention-weighted image
  probability (``image x min(attention share, 1)``). The default submission (``infer.image_power=0``, the
  cell's own probability) does not read the head at all, so it is one row for both.

Run from the repository root after the run is trained (``make ablate CONFIG=configs/bench.yaml`` or
``make refine``):

    python benchmarks/bench_mil_gate.py [--config configs/bench.yaml] [--seeds 42 43 44]

Prints the table and writes ``benchmarks/mil-gate.md``. The heads and embeddings it trains live in
``runs/<run>/mil-gate/`` (finished heads are reused on a rerun).
"""

from __future__ import annotations

import argparse
import platform
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
OUT = Path(__file__).with_name("mil-gate.md")
HEADS = {"gated (default)": True, "plain tanh": False}


def fold_heads(cfg, data, fold: int, work: Path) -> dict[str, tuple[pd.DataFrame, pd.DataFrame]]:
    """Fold ``fold``'s out-of-fold image and cell tables from a gated and a plain MIL head trained on the
    final round's fold backbone's embeddings (the same embeddings, seed and schedule for both)."""
    model = create_model("cell", cfg, data.n_classes)
    model.load_state_dict(load_state_dict(cfg.model_dir / f"fold{fold}" / "cell" / "model.pt"))
    plan = FoldModel((fold,), work / f"fold{fold}", cfg.seed + fold)
    held_out = HeldOut.of(data, plan)
    embedded = embed(cfg, data, plan, held_out, model)
    bags = BagSplit.of(data, plan, held_out)
    tables = {}
    for name, gated in HEADS.items():
        head_cfg = cfg.model_copy(update={"mil": cfg.mil.model_copy(update={"gated": gated})})
        head_plan = FoldModel((fold,), work / f"fold{fold}" / ("gated" if gated else "plain"), plan.seed)
        mil_out = stage2(head_cfg, data, head_plan, held_out, bags, embedded.embeddings)
        tables[name] = oof_tables(data, held_out, bags, mil_out, embedded.cell_probs)
    return tables


def cell_scores(cells: pd.DataFrame, images: pd.DataFrame, columns: list[str]) -> dict[str, pd.DataFrame]:
    """The head-dependent cell scores of one head's OOF tables, keyed by (image_id, cell_id)."""
    image_of_cell = images.set_index("image_id").loc[cells["image_id"], columns].to_numpy()
    keys = cells[["image_id", "cell_id"]]
    term = cell_confidence(
        cells[columns].to_numpy(), image_of_cell, cells["image_id"].to_numpy(), IMAGE_POWER, BEST_CELL
    )
    attention = np.minimum(cells[[c.replace("p_", "att_") for c in columns]].to_numpy(), 1.0)
    instance = cells[[f"mil_{c}" for c in columns]].to_numpy()
    return {
        "cell x image term": keys.assign(**dict(zip(columns, term.T))),
        "MIL instance": keys.assign(**dict(zip(columns, instance.T))),
        "image x attention": keys.assign(**dict(zip(columns, (image_of_cell * attention).T))),
    }


def run_rows(cfg, work: Path) -> list[dict[str, object]]:
    data = load_training_set(cfg)
    truth = data.cell_truth
    if truth is None:
        raise SystemExit(
            f"bench_mil_gate: {cfg.data.dataset} has no true cell labels to score the cells against"
        )
    columns = prob_columns(data.n_classes)
    folds = sorted(data.images["fold"].unique().tolist())
    per_fold = [fold_heads(cfg, data, k, work) for k in folds]
    labels = data.images.set_index("image_id")["labels"]
    cells_alone = pd.concat([tables[next(iter(HEADS))][1] for tables in per_fold], ignore_index=True)
    alone = cells_alone[["image_id", "cell_id", *columns]]
    rows: list[dict[str, object]] = [
        {"run": cfg.name, "round": cfg.refine.rounds, "head": "none: cells alone (the default submission)"}
        | {f"cell alone ({r})": truth.score(alone, r)["map"] for r in ("image", "all")}
    ]
    for name in HEADS:
        images = pd.concat([tables[name][0] for tables in per_fold], ignore_index=True)
        cells = pd.concat([tables[name][1] for tables in per_fold], ignore_index=True)
        y_true = to_multi_hot(labels.loc[images["image_id"]].tolist(), data.n_classes)
        probs = images[columns].to_numpy()
        row: dict[str, object] = {
            "run": cfg.name,
            "round": cfg.refine.rounds,
            "head": name,
            "image mAP": mean_average_precision(y_true, probs),
            "image F1 @0.5": macro_f1(y_true, probs >= 0.5),
            "ECE": expected_calibration_error(y_true, probs),
        }
        for score_name, table in cell_scores(cells, images, columns).items():
            for reading in ("image", "all"):
                row[f"{score_name} ({reading})"] = truth.score(table, reading)["map"]
        rows.append(row)
    return rows


def markdown(table: pd.DataFrame) -> str:
    shown = table.copy()
    for column in shown.columns:
        if shown[column].dtype.kind == "f":
            shown[column] = shown[column].map(lambda v: "" if pd.isna(v) else f"{v:.3f}")
    header = "| " + " | ".join(shown.columns) + " |"
    rule = "|" + "---|" * len(shown.columns)
    lines = ["| " + " | ".join(str(v) for v in row) + " |" for row in shown.itertuples(index=False)]
    return "\n".join([header, rule, *lines])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/bench.yaml")
    parser.add_argument("--seeds", type=int, nargs="*", help="training seeds (default: the config's seed)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    start = time.perf_counter()
    base = load_config(args.config)
    rows = []
    for seed in args.seeds or [base.seed]:
        cfg = seed_config(base, seed)  # the run ``make ablate`` trains for that seed
        rows += run_rows(cfg, cfg.run_dir / "mil-gate")
        table = pd.DataFrame(rows)
        print(table.to_string(index=False), flush=True)
    seconds = time.perf_counter() - start
    command = "python benchmarks/bench_mil_gate.py --config " + args.config
    if args.seeds:
        command += " --seeds " + " ".join(map(str, args.seeds))
    text = "\n\n".join(
        [
            "# Gated vs plain attention in the MIL head (`python benchmarks/bench_mil_gate.py`)",
            __doc__.split("\n\n", 1)[1].split("\n\nRun from")[0],
            f"Command: `{command}`. Machine: {cpu_model()}, Python {platform.python_version()}; {seconds / 60:.1f} min.",
            markdown(table),
        ]
    )
    args.out.write_text(text + "\n")
    print(f"bench_mil_gate -> {args.out}")


if __name__ == "__main__":
    main()
