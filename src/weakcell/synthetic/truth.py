"""Reading the per-cell truth of a synthetic set back, and measuring what label inheritance gets wrong.

Weak supervision's first step gives every cell its image's labels. ``inheritance_errors`` says how
often that is false on a set, with two numbers:

- pair error: of all (cell, class) pairs a cell inherits from its image label, the fraction the cell
  does not express (a Negative cell in a positive image inherits only false pairs);
- cell error: the fraction of cells whose inherited label set differs from their own.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from weakcell.data.datasets import DatasetSpec, get_dataset
from weakcell.data.labels import parse_labels, read_label_file

SPEC = get_dataset("synthetic")
TRUTH = "truth"  # folder of the per-cell truth inside a synthetic set


def _parse_column(texts: pd.Series, where: Path, spec: DatasetSpec) -> list[list[int]]:
    """Cell label strings -> sorted int lists; an empty string is a cell without any class (a set
    without Negative writes it so)."""
    return [
        parse_labels(text, spec.label_sep, spec.n_classes, where=f"{where} row {row}") if text.strip() else []
        for row, text in enumerate(texts, start=1)
    ]


def read_truth(data_dir: str | os.PathLike[str], spec: DatasetSpec = SPEC) -> pd.DataFrame:
    """``truth/cells.csv`` of a synthetic set of layout ``spec``, one row per cell, with ``labels`` as
    sorted int lists."""
    path = Path(data_dir) / TRUTH / "cells.csv"
    if not path.is_file():
        raise FileNotFoundError(f"no per-cell truth at {path}; generate the set with `make data`")
    cells = pd.read_csv(
        path, dtype={"image_id": str, "Label": str, "split": str, "cell_line": str}, keep_default_na=False
    )
    cells["labels"] = _parse_column(cells["Label"], path, spec)
    return cells


def read_image_labels(data_dir: str | os.PathLike[str], spec: DatasetSpec = SPEC) -> pd.DataFrame:
    """Image labels of both splits (``train.csv`` and ``truth/test.csv``): ``ID``, ``labels``, ``split``."""
    root = Path(data_dir)
    splits = {"train": root / spec.label_file, "test": root / TRUTH / "test.csv"}
    tables = [
        read_label_file(path, spec).assign(split=split) for split, path in splits.items() if path.is_file()
    ]
    return pd.concat(tables, ignore_index=True)


def inheritance_errors(cells: pd.DataFrame, images: pd.DataFrame) -> dict[str, float]:
    """Pair and cell error of "every cell inherits its image's labels" (see the module docstring).

    ``cells``: ``image_id``, ``labels`` (a cell's own); ``images``: ``ID``, ``labels``."""
    image_labels = dict(zip(images["ID"], images["labels"]))
    inherited_pairs = false_pairs = wrong_cells = 0
    for image_id, own in zip(cells["image_id"], cells["labels"]):
        inherited = set(image_labels[image_id])
        inherited_pairs += len(inherited)
        false_pairs += len(inherited - set(own))
        wrong_cells += inherited != set(own)
    return {
        "pair_error": false_pairs / max(inherited_pairs, 1),
        "cell_error": wrong_cells / max(len(cells), 1),
        "cells": float(len(cells)),
    }
