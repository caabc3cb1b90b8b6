"""The report of ``make evaluate``: per-class plots and table, the best and worst out-of-fold images'
attention maps, and the summary printed at the end. Scoring is ``weakcell.evaluate``; nothing here scores.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from weakcell.config import Config
from weakcell.constants import prob_columns
from weakcell.outputs import atomic_write_text, writing

if TYPE_CHECKING:
    from weakcell.training_set import TrainingSet


def image_bce(y_true: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """``(N,)`` mean binary cross-entropy over classes of each image's predictions (nats)."""
    p = np.clip(np.asarray(probs, dtype=np.float64), 1e-7, 1 - 1e-7)
    y = np.asarray(y_true, dtype=np.float64)
    return -(y * np.log(p) + (1 - y) * np.log(1 - p)).mean(1)


def best_and_worst(image_ids: list[str], losses: np.ndarray, n: int) -> tuple[list[str], list[str]]:
    """The ``n`` images of lowest and of highest loss (disjoint; the worst first in their list)."""
    order = np.argsort(losses, kind="stable")
    best = [image_ids[i] for i in order[:n]]
    worst = [image_ids[i] for i in order[::-1] if image_ids[i] not in best][:n]
    return best, worst


def _format(value: Any) -> str:
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.3f}"
    return str(value)


def markdown_table(table: pd.DataFrame) -> str:
    """A GitHub markdown table of ``table`` (floats to 3 decimals, NaN as -)."""
    lines = ["| " + " | ".join(map(str, table.columns)) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(_format(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def write_text(text: str, path: Path) -> Path:
    """Write ``text`` to ``path`` atomically (its folder made when missing); returns ``path``."""
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, text)


def summary_lines(evaluation: Mapping[str, Any]) -> list[str]:
    """The compact table printed at the end of the stage."""

    def f(value: Any) -> str:
        return "  -  " if value is None else f"{value:.3f}"

    image = evaluation["image_oof"]
    lines = [
        f"  image OOF  ({image['images']} images)   mAP {f(image['map'])}   macro-F1 @0.5 "
        f"{f(image['macro_f1_at_05'])}  tuned {f(image['macro_f1_tuned'])}  cross-fitted "
        f"{f(image['macro_f1_tuned_cross_fitted'])}"
    ]
    for source, scores in evaluation.get("image_oof_sources", {}).items():
        lines.append(
            f"  image OOF  ({scores['images']} images of source {source})   mAP {f(scores['map'])}   "
            f"macro-F1 @0.5 {f(scores['macro_f1_at_05'])}"
        )
    if "image_test" in evaluation:
        test = evaluation["image_test"]
        lines.append(
            f"  image test ({test['images']} images)    mAP {f(test['map'])}   macro-F1 @0.5 "
            f"{f(test['macro_f1_at_05'])}  tuned {f(test['macro_f1_tuned'])}"
        )
    readings = evaluation.get("verified", {})
    for key, title in (
        ("cell_oof", "cell OOF, competition mAP"),
        ("cell_test", "cell test, competition mAP"),
    ):
        for suffix, reading in (("", readings.get("default")), ("_other", readings.get("other"))):
            if key + suffix in evaluation:
                scores = evaluation[key + suffix]
                parts = "  ".join(
                    f"{name} {f(v['map'])}" for name, v in scores.items() if isinstance(v, dict)
                )
                lines.append(f"  {title}, verified={reading}{'' if suffix else ' (default)'}:  {parts}")
    if readings:
        lines.append(
            "  (verified=image: the organisers' reading, a class is judged only in images with a true cell of "
            "it; verified=all: every class in every image)"
        )
    return lines


def write_report(
    cfg: Config,
    evaluation: dict[str, Any],
    table: pd.DataFrame,
    data: TrainingSet,
    oof_image: pd.DataFrame,
    oof_cell: pd.DataFrame,
    thresholds: np.ndarray | None,
    y_true: np.ndarray,
    out_dir: Path,
) -> list[Path]:
    """Plots, the per-class table and the best/worst attention maps of one evaluated round; records the
    chosen images in ``evaluation["attention"]``. ``y_true``: (N, C) 0/1 labels of ``oof_image``'s images.
    Returns the files written."""
    from weakcell import plots
    from weakcell.attention_maps import draw_attention_maps

    spec, n = data.spec, data.n_classes
    names = list(spec.classes)
    probs = oof_image[prob_columns(n)].to_numpy(np.float64)
    label = f"{cfg.name}, round {evaluation['round']}"
    written = []

    bars = {"image AP (OOF)": table["image_ap"].to_numpy(float)}
    if "cell_ap_oof" in table:
        bars[f"cell AP (OOF, {evaluation['plotted_variant']})"] = table["cell_ap_oof"].to_numpy(float)
    if "cell_ap_test" in table:
        bars["cell AP (test, competition metric)"] = table["cell_ap_test"].to_numpy(float)
    written.append(plots.ap_bars(bars, names, out_dir / "ap_per_class.png", f"{label}: AP per class"))
    written.append(
        plots.threshold_curves(
            y_true,
            probs,
            thresholds,
            names,
            out_dir / "threshold_curves.png",
            step=cfg.thresholds.step,
            min_positives=cfg.thresholds.min_positives,
        )
    )
    at = "the tuned thresholds" if thresholds is not None else "0.5 (no thresholds.json)"
    title = f"{label}: OOF image predictions per class at {at}"
    legend = (
        "\n\ncell_ap_oof: the competition metric (IoU >= 0.6) of the out-of-fold "
        f"{evaluation['plotted_variant']} on the training split; cell_ap_test: the same of cell_level.csv on "
        f"the test split; both read the metric as evaluate.verified={cfg.evaluate.verified}"
        if "cell_ap_oof" in table
        else ""
    )
    text = f"# {title}{legend}\n\n{markdown_table(table)}"
    written.append(write_text(text, out_dir / "per_class.md"))
    shown = table.map(_format)
    shown["name"] = table["name"]  # whole names: the table's columns size to their text
    written.append(plots.table_figure(shown, out_dir / "per_class.png", title))

    ids = oof_image["image_id"].astype(str).tolist()
    best, worst = best_and_worst(ids, image_bce(y_true, probs), cfg.evaluate.attention_images)
    for group, chosen in (("best", best), ("worst", worst)):
        folder = out_dir / f"attention_{group}"
        for old in folder.glob("*.png"):  # a previous evaluation's picks
            old.unlink()
        if chosen:
            written += draw_attention_maps(
                cfg.data_dir,
                spec.train_dir,
                data.cache,
                oof_cell,
                oof_image,
                chosen,
                folder,
                names,
                labels=data.images,
            )
    evaluation["attention"] = {"ranked_by": "image-level BCE", "best": best, "worst": worst}
    return written
