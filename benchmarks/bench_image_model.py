"""The whole-image model beside the cell model on the synthetic 2021 test split: does it earn a place in the
submitted confidence (``infer.image_model_rule``)?

The config's run is trained as ``make demo`` trains it (data, folds, cache, train, refine, thresholds; each
reused when finished), then its whole-image model (``make image-model``), then ``make infer`` once per rule
into ``submissions/<name>-image-<rule>/``: the same cell and MIL models and image model, the same test
images, only the rule differs. Each ``cell_level.csv`` is scored by the organisers' metric (what
``weakcell score`` prints) against the synthetic truth of the test split, and every rule against ``none``
(today's confidence, the default) by the paired bootstrap interval of the mAP difference
(``competition_metric.paired_interval``: both files scored on the same image resamples). The test images'
image mAP and macro-F1 at 0.5 of the MIL head and of the image model are reported beside them.

    python benchmarks/bench_image_model.py [--config configs/demo.yaml] [--rules none product mean replace]
        [--resamples 1000] [--out benchmarks/image-model.md] [key=value ...]

Writes ``benchmarks/image-model.md`` and its records ``benchmarks/image-model.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from weakcell import folds as folds_stage
from weakcell import image_model as image_model_stage
from weakcell import infer as infer_stage
from weakcell import refine as refine_stage
from weakcell import thresholds as thresholds_stage
from weakcell import train as train_stage
from weakcell.cache import build as cache_stage
from weakcell.cell_truth import read_truth_folder
from weakcell.combine import IMAGE_MODEL_RULES
from weakcell.competition_metric import (
    Matched,
    match_images,
    paired_interval,
    submission_detections,
    summarise,
)
from weakcell.config import Config, load_config
from weakcell.constants import prob_columns
from weakcell.data.datasets import get_dataset
from weakcell.devices import cpu_model
from weakcell.evaluate import image_targets
from weakcell.scoring import image_metrics
from weakcell.synthetic import writer as data_stage
from weakcell.synthetic.truth import TRUTH, read_image_labels

REPO = Path(__file__).resolve().parents[1]
REFERENCE = "none"


def train_everything(cfg: Config) -> dict[str, float]:
    """The run as ``make demo`` trains it, then its whole-image model; each stage reuses finished work."""
    for stage in (data_stage, folds_stage, cache_stage, train_stage, refine_stage, thresholds_stage):
        stage.run(cfg)
    return image_model_stage.run(cfg)


def rule_config(config: str, overrides: list[str], rule: str) -> Config:
    """The config of one rule: the image model on, the rule, its own submission folder."""
    base = load_config(config, overrides)
    return load_config(
        config,
        [
            *overrides,
            "image_model.enabled=true",
            f"infer.image_model_rule={rule}",
            f"infer.output={base.name}-image-{rule}",
        ],
    )


def test_image_scores(cfg: Config, folder: Path) -> dict[str, dict[str, float]]:
    """Test image mAP and macro-F1 at 0.5 of the MIL head (``pred_image.parquet``) and of the image model
    (``pred_image_model.parquet``) against the synthetic test labels."""
    spec = get_dataset(cfg.data.dataset)
    labels = read_image_labels(cfg.data_dir, spec)
    out = {}
    for name, file in (("MIL head", "pred_image.parquet"), ("whole-image model", "pred_image_model.parquet")):
        table = pd.read_parquet(folder / file)
        y_true = image_targets(table["image_id"], labels, spec.n_classes)
        out[name] = image_metrics(y_true, table[prob_columns(spec.n_classes)].to_numpy())
    return out


def markdown(rows: list[dict[str, object]]) -> str:
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"))
    parser.add_argument(
        "--rules", nargs="*", default=list(IMAGE_MODEL_RULES), choices=list(IMAGE_MODEL_RULES)
    )
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples of the test images")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "image-model.md")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value")
    args = parser.parse_args()
    start = time.perf_counter()
    rules = [REFERENCE, *(r for r in args.rules if r != REFERENCE)]
    cfg = rule_config(args.config, args.overrides, REFERENCE)
    image_model_metrics = train_everything(cfg)
    n_classes = get_dataset(cfg.data.dataset).n_classes
    truth = read_truth_folder(cfg.data_dir / TRUTH, n_classes, "test")
    matched: dict[str, Matched] = {}
    for rule in rules:
        out_dir = infer_stage.run(rule_config(args.config, args.overrides, rule))
        found, _ = submission_detections(out_dir / "cell_level.csv", truth)
        matched[rule] = match_images(found, truth, n_classes)
    rows = []
    for rule in rules:
        score = summarise(matched[rule], "image")["map"]
        row: dict[str, object] = {"rule": rule, "test mAP": f"{score:.3f}"}
        if rule == REFERENCE:
            row["difference vs none"], row["paired 95% interval"] = "", ""
        else:
            low, high = paired_interval(matched[rule], matched[REFERENCE], args.resamples)
            reference = summarise(matched[REFERENCE], "image")["map"]
            row["difference vs none"] = f"{score - reference:+.3f}"
            row["paired 95% interval"] = f"[{low:+.3f}, {high:+.3f}]"
        rows.append(row)
    images = test_image_scores(cfg, cfg.submission_dir)
    record = {
        "command": "python benchmarks/bench_image_model.py " + " ".join(args.overrides),
        "config": args.config,
        "cpu": cpu_model(),
        "test_images": len(truth),
        "rules": rows,
        "image_scores": images,
        "image_model": image_model_metrics,
        "seconds": time.perf_counter() - start,
    }
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=1))
    write_report(args.out, cfg, record)
    print(markdown(rows))
    print(f"bench_image_model -> {args.out}")


def write_report(out: Path, cfg: Config, record: dict) -> None:
    """``benchmarks/image-model.md`` from one call's record."""
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    section = cfg.image_model
    images = [
        {
            "model": name,
            "test image mAP": f"{s['image_map']:.3f}",
            "test macro-F1 @0.5": f"{s['f1_at_05']:.3f}",
        }
        for name, s in record["image_scores"].items()
    ]
    trained = record["image_model"]
    text = (
        "# The whole-image model beside the cell model (synthetic 2021 test split)\n\n"
        f"`{record['command'].strip()}` ({when}; {record['cpu']}, 2 cores shared with other work, no GPU). "
        f"Config `{record['config']}`: run `{cfg.name}` ({cfg.train.epochs} + {cfg.refine.epochs} epochs, "
        f"{cfg.refine.rounds} refinement round(s)); whole-image model {section.backbone} at {section.size} px, "
        f"{section.epochs} epochs, batch {section.batch_size}, lr {section.lr:g}, {cfg.folds.n_splits} folds "
        f"(OOF image mAP {trained['image_map']:.3f}, macro-F1 @0.5 {trained['f1_at_05']:.3f}; "
        f"{trained['seconds']:.0f} s of training). Every rule infers the same models on the same "
        f"{record['test_images']} test images (TTA {cfg.infer.tta}); the cell level is the organisers' metric "
        "(`weakcell score`, their reading) of each `cell_level.csv`, the interval the paired bootstrap of the "
        "difference against `none` over the test images (same resamples for both files).\n\n"
        "## The submitted confidence, by rule (`infer.image_model_rule`)\n\n"
        + markdown(record["rules"])
        + "\n\n## The image level of the test split\n\n"
        + markdown(images)
        + f"\n\nWall time of this call: {record['seconds']:.0f} s (finished stages are reused).\n"
    )
    out.write_text(text)


if __name__ == "__main__":
    main()
