"""The shift the MIL head meets: it trains on embeddings of cells its fold's backbone trained on
(in-sample) and predicts from embeddings of held-out cells. For each fold model of a trained run, stage-1
outputs of the training cells against those of the held-out cells: mean probability of inherited positive
and negative pairs, image mAP of the cells' max, mean embedding norm.

Run from the repository root after ``make train`` (any config):

    python benchmarks/bench_mil_shift.py [--config configs/bench.yaml]

Prints the table and writes ``benchmarks/mil-shift.md``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from weakcell.config import load_config
from weakcell.data.labels import to_multi_hot
from weakcell.engine import predict
from weakcell.labelled_crops import LabelledCrops
from weakcell.metrics import mean_average_precision, sigmoid
from weakcell.models import create_model
from weakcell.scoring import max_pool_images
from weakcell.training_set import load_training_set
from weakcell.weights import load_state_dict


def fold_shift(cfg, data, fold: int) -> list[dict[str, object]]:
    """In-sample and held-out figures of fold ``fold``'s round-0 cell model."""
    model = create_model("cell", cfg, data.n_classes)
    model.load_state_dict(load_state_dict(cfg.run_dir / f"fold{fold}" / "cell" / "model.pt"))
    cells = data.cells.index.to_numpy()
    out = predict(
        model, LabelledCrops(data.cache, cells, data.cell_targets, None), cfg.train, batch_keys=("index",)
    )
    probs = np.zeros((len(data.cache.cells), data.n_classes))
    probs[out["index"]] = sigmoid(out["logits"])
    norms = np.zeros(len(data.cache.cells))
    norms[out["index"]] = np.linalg.norm(out["embeddings"], axis=1)
    rows = []
    for name, held_out in (("in-sample (MIL trains on)", False), ("held out (MIL predicts on)", True)):
        chosen = data.cells.index[(data.cells["fold"] == fold) == held_out].to_numpy()
        images = data.images[(data.images["fold"] == fold) == held_out]
        pooled = max_pool_images(data.cache.cells.loc[chosen], probs[chosen], images["image_id"].tolist())
        positive = data.cell_targets[chosen] > 0.5
        rows.append(
            {
                "fold": fold,
                "cells": name,
                "mean p, inherited 1": float(probs[chosen][positive].mean()),
                "mean p, inherited 0": float(probs[chosen][~positive].mean()),
                "image mAP of max cell": mean_average_precision(
                    to_multi_hot(images["labels"].tolist(), data.n_classes), pooled
                ),
                "embedding norm": float(norms[chosen].mean()),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/bench.yaml")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/mil-shift.md"))
    args = parser.parse_args()
    cfg = load_config(args.config, [])
    data = load_training_set(cfg)
    folds = sorted(data.images["fold"].unique().tolist())
    table = pd.DataFrame([row for fold in folds for row in fold_shift(cfg, data, fold)])
    summary = table.drop(columns="fold").groupby("cells", sort=False).agg(["mean", "std"])
    print(summary.to_string(float_format=lambda v: f"{v:.3f}"))
    lines = ["| cells | " + " | ".join(c for c in table.columns if c not in ("fold", "cells")) + " |"]
    lines.append("|---" * (len(table.columns) - 1) + "|")
    for cells, row in summary.iterrows():
        values = [
            f"{row[(c, 'mean')]:.3f} ± {row[(c, 'std')]:.3f}"
            for c in table.columns
            if c not in ("fold", "cells")
        ]
        lines.append(f"| {cells} | " + " | ".join(values) + " |")
    args.out.write_text(
        f"# The MIL head's input shift (`python benchmarks/bench_mil_shift.py --config {args.config}`)\n\n"
        f"Round-0 fold models of `{cfg.run_dir}` ({cfg.model.backbone}, {len(folds)} folds), mean ± sd over "
        "folds.\n\n" + "\n".join(lines) + "\n"
    )
    print(f"bench_mil_shift: {len(folds)} folds -> {args.out}")


if __name__ == "__main__":
    main()
