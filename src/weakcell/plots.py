"""Figures of ``make evaluate``: per-class AP bars, F1-versus-threshold small multiples and the per-class
table as an image.

Figures are built with ``matplotlib.figure.Figure`` (the Agg canvas; pyplot and its global state are never
touched, so this is safe in worker processes and headless machines) and written atomically: a reader
never sees half a PNG.
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from weakcell.metrics import f1_per_class, predicted_classes
from weakcell.outputs import atomic_savefig

DPI = 110
TITLE_WIDTH = 30  # characters of a small-multiple panel's title line at fontsize 7 (2.6 inches wide)
COLOURS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3")  # one per bar series, in order


def save_figure(figure: Figure, path: str | os.PathLike[str], dpi: int = DPI, tight: bool = False) -> Path:
    """Write ``figure`` as a PNG through a temporary file, then rename (atomic on one file system);
    ``tight`` crops the margins to what is drawn."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_savefig(path, figure, dpi=dpi, bbox_inches="tight" if tight else None, pad_inches=0.15)


def _class_label(c: int, class_names: Sequence[str]) -> str:
    return f"{c} {class_names[c]}" if c < len(class_names) else str(c)


def ap_bars(
    series: Mapping[str, np.ndarray], class_names: Sequence[str], path: str | os.PathLike[str], title: str
) -> Path:
    """Horizontal grouped bars, one group per class and one bar per series (e.g. image AP, OOF cell AP,
    test competition AP); NaN (no positive) is written as "n/a". The legend gives each series' mean."""
    names = list(series)
    n_classes = len(next(iter(series.values())))
    height = 0.8 / max(len(names), 1)  # bar thickness, in class rows
    figure = Figure(figsize=(9, 1.6 + 0.42 * n_classes))
    ax = figure.subplots()
    rows = np.arange(n_classes)
    for k, name in enumerate(names):
        values = np.asarray(series[name], dtype=np.float64)
        offsets = rows - 0.4 + height * (k + 0.5)
        mean = np.nanmean(values) if np.isfinite(values).any() else np.nan
        ax.barh(
            offsets,
            np.nan_to_num(values, nan=0.0),
            height=height,
            color=COLOURS[k % len(COLOURS)],
            label=f"{name} (mean {mean:.3f})",
        )
        for y, value in zip(offsets, values):
            text = "n/a" if np.isnan(value) else f"{value:.2f}"
            ax.text(max(value, 0.0) + 0.01 if np.isfinite(value) else 0.01, y, text, va="center", fontsize=6)
    ax.set_yticks(rows, [_class_label(c, class_names) for c in range(n_classes)], fontsize=8)
    ax.invert_yaxis()  # class 0 on top
    ax.set_xlim(0, 1.08)
    ax.set_xlabel("average precision")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.06), fontsize=8, frameon=False)
    ax.set_title(title, fontsize=10)
    figure.tight_layout()
    return save_figure(figure, path, tight=True)


def threshold_curves(
    y_true: np.ndarray,
    probs: np.ndarray,
    thresholds: np.ndarray | None,
    class_names: Sequence[str],
    path: str | os.PathLike[str],
    step: float = 0.01,
    min_positives: int = 1,
    columns: int = 5,
) -> Path:
    """One panel per class: OOF image F1 against the threshold (``probs >= t``), the tuned threshold as a
    solid line (when given) and 0.5 dashed. y_true, probs: ``(N, C)``. Classes with fewer than
    ``min_positives`` positives are marked as keeping the fallback threshold (too rare to tune)."""
    grid = np.arange(step, 1.0, step)  # (T,)
    f1 = np.stack([f1_per_class(y_true, predicted_classes(probs, t)) for t in grid])  # (T, C)
    n_classes = y_true.shape[1]
    positives = np.asarray(y_true).sum(0).astype(int)
    rows = -(-(n_classes + 1) // columns)  # one spare panel for the legend
    figure = Figure(figsize=(2.6 * columns, 2.1 * rows))
    axes: list[Axes] = list(figure.subplots(rows, columns, squeeze=False).ravel())
    for c, ax in enumerate(axes[:n_classes]):
        name = class_names[c] if c < len(class_names) else ""
        rare = ", fallback" if 0 < positives[c] < min_positives else ""
        # whole names, wrapped to the panel's width (a cut "Vesicles and punctate cy" names no class)
        ax.set_title(textwrap.fill(f"{c} {name} (n={positives[c]}{rare})", TITLE_WIDTH), fontsize=7)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.tick_params(labelsize=6)
        ax.grid(alpha=0.3)
        if positives[c] == 0:
            ax.text(0.5, 0.5, "no positives", ha="center", va="center", fontsize=8, color="grey")
            continue
        ax.plot(grid, f1[:, c], color=COLOURS[0], lw=1.2, label="F1")
        ax.axvline(0.5, color="grey", ls="--", lw=0.8, label="0.5")
        if thresholds is not None:
            t = float(thresholds[c])
            best = float(f1_per_class(y_true[:, c : c + 1], predicted_classes(probs[:, c : c + 1], t))[0])
            ax.axvline(t, color=COLOURS[1], lw=1.0, label="tuned")
            ax.plot([t], [best], "o", color=COLOURS[1], ms=3)
    legend_ax = axes[n_classes]
    handles, labels = axes[int(np.argmax(positives > 0))].get_legend_handles_labels()
    for ax in axes[n_classes:]:
        ax.set_axis_off()
    if handles:
        legend_ax.legend(handles, labels, loc="center", fontsize=8, title="OOF image F1", title_fontsize=8)
    figure.supxlabel("threshold", fontsize=8)
    figure.tight_layout()
    return save_figure(figure, path)


def table_figure(table: pd.DataFrame, path: str | os.PathLike[str], title: str) -> Path:
    """``table`` (already formatted as strings) drawn as an image, header row shaded."""
    n_rows, n_columns = table.shape
    figure = Figure(figsize=(0.8 * n_columns + 1.0, 0.6 + 0.25 * (n_rows + 1)))
    ax = figure.subplots()
    ax.set_axis_off()
    drawn = ax.table(
        cellText=table.to_numpy(str).tolist(),
        colLabels=[str(c) for c in table.columns],
        loc="upper center",
        cellLoc="right",
    )
    drawn.auto_set_font_size(False)
    drawn.set_fontsize(8)
    drawn.auto_set_column_width(list(range(n_columns)))
    for (row, _), cell in drawn.get_celld().items():
        cell.set_height(1.0 / (n_rows + 2))
        if row == 0:
            cell.set_facecolor("#e6e6e6")
    ax.set_title(title, fontsize=9)
    return save_figure(figure, path, tight=True)
