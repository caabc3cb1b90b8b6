"""``weakcell score SUBMISSION.csv --truth DIR [--verified image|all] [--split S] [--json OUT]``: the 2021
competition metric of any cell-level file Kaggle would accept, against a truth folder.

The truth folder has the synthetic layout (``data/<set>/truth/``, what ``make data`` writes):
``DIR/<image_id>_cells.png``, an instance label image (8- or 16-bit PNG, 0 = background), and
``DIR/cells.csv`` with at least ``image_id,cell_id,Label`` (``Label`` ``|``-separated class indices; an empty
``Label`` is a cell of no class). The images of the truth are those ``cells.csv`` lists (``--split``
keeps the rows of one ``split``, e.g. the synthetic set's ``test``); one of them without a submission row
predicts nothing, and submission rows of other images are ignored, as the organisers' evaluator does.

Prints the mAP, the AP of every class and what was left out; ``--json OUT`` writes
``{"map": float, "ap": {"0": float or null, ...}, "verified": "image", ...}`` (null: the class has no true
cell). Exit code 0, or 2 with one line naming the file or row at fault.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from weakcell.competition_metric import READINGS, TrueCells, Verified, score_submission, true_cells
from weakcell.constants import HPA2021_CLASSES
from weakcell.data.ids import check_ids, inside
from weakcell.data.labels import LabelError, parse_labels
from weakcell.outputs import atomic_write_json

TRUTH_COLUMNS = ("image_id", "cell_id", "Label")


def read_true_mask_file(path: Path) -> np.ndarray:
    """An instance label image (8- or 16-bit single-channel PNG) as int64; clear errors otherwise."""
    if not path.is_file():
        raise FileNotFoundError(f"true mask {path} is missing: the truth folder needs <image_id>_cells.png")
    mask = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if mask is None:
        raise ValueError(f"true mask {path} is not a readable image")
    if mask.ndim != 2 or mask.dtype not in (np.uint8, np.uint16):
        raise ValueError(
            f"true mask {path} is {mask.dtype} with shape {mask.shape}: expected an 8- or 16-bit "
            "single-channel label image (0 = background, one value per cell)"
        )
    return mask.astype(np.int64)


def read_truth_folder(
    folder: str | os.PathLike[str], n_classes: int, split: str | None = None
) -> dict[str, TrueCells]:
    """``TrueCells`` of every image that ``folder/cells.csv`` lists (its ``split`` rows when given)."""
    folder = Path(folder)
    table_path = folder / "cells.csv"
    if not table_path.is_file():
        raise FileNotFoundError(f"no {table_path}: a truth folder holds cells.csv and <image_id>_cells.png")
    table = pd.read_csv(table_path, dtype=str, keep_default_na=False)
    missing = [c for c in TRUTH_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"{table_path}: missing column(s) {missing}; found {list(table.columns)}")
    if split is not None:
        if "split" not in table.columns:
            raise ValueError(f"{table_path} has no split column, so --split {split} cannot select rows")
        table = table[table["split"] == split]
        if table.empty:
            raise ValueError(f"{table_path} lists no cell of split {split!r}")
    try:
        cell_ids = [int(v) for v in table["cell_id"]]
    except ValueError:
        raise ValueError(f"{table_path}: cell_id holds a value that is not an integer") from None
    labels = []
    for row, text in zip(table.index, table["Label"]):
        try:
            labels.append(
                parse_labels(text, "|", n_classes, f"{table_path} row {row + 1}") if text.strip() else []
            )
        except LabelError as err:
            raise ValueError(str(err)) from None
    check_ids(table["image_id"], str(table_path))
    rows = pd.DataFrame({"image_id": table["image_id"].to_numpy(), "cell_id": cell_ids, "labels": labels})
    return {
        str(image_id): true_cells(
            read_true_mask_file(inside(folder, f"{image_id}_cells.png")),
            cells,
            n_classes,
            f"{image_id} ({table_path})",
        )
        for image_id, cells in rows.groupby("image_id", sort=False)
    }


def _json_ap(ap: np.ndarray) -> dict[str, float | None]:
    return {str(c): (None if math.isnan(v) else float(v)) for c, v in enumerate(ap)}


def report(result: dict, names: tuple[str, ...] | list[str]) -> list[str]:
    """The printed summary: mAP, AP per class, what was scored and what was left out."""
    ignored = result["ignored"]
    lines = [
        f"mAP {result['map']:.4f}  (verified={result['verified']}: "
        + (
            "classes judged only in images with a true cell of the class"
            if result["verified"] == "image"
            else "every class judged in every image"
        )
        + f"; IoU >= 0.6; {result['n_images']} truth images)",
        f"  {result['n_predictions']} predictions scored, {int(result['n_tp'].sum())} true positives; left out: "
        f"{ignored['empty']} empty masks, {ignored['unverified']} of unverified classes, "
        f"{ignored['other_images']} of images without truth; {result['n_ties']} tied confidences",
    ]
    for c, ap in enumerate(result["ap"]):
        name = names[c] if c < len(names) else str(c)
        shown = (
            "   -   (no true cell)"
            if math.isnan(ap)
            else f"{ap:.4f}  ({result['n_tp'][c]}/{result['n_gt'][c]} cells found)"
        )
        lines.append(f"  {c:>2} {name[:28]:<28} {shown}")
    return lines


def score_main(argv: list[str] | None = None) -> int:
    """Entry point of ``weakcell score``; see the module docstring."""
    parser = argparse.ArgumentParser(prog="weakcell score", description=__doc__.split("\n\n")[0])
    parser.add_argument("submission", help="a cell-level file: ID,ImageWidth,ImageHeight,PredictionString")
    parser.add_argument("--truth", required=True, help="folder with cells.csv and <image_id>_cells.png")
    parser.add_argument(
        "--verified", choices=READINGS, default="image", help="image: the organisers' reading (default)"
    )
    parser.add_argument(
        "--split", default=None, help="score only the truth images of this split (cells.csv 'split')"
    )
    parser.add_argument("--classes", type=int, default=len(HPA2021_CLASSES), help="number of classes (19)")
    parser.add_argument("--json", default=None, help="also write the scores to this JSON file")
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exit_:
        return 0 if exit_.code == 0 else 2
    try:
        truth = read_truth_folder(args.truth, args.classes, args.split)
        if not Path(args.submission).is_file():
            raise FileNotFoundError(f"no submission file {args.submission}")
        verified: Verified = args.verified
        result = score_submission(args.submission, truth, args.classes, verified)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    names = HPA2021_CLASSES if args.classes == len(HPA2021_CLASSES) else [str(c) for c in range(args.classes)]
    print(f"score: {args.submission} against {args.truth}" + (f" (split {args.split})" if args.split else ""))
    print("\n".join(report(result, names)))
    if args.json:
        payload = {
            "map": None if math.isnan(result["map"]) else result["map"],
            "ap": _json_ap(result["ap"]),
            "verified": result["verified"],
            "n_gt": result["n_gt"].tolist(),
            "n_tp": result["n_tp"].tolist(),
            "n_predictions": result["n_predictions"],
            "ignored": result["ignored"],
            "n_ties": result["n_ties"],
            "n_images": result["n_images"],
        }
        target = Path(args.json)
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(target, payload)
        print(f"score: -> {target}")
    return 0


if __name__ == "__main__":
    sys.exit(score_main())
