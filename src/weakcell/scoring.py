"""How cells and images are scored from a round's outputs: the formulas train, refine, evaluate, ablate and
infer share, and the out-of-fold scoring of a round.

- ``cell_confidence``: the confidence inference submits for a (cell, class);
- ``CELL_SCORES``: the ways a cell's class score is formed from its out-of-fold outputs (stage-1 probability,
  MIL instance probability, attention, ...), read by refinement's rule, the ablation and evaluation;
- ``ALTERNATIVES``: the confidences evaluation scores beside a submission from ``pred_cell.parquet``;
- ``max_pool_images`` / ``image_metrics``: image scores from cells, and their mAP and macro-F1;
- ``cell_score_table`` / ``oof_cell_scores``: out-of-fold cell scores as detections, scored by the
  competition engine against the true cells (``cell_truth.CellTruth``); the submitted confidence as a
  file carries it (``submission.as_submitted``: clipped, ``infer.min_score`` applied);
- ``score_oof``: what a round's ``metrics.json`` holds.

Numpy and pandas only (no torch): evaluation and inference import it without the training stage.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import pandas as pd

from weakcell.cell_truth import CellTruth
from weakcell.competition_metric import score_found
from weakcell.config import InferConfig
from weakcell.constants import CellScore, Verified, prob_columns
from weakcell.data.labels import to_multi_hot
from weakcell.errors import StageError
from weakcell.metrics import macro_f1, mean_average_precision
from weakcell.sources import competition_rows, external_sources, source_rows
from weakcell.submission import as_submitted

# -- the submitted confidence ---------------------------------------------------------------------------


def image_best(values: np.ndarray, image_ids: np.ndarray) -> np.ndarray:
    """(N, C): for each cell, the highest value of its image's cells (cells in any order)."""
    return pd.DataFrame(values).groupby(np.asarray(image_ids), sort=False).transform("max").to_numpy()


def cell_confidence(
    cell: np.ndarray, image: np.ndarray, image_ids: np.ndarray, power: float, best_cell: float
) -> np.ndarray:
    """The submitted confidence of each (cell, class): ``cell * image_term ** power`` with
    ``image_term = (1 - best_cell) * image + best_cell * (the image's highest cell probability)``.

    cell, image: (N, C) the cell's probability and its image's (MIL) probability; image_ids: (N,).
    The image term ranks cells of likely images first; mixing in the best cell keeps it on the cell model's
    scale, which the MIL head (trained on embeddings of its own training images) is not quite on. Which
    power wins depends on the metric's reading: under the organisers' (class c judged only in images that
    have it) telling images apart is not the cell score's job and the cell alone (power 0) is the default;
    the figures are in benchmarks/confidence.md (``make bench-confidence``) and the README.
    """
    term = image
    if best_cell:
        term = (1.0 - best_cell) * image + best_cell * image_best(cell, image_ids)
    return cell * term**power


# -- image scores -----------------------------------------------------------------------------------------


def max_pool_images(cells: pd.DataFrame, probs: np.ndarray, image_ids: list[str]) -> np.ndarray:
    """Image scores as the max of their cells' probabilities ((n_images, C); 0 for images without cells)."""
    table = pd.DataFrame(probs).groupby(cells["image_id"].to_numpy()).max()
    return table.reindex(image_ids).fillna(0.0).to_numpy()


def image_metrics(y_true: np.ndarray, probs: np.ndarray, prefix: str = "") -> dict[str, float]:
    return {
        f"{prefix}image_map": mean_average_precision(y_true, probs),
        f"{prefix}f1_at_05": macro_f1(y_true, probs >= 0.5),
    }


# -- cell scores from out-of-fold outputs -----------------------------------------------------------------


@dataclass(frozen=True)
class CellOutputs:
    """A round's OOF outputs per cell, (N, C) each: p = stage-1 cell probability, q = MIL instance
    probability, a = relative attention, image = the image's MIL probability; image_ids (N,)."""

    p: np.ndarray
    q: np.ndarray
    a: np.ndarray
    image: np.ndarray
    image_ids: np.ndarray


# The ways a cell's class score is formed from its OOF outputs; "confidence" is what inference submits.
CELL_SCORES: dict[CellScore, Callable[[CellOutputs, InferConfig], np.ndarray]] = {
    "stage1": lambda o, infer: o.p,
    "mil_instance": lambda o, infer: o.q,
    "mil_attention": lambda o, infer: o.image * np.clip(o.a, 0, 1),
    "stage1_x_image": lambda o, infer: o.p * o.image,
    "confidence": lambda o, infer: cell_confidence(
        o.p, o.image, o.image_ids, infer.image_power, infer.image_best_cell
    ),
}

# The CELL_SCORES entry a submission carries: scored as the file holds it (``as_submitted``).
SUBMITTED: CellScore = "confidence"

# pred_cell.parquet confidences scored beside the submission:
# name -> (cell probs, image probs, image ids, infer settings) -> (N, C); "confidence" recomputes the submitted
# one as the file carries it (infer.min_score applied)
ALTERNATIVES: dict[str, Callable[[np.ndarray, np.ndarray, np.ndarray, InferConfig], np.ndarray]] = {
    "cell": lambda cell, image, ids, infer: cell,
    "image": lambda cell, image, ids, infer: image,
    "cell_x_image": lambda cell, image, ids, infer: cell * image,
    "confidence": lambda cell, image, ids, infer: as_submitted(
        cell_confidence(cell, image, ids, infer.image_power, infer.image_best_cell), infer.min_score
    ),
}


def cell_scores(
    name: CellScore,
    oof_cell: pd.DataFrame,
    oof_image: pd.DataFrame,
    n_classes: int,
    infer: InferConfig | None = None,
) -> np.ndarray:
    """(len(oof_cell), C) scores of the ``CELL_SCORES`` entry ``name``, rows in ``oof_cell`` order;
    ``infer`` (default: the defaults) sets the submitted confidence's formula."""
    if name not in CELL_SCORES:
        raise StageError(f"unknown cell score {name!r}; choose one of {sorted(CELL_SCORES)}")
    p, q, a = (oof_cell[prob_columns(n_classes, prefix)].to_numpy() for prefix in ("p_", "mil_p_", "att_"))
    image = oof_image.set_index("image_id").loc[oof_cell["image_id"], prob_columns(n_classes)].to_numpy()
    outputs = CellOutputs(p, q, a, image, oof_cell["image_id"].to_numpy())
    return CELL_SCORES[name](outputs, infer if infer is not None else InferConfig())


def cell_score_table(
    name: CellScore,
    oof_cell: pd.DataFrame,
    oof_image: pd.DataFrame,
    n_classes: int,
    infer: InferConfig | None = None,
) -> pd.DataFrame:
    """``image_id, cell_id, p_*``: the ``CELL_SCORES`` entry ``name`` of every cell as a detection
    table; the submitted one (``SUBMITTED``) as a file carries it (``as_submitted``, ``infer.min_score``)."""
    infer = infer if infer is not None else InferConfig()
    values = cell_scores(name, oof_cell, oof_image, n_classes, infer)
    if name == SUBMITTED:
        values = as_submitted(values, infer.min_score)
    keys = oof_cell[["image_id", "cell_id"]].reset_index(drop=True)
    return keys.assign(**dict(zip(prob_columns(n_classes), values.T)))


def cell_score_variants(
    oof_cell: pd.DataFrame, oof_image: pd.DataFrame, n_classes: int, infer: InferConfig | None = None
) -> dict[str, pd.DataFrame]:
    """Every ``CELL_SCORES`` entry as an ``image_id, cell_id, p_*`` table (``cell_score_table``)."""
    return {name: cell_score_table(name, oof_cell, oof_image, n_classes, infer) for name in CELL_SCORES}


def oof_cell_scores(
    tables: dict[str, pd.DataFrame],
    truth: CellTruth,
    readings: tuple[Verified, ...] = ("image",),
    folds: Collection[int] | None = None,
) -> dict[Verified, dict[str, dict]]:
    """The competition metric (``competition_metric.score_found``'s dict) of each score table against
    the true cells of the training images of ``folds`` (default every one), under each of ``readings``:
    ``{reading: {name: result}}``. Each table's detections are built once for every reading."""
    true_cells = truth.truth(folds)
    found = {name: truth.found(table, folds) for name, table in tables.items()}
    return {
        reading: {name: score_found(f, true_cells, truth.n_classes, reading) for name, f in found.items()}
        for reading in readings
    }


# -- scoring a round out of fold --------------------------------------------------------------------------


class LabelledImages(Protocol):
    """What scoring needs of a training set (``train.TrainingSet`` is one): the images' labels and, on the
    synthetic set, the true cells with their overlaps with the segmented cells."""

    @property
    def n_classes(self) -> int: ...

    @property
    def images(self) -> pd.DataFrame: ...  # image_id, labels

    @property
    def cell_truth(self) -> CellTruth | None: ...


def score_oof(
    data: LabelledImages,
    oof_image: pd.DataFrame,
    oof_cell: pd.DataFrame,
    infer: InferConfig | None = None,
    verified: Verified = "image",
) -> dict[str, float]:
    """Image macro-F1 at 0.5 and mAP of the MIL head; the competition mAP of each cell score variant
    (synthetic) under the metric's ``verified`` reading, against the true cells of every training image of
    the folds ``oof_image`` holds. Scored on the competition's images (``weakcell.sources``); the
    out-of-fold images of each folded external source add their own ``image_map_<source>``."""
    n_classes = data.n_classes
    own_images = competition_rows(oof_image, data.images)
    metrics = _image_scores(data, own_images, oof_cell)
    for source in external_sources(data.images):
        validated = source_rows(oof_image, data.images, source)
        if len(validated):
            metrics[f"image_map_{source}"] = _image_scores(data, validated, oof_cell)["image_map"]
    if data.cell_truth is not None:
        folds = set(own_images["fold"].tolist())
        own_cells = competition_rows(oof_cell, data.images)
        tables = cell_score_variants(own_cells, own_images, n_classes, infer)
        for name, result in oof_cell_scores(tables, data.cell_truth, (verified,), folds)[verified].items():
            metrics[f"cell_map_{name}"] = result["map"]
    return metrics


def _image_scores(data: LabelledImages, oof_image: pd.DataFrame, oof_cell: pd.DataFrame) -> dict[str, float]:
    """Image mAP and macro-F1 at 0.5 of the MIL head and of each image's best cell, over ``oof_image``."""
    n_classes = data.n_classes
    images = data.images.set_index("image_id").loc[oof_image["image_id"]]
    y_true = to_multi_hot(images["labels"].tolist(), n_classes)
    metrics = image_metrics(y_true, oof_image[prob_columns(n_classes)].to_numpy())
    max_pooled = max_pool_images(
        oof_cell, oof_cell[prob_columns(n_classes)].to_numpy(), oof_image["image_id"].tolist()
    )
    metrics.update(image_metrics(y_true, max_pooled, "stage1_max_"))
    return metrics
