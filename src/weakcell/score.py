"""``weakcell score SUBMISSION.csv --truth DIR [--verified image|all] [--split S] [--listed-only] [--json OUT]``: the 2021
competition metric of any cell-level file Kaggle would accept, against a truth folder.

The truth folder has the synthetic layout (``data/<set>/truth/``, what ``make data`` writes;
``weakcell.cell_truth`` reads it): ``DIR/<image_id>_cells.png``, an instance label image (8- or 16-bit PNG,
0 = background), ``DIR/cells.csv`` with at least ``image_id,cell_id,Label`` (``Label`` class indices
separated by ``|`` or a space; an empty ``Label`` is a cell of no class) and ``DIR/images.csv``
(``image_id,split``). The images of the truth are its ``<image_id>_cells.png`` files, one whose label image
holds no cell included (``--split`` keeps those of one split, e.g. the synthetic set's ``test``: from
``images.csv``, or from ``cells.csv``'s ``split`` column in folders written before it); one of them without
a submission row predicts nothing, and submission rows of other images are ignored, as the organisers'
evaluator does (``--listed-only`` scores only the images the file lists: the out-of-fold file of a run that
trained some of its folds).

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

import numpy as np
import pandas as pd

from weakcell.cell_truth import read_truth_folder
from weakcell.competition_metric import READINGS, Verified, score_found, submission_detections
from weakcell.constants import HPA2021_CLASSES
from weakcell.outputs import atomic_write_json


def score_file(
    submission: str | os.PathLike[str],
    truth: str | os.PathLike[str],
    n_classes: int,
    split: str | None = None,
    readings: tuple[Verified, ...] = ("image",),
    listed_only: bool = False,
) -> dict[Verified, dict]:
    """The competition metric of a cell-level file against a truth folder (its ``split`` images), under
    each of ``readings``: what ``weakcell score`` prints. Masks are decoded and overlapped once.
    ``listed_only``: only the truth images the file has a row for (an out-of-fold file of a run that
    trained some of its folds), not every truth image with the unlisted ones missed."""
    truth_cells = read_truth_folder(truth, n_classes, split)
    if not Path(submission).is_file():
        raise FileNotFoundError(f"no submission file {submission}")
    if listed_only:
        listed = set(pd.read_csv(submission, usecols=["ID"], dtype={"ID": str})["ID"])
        truth_cells = {image_id: cells for image_id, cells in truth_cells.items() if image_id in listed}
    found = submission_detections(submission, truth_cells)
    return {reading: score_found(found, truth_cells, n_classes, reading) for reading in readings}


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
    parser.add_argument(
        "--listed-only",
        action="store_true",
        help="score only the truth images the file has a row for (the OOF file of a run of some folds)",
    )
    parser.add_argument("--classes", type=int, default=len(HPA2021_CLASSES), help="number of classes (19)")
    parser.add_argument("--json", default=None, help="also write the scores to this JSON file")
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exit_:
        return 0 if exit_.code == 0 else 2
    verified: Verified = args.verified
    try:
        result = score_file(
            args.submission, args.truth, args.classes, args.split, (verified,), listed_only=args.listed_only
        )[verified]
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
