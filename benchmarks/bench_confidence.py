"""The submitted cell confidence, re-tuned under both readings of the 2021 metric.

A cell's confidence for class c is ``cell * term ** infer.image_power`` with ``term = (1 - b) * image +
b * best cell`` (``b = infer.image_best_cell``; ``weakcell.scoring.cell_confidence``). The formula was
chosen when the kit judged every class in every image; the organisers judge class c only in images with a
true cell of class c (``evaluate.verified=image``), where the image term has less to do. For every
(power, b) of a grid this scores:

- out of fold (selection): the competition mAP of each trained round's OOF confidences on the cache's
  cells against the true cells of the training images, under both readings;
- held out (the figure to trust): the competition mAP of the test split's confidences recomputed from the
  final submission's ``pred_cell.parquet`` on the cache's masks, under both readings; no model and no
  choice here saw those images.

The setting with the best OOF mAP of the final round is picked per reading, then read off on the test split.
Run from the repository root after ``make demo`` (or on the bench, 2,000 test images, after
``make ablate CONFIG=configs/bench.yaml``):

    python benchmarks/bench_confidence.py [--config configs/demo.yaml]
    python benchmarks/bench_confidence.py --config configs/bench.yaml \\
        --submission submissions/bench-ablate/refinement-1-round

Prints the table and writes ``benchmarks/confidence.md``.
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

import numpy as np
import pandas as pd

from weakcell.cache.store import CellCache
from weakcell.cell_truth import read_truth_folder
from weakcell.competition_metric import READINGS, label_detections, score_found
from weakcell.config import InferConfig, load_config
from weakcell.constants import prob_columns
from weakcell.devices import cpu_model
from weakcell.evaluate import read_round, submission_dir
from weakcell.scoring import cell_confidence, cell_score_table, oof_cell_scores
from weakcell.synthetic.truth import TRUTH
from weakcell.training_set import load_training_set

POWERS = (0.0, 0.5, 1.0, 2.0, 3.0, 4.0)
BEST_CELL = (0.0, 0.25, 0.5, 1.0)


def grid() -> list[tuple[float, float]]:
    """(power, best cell share) pairs; at power 0 the image term is gone, so b does not matter."""
    return [(0.0, 0.0)] + [(p, b) for p, b in itertools.product(POWERS[1:], BEST_CELL)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/confidence.md"))
    parser.add_argument(
        "--submission",
        type=Path,
        help="the folder of the final round's pred_cell.parquet (default: the config's `make infer` folder; "
        "after `make ablate CONFIG=configs/bench.yaml`: submissions/bench-ablate/refinement-1-round)",
    )
    args = parser.parse_args()
    start = time.perf_counter()
    cfg = load_config(args.config, [])
    data = load_training_set(cfg)
    if data.cell_truth is None:
        raise SystemExit(f"{cfg.data.dataset} has no per-cell truth: run on the synthetic set")
    n = data.n_classes
    rounds = [r for r in range(cfg.refine.rounds + 1) if (cfg.round_dir(r) / "oof_cell.parquet").is_file()]
    oof = {r: read_round(cfg.round_dir(r))[:2] for r in rounds}
    submission = args.submission or submission_dir(cfg)
    if not (submission / "pred_cell.parquet").is_file():
        raise SystemExit(
            f"bench_confidence: no {submission / 'pred_cell.parquet'}; run `make infer` or name --submission"
        )
    cells = pd.read_parquet(submission / "pred_cell.parquet")
    cache = CellCache(cfg.cache_dir)
    test_ids = cells["image_id"].unique().tolist()
    masks = {i: cache.masks(i).cells for i in test_ids}
    cell = cells[prob_columns(n)].to_numpy(np.float64)
    image = cells[prob_columns(n, "image_")].to_numpy(np.float64)
    keys = cells[["image_id", "cell_id"]].reset_index(drop=True)

    rows = []
    truth = read_truth_folder(cfg.data_dir / TRUTH, n, "test")
    for power, best in grid():
        infer = InferConfig(image_power=power, image_best_cell=best)
        row: dict[str, float] = {"power": power, "best cell": best}
        tables = {
            str(r): cell_score_table("confidence", oof_cell, oof_image, n, infer)
            for r, (oof_image, oof_cell) in oof.items()
        }
        oof_maps = oof_cell_scores(tables, data.cell_truth, READINGS)
        confidence = cell_confidence(cell, image, keys["image_id"].to_numpy(), power, best)
        found = label_detections(masks, keys.assign(**dict(zip(prob_columns(n), confidence.T))), truth, n)
        for reading in READINGS:
            for r in tables:
                row[f"OOF r{r} {reading}"] = oof_maps[reading][r]["map"]
            row[f"test {reading}"] = score_found(found, truth, n, reading)["map"]
        rows.append(row)
        print(" ".join(f"{k} {v:.3f}" for k, v in row.items()), flush=True)
    table = pd.DataFrame(rows)
    final = max(rounds)
    default = (InferConfig().image_power, InferConfig().image_best_cell)
    picks = {}
    for reading in READINGS:
        best_row = table.loc[table[f"OOF r{final} {reading}"].idxmax()]
        picks[reading] = (float(best_row["power"]), float(best_row["best cell"]))

    header = "| " + " | ".join(table.columns) + " |\n|" + "---|" * len(table.columns) + "\n"
    body = "\n".join(
        "| "
        + " | ".join(f"{v:g}" if k in ("power", "best cell") else f"{v:.4f}" for k, v in r.items())
        + " |"
        for r in table.to_dict("records")
    )

    def at(setting: tuple[float, float], column: str) -> float:
        power, best = setting
        best = best if power else 0.0  # at power 0 the image term, and so b, is gone
        match = table[(table["power"] == power) & (table["best cell"] == best)]
        return float(match[column].iloc[0])

    named = {
        "the cell alone (power 0)": (0.0, 0.0),
        "the plain product (power 1, best cell 0)": (1.0, 0.0),
        "power 3, best cell 0.25 (the default before the organisers' reading)": (3.0, 0.25),
    }
    if default[0] and default not in named.values():
        named[f"the default (power {default[0]:g}, best cell {default[1]:g})"] = default
    lines = []
    for reading in READINGS:
        pick = picks[reading]
        oof_col, test_col = f"OOF r{final} {reading}", f"test {reading}"
        parts = [f"{name}: OOF {at(s, oof_col):.4f}, test {at(s, test_col):.4f}" for name, s in named.items()]
        lines.append(
            f"- verified={reading}: best OOF (round {final}) at power {pick[0]:g}, best cell {pick[1]:g}: "
            f"OOF {at(pick, oof_col):.4f}, test {at(pick, test_col):.4f}; " + "; ".join(parts)
        )
    text = (
        "# The submitted cell confidence under both readings of the metric "
        "(`python benchmarks/bench_confidence.py`)\n\n"
        f"Run `{cfg.name}` ({args.config}), rounds {rounds}; OOF = competition mAP of the round's "
        "out-of-fold confidences (as a file would carry them) against the training images' true cells; test = competition mAP of the final submission's "
        f"cells ({len(test_ids)} held-out images, `{submission}`) with the confidence recomputed. verified=image is the "
        "organisers' reading, verified=all judges every class in every image.\n\n"
        + "\n".join(lines)
        + "\n\n"
        + header
        + body
        + f"\n\n{time.perf_counter() - start:.0f} s on {cpu_model()}.\n"
    )
    args.out.write_text(text)
    print("\n".join(lines))
    print(f"bench_confidence: {len(table)} settings x {len(READINGS)} readings -> {args.out}")


if __name__ == "__main__":
    main()
