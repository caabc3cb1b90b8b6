"""What ``fit`` leaves to read besides the weights: ``epochs.csv`` (one row per epoch) and ``curves.png``."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from weakcell.outputs import atomic_csv, atomic_savefig

# Columns of epochs.csv that measure the machine, not the training (they differ between identical runs).
TIMING_COLUMNS = ("seconds", "samples_per_s")


def format_duration(seconds: float) -> str:
    """``42 s``, ``3.5 min`` or ``1.2 h``: an estimate, to the precision it has."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def write_epoch_log(history: list[dict[str, float]], out_dir: Path) -> None:
    """``epochs.csv``, one row per epoch, rewritten whole (atomically) after each epoch."""
    atomic_csv(out_dir / "epochs.csv", pd.DataFrame(history))


def plot_curves(history: list[dict[str, float]], out_dir: Path) -> None:
    """``curves.png``: losses, other val metrics and the learning rate against epochs."""
    frame = pd.DataFrame(history)
    losses = [c for c in frame.columns if c.endswith("loss")]
    metrics = [c for c in frame.columns if c not in {"epoch", "step", "lr", *losses, *TIMING_COLUMNS}]
    figure = Figure(figsize=(13, 3.8))  # the OO API: no pyplot, no GUI backend
    # a fixed layout: matplotlib's constrained layout costs ~0.5 s per save on a laptop core
    axes = figure.subplots(1, 3, gridspec_kw={"left": 0.05, "right": 0.98, "bottom": 0.14, "wspace": 0.25})
    for ax, columns, title in (
        (axes[0], losses, "loss"),
        (axes[1], metrics, "validation"),
        (axes[2], ["lr"], "lr"),
    ):
        for column in columns:
            measured = frame[["epoch", column]].dropna()  # validation runs every train.validate_every epochs
            ax.plot(measured["epoch"], measured[column], marker="o", label=column)
        ax.set(title=title, xlabel="epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if columns:
            ax.legend(fontsize=8)
    atomic_savefig(out_dir / "curves.png", figure, dpi=90)
