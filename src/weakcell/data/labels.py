"""Label strings both ways (``"7|1|2"`` and ``"7 1 2"``), label files, and multi-hot matrices."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from weakcell.data.datasets import DatasetSpec
from weakcell.data.ids import RULE, is_safe_id
from weakcell.errors import WeakcellError


class LabelError(WeakcellError, ValueError):
    """A label file or string that cannot be trusted; the message names the file and row."""


def parse_labels(text: str, sep: str, n_classes: int, where: str = "label") -> list[int]:
    """``"7|1|2"`` -> ``[1, 2, 7]`` (sorted, unique). Raises LabelError naming ``where``."""
    tokens = [t for t in str(text).strip().split(sep) if t.strip()]
    if sep == " ":  # tolerate the other separator inside space-separated files, never silently
        tokens = [t for token in tokens for t in token.split(" ") if t]
    if not tokens:
        raise LabelError(f"{where}: empty label string")
    labels = []
    for token in tokens:
        try:
            value = int(token.strip())
        except ValueError:
            raise LabelError(f"{where}: {token!r} is not a class index (separator is {sep!r})") from None
        if not 0 <= value < n_classes:
            raise LabelError(f"{where}: class {value} is out of range 0..{n_classes - 1}")
        labels.append(value)
    return sorted(set(labels))


def format_labels(labels: Iterable[int], sep: str) -> str:
    """``[7, 1, 2]`` -> ``"1|2|7"`` with ``sep="|"``."""
    return sep.join(str(c) for c in sorted(set(int(c) for c in labels)))


def read_label_file(path: str | os.PathLike[str], spec: DatasetSpec) -> pd.DataFrame:
    """Read a Kaggle label file into ``ID`` (str) and ``labels`` (sorted list of ints), in file order.

    Every problem is reported at once with its row number (1 = first data row): missing columns,
    empty or malformed labels, out-of-range classes, duplicate IDs, IDs that are not safe file-name stems
    (``weakcell.data.ids``: they become paths). One problem is one line. Extra columns are kept.
    """
    path = Path(path)
    if not path.is_file():
        raise LabelError(f"label file not found: {path}")
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise LabelError(f"{path}: not a readable CSV ({err})") from err
    missing = [c for c in (spec.id_column, spec.label_column) if c not in table.columns]
    if missing:
        raise LabelError(
            f"{path}: missing column(s) {missing}; a {spec.name} label file has "
            f"'{spec.id_column},{spec.label_column}', found {list(table.columns)}"
        )
    problems: list[str] = []
    labels: list[list[int]] = []
    for row, (image_id, text) in enumerate(zip(table[spec.id_column], table[spec.label_column]), start=1):
        if not image_id.strip():
            problems.append(f"row {row}: empty {spec.id_column}")
        elif not is_safe_id(image_id):
            problems.append(f"row {row}: {spec.id_column} {image_id!r} is not a safe image ID ({RULE})")
        try:
            labels.append(parse_labels(text, spec.label_sep, spec.n_classes, where=f"row {row} ({image_id})"))
        except LabelError as err:
            problems.append(str(err))
            labels.append([])
    duplicated = table[spec.id_column][table[spec.id_column].duplicated(keep=False)]
    for image_id in dict.fromkeys(duplicated):
        rows = [int(i) + 1 for i in np.flatnonzero(table[spec.id_column].to_numpy() == image_id)]
        problems.append(f"duplicate ID {image_id} on rows {rows}")
    if len(problems) == 1:
        raise LabelError(f"{path}: {problems[0]}")
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise LabelError(f"{path}: {len(problems)} problem(s):\n  {shown}{more}")
    out = table.rename(columns={spec.id_column: "ID"}).drop(columns=[spec.label_column])
    out.insert(1, "labels", labels)
    return out.reset_index(drop=True)


def to_multi_hot(labels: Sequence[Sequence[int]], n_classes: int) -> np.ndarray:
    """List of label lists -> ``(N, n_classes)`` uint8 matrix."""
    matrix = np.zeros((len(labels), n_classes), dtype=np.uint8)
    for row, classes in enumerate(labels):
        matrix[row, list(classes)] = 1
    return matrix
