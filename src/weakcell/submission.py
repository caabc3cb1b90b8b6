"""Kaggle submission files: the 2021 cell-level format (masks as pycocotools RLE -> zlib -> base64, coded
by ``weakcell.rle``), the 2018-style image-level format, and validators that decode every mask back before
anything is uploaded.

``weakcell validate FILE [--sample SAMPLE_CSV] [--classes N]`` (or ``python -m weakcell.submission FILE``)
checks a written file and prints a one-line summary; exit code 0 when valid, 2 otherwise.

Over 400 lines on purpose: the writers and the validators are two sides of one format (its columns, the
placeholder row, how labels and confidences are written and read back), kept together so they cannot drift.
"""

from __future__ import annotations

import binascii
import hashlib
import json
import logging
import os
import sys
import time
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from weakcell.constants import EMPTY_MASK_RLE
from weakcell.data.datasets import get_dataset
from weakcell.errors import StageError, WeakcellError
from weakcell.metrics import predicted_classes
from weakcell.outputs import atomic_write, atomic_write_text, writing
from weakcell.rle import encode_crop, encode_mask, mask_runs, placeholder

log = logging.getLogger(__name__)

CELL_COLUMNS = ["ID", "ImageWidth", "ImageHeight", "PredictionString"]
# The cell-level format is the 2021 competition's: `weakcell validate` checks its labels against that table.
CELL_LEVEL_CLASSES = get_dataset("hpa2021").n_classes
# The sample submission's row for a 2048x2048 image without predictions: class 0, confidence 1, an empty
# mask. Other sizes get the empty mask of their own size (``placeholder(h, w)``), as the sample does.
PLACEHOLDER = f"0 1 {EMPTY_MASK_RLE}"
MAX_PROBLEMS = 20
# image_level.csv: (ID column, labels column, separator)
ImageLevelColumns = tuple[str, str, str]
IMAGE_LEVEL_LAYOUTS: tuple[ImageLevelColumns, ...] = (("Id", "Predicted", " "), ("ID", "Label", "|"))


class SubmissionError(WeakcellError, ValueError):
    """A submission that Kaggle would reject or mis-score; the message lists the first problems."""

    def __init__(self, problems: list[str], total: int | None = None):
        self.problems = problems
        total = len(problems) if total is None else total
        more = f"\n  ... and {total - len(problems)} more" if total > len(problems) else ""
        super().__init__(f"{total} problem(s):\n  " + "\n  ".join(problems) + more)


# ------------------------------------------------------------------------------- prediction strings


def format_confidence(value: float) -> str:
    """A confidence as the shortest text that reads back as the same float64 (``repr``): distinct model
    outputs stay distinct in the file. Fewer digits would create ties the model did not produce, and the
    organisers' evaluator ranks tied confidences in an arbitrary order. Whole numbers lose ``.0``."""
    text = repr(float(value))
    return text.removesuffix(".0")


def as_submitted(confidences: np.ndarray, min_score: float = 0.0) -> np.ndarray:
    """Confidences as a cell-level file carries them: clipped to [0, 1], NaN (no prediction) where the
    clipped value is below ``min_score`` (``infer.min_score``) or not a number. Written with
    ``format_confidence``, each reads back as exactly this float64, so a score of these values in memory
    is the score of the file."""
    clipped = np.clip(np.asarray(confidences, dtype=np.float64), 0.0, 1.0)
    return np.where(clipped >= min_score, clipped, np.nan)


def _format_cell(mask_text: str, probs: np.ndarray, min_score: float) -> list[str]:
    values = as_submitted(probs, min_score)
    return [f"{c} {format_confidence(values[c])} {mask_text}" for c in np.flatnonzero(np.isfinite(values))]


def cell_prediction_string(
    cell_masks: Mapping[int, np.ndarray] | np.ndarray,
    scores: Mapping[int, np.ndarray],
    min_score: float = 0.0,
) -> str:
    """``label confidence mask`` triples for every scored cell and every class with confidence >=
    ``min_score``. ``cell_masks`` is either {cell_id: bool (H, W)} or an integer label image (H, W),
    where cells are cut out through their ``scipy.ndimage.find_objects`` boxes; each cell's mask is
    encoded once, at full resolution. Confidences are clipped to [0, 1] and written exactly
    (``format_confidence``). Returns "" when nothing is kept (callers substitute ``placeholder(h, w)``)."""
    parts: list[str] = []
    if isinstance(cell_masks, np.ndarray):
        from scipy import ndimage

        labels = cell_masks
        if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"label image must be a 2-D integer array, got {labels.dtype} {labels.shape}")
        height, width = labels.shape
        boxes = ndimage.find_objects(labels)
        for cell_id, probs in scores.items():
            cell_id = int(cell_id)
            box = boxes[cell_id - 1] if 0 < cell_id <= len(boxes) else None
            if box is None:
                raise KeyError(f"cell {cell_id} is scored but absent from the label image")
            text = encode_crop(labels[box] == cell_id, box[0].start, box[1].start, height, width)
            parts += _format_cell(text, np.asarray(probs, float), min_score)
    else:
        for cell_id, probs in scores.items():
            if cell_id not in cell_masks:
                raise KeyError(f"cell {cell_id} is scored but has no mask")
            text = encode_mask(np.asarray(cell_masks[cell_id], dtype=bool))
            parts += _format_cell(text, np.asarray(probs, float), min_score)
    return " ".join(parts)


def prob_columns(frame: pd.DataFrame) -> list[str]:
    """``p_0 .. p_{C-1}`` in class order; raises when missing or not contiguous."""
    cols = sorted(
        (c for c in frame.columns if c.startswith("p_") and c[2:].isdigit()), key=lambda c: int(c[2:])
    )
    if not cols or [int(c[2:]) for c in cols] != list(range(len(cols))):
        raise ValueError(f"expected probability columns p_0..p_{{C-1}}, got {cols}")
    return cols


def _atomic_write(frame: pd.DataFrame, path: str | os.PathLike) -> Path:
    path = Path(path)
    with writing(path.parent):
        path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda tmp: frame.to_csv(tmp, index=False))


# -------------------------------------------------------------------------------------- publishing

PUBLISHED_FILE = "published.json"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def publish(folder: str | os.PathLike, staged: Mapping[str, str | os.PathLike]) -> Path:
    """Move the ``staged`` files (final name -> a written, validated temporary) into ``folder`` as one set.

    Each rename is atomic but a set of them is not: ``published.json``, written last, records every file's
    SHA-256, so a run killed between two renames leaves a folder whose record no longer matches its files
    (``check_published`` refuses it) instead of a new file silently paired with an old one."""
    folder = Path(folder)
    record = {"files": {name: _sha256(Path(tmp)) for name, tmp in staged.items()}}
    for name, tmp in staged.items():
        with writing(folder / name):
            os.replace(tmp, folder / name)
    atomic_write_text(folder / PUBLISHED_FILE, json.dumps(record, indent=2))
    return folder


def check_published(path: str | os.PathLike) -> None:
    """``path`` belongs to a completely published set: its folder's ``published.json`` lists it and every
    listed file still has its recorded SHA-256. Raises StageError (one line, the fix) otherwise."""
    path = Path(path)
    record_path = path.parent / PUBLISHED_FILE
    rerun = "rerun `make infer` (an interrupted run leaves this state) and submit what it publishes"
    if not record_path.is_file():
        raise StageError(f"{path.parent} has no {PUBLISHED_FILE}: {path.name} was never published; {rerun}")
    try:
        files = json.loads(record_path.read_text())["files"]
    except (ValueError, KeyError, TypeError) as err:
        raise StageError(f"{record_path} is damaged ({type(err).__name__}); {rerun}") from err
    if path.name not in files:
        raise StageError(f"{record_path} does not list {path.name}; {rerun}")
    for name, digest in files.items():
        member = path.parent / name
        if not member.is_file() or _sha256(member) != digest:
            raise StageError(
                f"{member} is not the file {record_path} published (a run was cut short); {rerun}"
            )


def write_cell_level(
    predictions: pd.DataFrame,
    masks_of: Callable[[str], np.ndarray],
    sample_submission: pd.DataFrame,
    path: str | os.PathLike,
    min_score: float = 0.0,
) -> Path:
    """Cell-level submission: one row per sample-submission ID, in its order and with its sizes.
    ``predictions`` has image_id, cell_id, p_0..p_{C-1}; ``masks_of(image_id)`` returns the instance label
    image at the original resolution. Images without cells or predictions get ``placeholder(h, w)``. The frame
    is validated (every mask decoded back) before it is written, atomically."""
    cols = prob_columns(predictions)
    sample = sample_submission[CELL_COLUMNS[:3]].reset_index(drop=True)
    unknown = set(predictions["image_id"]) - set(sample["ID"])
    if unknown:
        raise StageError(
            f"{len(unknown)} predicted image(s) are not in the sample submission, e.g. {min(unknown)}"
        )
    groups = {k: g for k, g in predictions.groupby("image_id", sort=False)}
    strings = []
    rows = tqdm(
        sample.itertuples(index=False),
        total=len(sample),
        desc=Path(path).name,
        unit="img",
        leave=False,
        disable=not sys.stderr.isatty(),  # a log or a test reads stderr: only errors go there
    )
    for image_id, width, height in rows:
        group = groups.get(image_id)
        text = ""
        if group is not None and len(group):
            labels = masks_of(image_id)
            if labels is None or labels.shape != (int(height), int(width)):
                shape = None if labels is None else labels.shape
                raise StageError(
                    f"mask of {image_id} has shape {shape}, the submission needs (ImageHeight, ImageWidth) = "
                    f"({height}, {width}): masks must be at the original resolution"
                )
            scores = dict(zip(group["cell_id"].astype(int), group[cols].to_numpy(float)))
            text = cell_prediction_string(labels, scores, min_score=min_score)
        strings.append(text or placeholder(height, width))
    frame = sample.assign(PredictionString=strings)
    validate_cell_level(frame, sample_submission, n_classes=len(cols))
    _atomic_write(frame, path)
    return Path(path)


def write_image_level(
    probs: pd.DataFrame,
    thresholds: np.ndarray,
    path: str | os.PathLike,
    columns: ImageLevelColumns = ("Id", "Predicted", " "),
    sample_submission: pd.DataFrame | None = None,
    negative: int | None = None,
) -> Path:
    """Image labels: the classes whose probability reaches its threshold (``metrics.predicted_classes``,
    the rule thresholds are tuned by), under ``columns`` = (ID column, labels column, separator): the 2018
    submission ``Id,Predicted`` (space-separated) or the 2021 label-file layout ``ID,Label`` (``|``). A
    ``negative`` class (2021: 18) is dropped from an image that has another class, as in the label files.
    Rows follow ``sample_submission`` when given (its IDs must all be predicted), else ``probs``."""
    cols = prob_columns(probs)
    thresholds = np.asarray(thresholds, dtype=float).reshape(-1)
    if thresholds.size != len(cols):
        raise StageError(f"{thresholds.size} thresholds for {len(cols)} classes")
    table = probs.groupby("image_id", sort=False)[cols].mean()
    if sample_submission is not None:
        ids = sample_submission.iloc[:, 0].astype(str)
        missing = set(ids) - set(table.index)
        if missing:
            raise StageError(f"{len(missing)} sample IDs have no prediction, e.g. {min(missing)}")
        table = table.loc[list(ids)]
    predicted = predicted_classes(table.to_numpy(float), thresholds)
    if negative is not None:  # "no specific signal" never stands beside a class
        others = np.delete(predicted, negative, axis=1).any(axis=1)
        predicted[others, negative] = False
    id_column, label_column, sep = columns
    labels = [sep.join(map(str, np.flatnonzero(row))) for row in predicted]
    frame = pd.DataFrame({id_column: table.index.astype(str), label_column: labels})
    validate_image_level(frame, sample_submission, n_classes=len(cols), id_column=id_column)
    return _atomic_write(frame, path)


# --------------------------------------------------------------------------------------- validation


def _read(path_or_frame: str | os.PathLike | pd.DataFrame) -> tuple[pd.DataFrame, float]:
    if isinstance(path_or_frame, pd.DataFrame):
        return path_or_frame.astype(str).reset_index(drop=True), float("nan")
    path = Path(path_or_frame)
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    return frame, path.stat().st_size / 2**20


def _check_mask(text: str, height: int, width: int, cache: dict, empty_ok: bool) -> str | None:
    key = (text, height, width)
    if key not in cache:
        try:
            runs = mask_runs(text)
            if runs.sum() != height * width:
                cache[key] = f"mask covers {int(runs.sum())} pixels, not {height}x{width} = {height * width}"
            elif runs[1::2].sum() == 0:
                cache[key] = "empty"
            else:
                cache[key] = None
        except (ValueError, binascii.Error, zlib.error, UnicodeEncodeError) as err:
            cache[key] = f"mask does not decode ({err})"
    if cache[key] == "empty":
        return None if empty_ok else "empty mask (only a placeholder row, one prediction, may be empty)"
    return cache[key]


def validate_cell_level(
    path_or_frame: str | os.PathLike | pd.DataFrame,
    sample_submission: pd.DataFrame | str | os.PathLike | None = None,
    n_classes: int | None = CELL_LEVEL_CLASSES,
) -> dict:
    """Check a cell-level submission as Kaggle reads it; every distinct mask is decoded back (its runs
    must cover exactly ImageHeight x ImageWidth and hold at least one pixel, except in a placeholder row:
    a single prediction with an empty mask, as the sample submission writes for every image). Labels must be
    integers in 0..n_classes-1 (default: the 2021 table, whose format this is; None: any non-negative
    integer). Raises
    ``SubmissionError`` naming rows as ``row i`` (0-based data row; file line i + 2). Returns stats."""
    start = time.perf_counter()
    frame, size_mb = _read(path_or_frame)
    problems: list[str] = []
    if list(frame.columns) != CELL_COLUMNS:
        raise SubmissionError([f"columns are {list(frame.columns)}, expected {CELL_COLUMNS}"])
    if sample_submission is not None:
        problems += _sample_problems(frame, _read(sample_submission)[0])
    duplicated = frame["ID"].duplicated(keep="first").to_numpy()
    cache: dict = {}
    n_predictions = n_placeholders = 0
    for i, (image_id, width, height, text) in enumerate(frame.itertuples(index=False)):
        where = f"row {i} (ID {image_id})"
        if not image_id:
            problems.append(f"row {i}: empty ID")
        if duplicated[i]:
            problems.append(f"{where}: duplicate ID")
        try:
            w, h = int(width), int(height)
            if w <= 0 or h <= 0:
                raise ValueError
        except ValueError:
            problems.append(f"{where}: size {width!r}x{height!r} is not two positive integers")
            continue
        tokens = text.split()
        if not tokens:
            problems.append(f"{where}: empty PredictionString (use the placeholder {PLACEHOLDER!r})")
            continue
        if len(tokens) % 3:
            problems.append(f"{where}: {len(tokens)} tokens, not complete 'label confidence mask' triples")
            continue
        n_predictions += len(tokens) // 3
        for j in range(0, len(tokens), 3):
            label, conf, mask = tokens[j : j + 3]
            found = _prediction_problems(label, conf, n_classes)
            error = _check_mask(mask, h, w, cache, empty_ok=len(tokens) == 3)
            problems += [f"{where}, prediction {j // 3}: {problem}" for problem in [*found, error] if problem]
            if not error and cache[(mask, h, w)] == "empty":
                n_placeholders += 1
        if len(problems) > 10 * MAX_PROBLEMS:
            problems.append("(stopped checking)")
            break
    if problems:
        raise SubmissionError(problems[:MAX_PROBLEMS], len(problems))
    return {
        "rows": len(frame),
        "predictions": n_predictions,
        "masks": len(cache),
        "placeholders": n_placeholders,
        "size_mb": round(size_mb, 3),
        "seconds": round(time.perf_counter() - start, 3),
    }


def _sample_problems(frame: pd.DataFrame, sample: pd.DataFrame) -> list[str]:
    """How a cell-level submission's IDs and image sizes differ from the sample submission's."""
    if list(frame["ID"]) != list(sample["ID"]):
        missing = set(sample["ID"]) - set(frame["ID"])
        extra = set(frame["ID"]) - set(sample["ID"])
        return [
            f"IDs differ from the sample submission ({len(frame)} vs {len(sample)} rows, "
            f"{len(missing)} missing, {len(extra)} extra"
            + (", same set in another order)" if not missing and not extra else ")")
        ]
    problems = []
    for col in ("ImageWidth", "ImageHeight"):
        bad = np.flatnonzero(frame[col].to_numpy() != sample[col].to_numpy())
        problems += [f"row {i} (ID {frame['ID'][i]}): {col} differs from the sample" for i in bad[:5]]
    return problems


def _prediction_problems(label: str, conf: str, n_classes: int | None) -> list[str]:
    """What is wrong with one prediction's label and confidence tokens (its mask is ``_check_mask``'s)."""
    problems = []
    if not (label.isdigit() and (n_classes is None or int(label) < n_classes)):
        allowed = "a non-negative integer" if n_classes is None else f"an integer in 0..{n_classes - 1}"
        problems.append(f"label {label!r} is not {allowed}")
    try:
        p = float(conf)
        if not (np.isfinite(p) and 0.0 <= p <= 1.0):
            raise ValueError
    except ValueError:
        problems.append(f"confidence {conf!r} is not a finite number in [0, 1]")
    return problems


def validate_image_level(
    path_or_frame: str | os.PathLike | pd.DataFrame,
    sample_submission: pd.DataFrame | str | os.PathLike | None = None,
    n_classes: int | None = None,
    id_column: str | None = None,
) -> dict:
    """Check an image-level file, ``Id,Predicted`` (space-separated, the 2018 submission) or ``ID,Label``
    (``|``-separated, the 2021 label-file layout): unique IDs (the sample's, in order, when given), labels
    integers in 0..n_classes-1 (empty allowed). ``id_column`` None = whatever the first column is called.
    Returns stats."""
    start = time.perf_counter()
    frame, size_mb = _read(path_or_frame)
    header = list(frame.columns)
    seps = {label: sep for _, label, sep in IMAGE_LEVEL_LAYOUTS}
    expected = [f"{id_column or 'ID'},{label}" for label in seps]
    if len(header) != 2 or header[1] not in seps or (id_column is not None and header[0] != id_column):
        raise SubmissionError([f"columns are {header}, expected {' or '.join(expected)}"])
    id_column, sep = header[0], seps[header[1]]
    problems = []
    if sample_submission is not None:
        sample, _ = _read(sample_submission)
        if list(frame[id_column]) != list(sample.iloc[:, 0]):
            problems.append(f"IDs differ from the sample submission ({len(frame)} vs {len(sample)} rows)")
    duplicated = frame[id_column].duplicated().to_numpy()
    n_labels = 0
    for i, (image_id, predicted) in enumerate(frame.itertuples(index=False)):
        if duplicated[i]:
            problems.append(f"row {i} (ID {image_id}): duplicate ID")
        for label in (part.strip() for part in predicted.split(sep) if part.strip()):
            n_labels += 1
            if not label.isdigit() or (n_classes is not None and int(label) >= n_classes):
                problems.append(f"row {i} (ID {image_id}): label {label!r} is not a class index")
    if problems:
        raise SubmissionError(problems[:MAX_PROBLEMS], len(problems))
    return {
        "rows": len(frame),
        "labels": n_labels,
        "size_mb": round(size_mb, 3),
        "seconds": round(time.perf_counter() - start, 3),
    }


def validate_main(argv: list[str] | None = None) -> int:
    """``weakcell validate FILE [--sample SAMPLE_CSV] [--classes N] [--published]``: detects the format from
    the header, prints a one-line summary (naming the checks it could not do without the sample), returns 0
    when valid and 2 otherwise."""
    import argparse

    parser = argparse.ArgumentParser(prog="weakcell validate", description=validate_main.__doc__)
    parser.add_argument("file")
    parser.add_argument("--sample", help="sample submission whose IDs and order must match")
    parser.add_argument(
        "--classes",
        type=int,
        default=None,
        help=f"number of classes (default: cell level {CELL_LEVEL_CLASSES}, the 2021 format's; image level unchecked)",
    )
    parser.add_argument(
        "--published",
        action="store_true",
        help=f"also require FILE to be part of a completely published set ({PUBLISHED_FILE} beside it)",
    )
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exit_:
        return 0 if exit_.code == 0 else 2
    try:
        if args.published:
            check_published(args.file)
        header = pd.read_csv(args.file, nrows=0).columns.tolist()
        if header == CELL_COLUMNS:
            stats = validate_cell_level(args.file, args.sample, n_classes=args.classes or CELL_LEVEL_CLASSES)
            kind = "cell-level"
            unchecked = "the rows (none missing or extra), their order and each image's width and height"
        else:
            stats = validate_image_level(args.file, args.sample, args.classes)
            kind = "image-level"
            unchecked = "the rows (none missing or extra) and their order"
    except (SubmissionError, OSError, ValueError) as err:
        print(f"invalid: {args.file}: {err}", file=sys.stderr)
        return 2
    summary = ", ".join(f"{k} {v}" for k, v in stats.items())
    skipped = "" if args.sample else f"; NOT checked without --sample SAMPLE_CSV: {unchecked}"
    print(f"valid {kind} submission {args.file}: {summary}{skipped}")
    return 0


if __name__ == "__main__":
    sys.exit(validate_main())
