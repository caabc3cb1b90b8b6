"""How predictions are combined: keyed blends, and the ways the whole-image model joins the cell model.

- ``blend``: the (weighted) mean of prediction tables on their keys, refusing tables whose keys differ
  (folds, TTA views and runs are blended this way);
- ``IMAGE_MODEL_RULES`` (``infer.image_model_rule``): the submitted confidence of each (cell, class) from the
  cell probability, its image's MIL probability and the whole-image model's probability
  (``weakcell.image_model``). ``none`` is today's ``scoring.cell_confidence``; ``product`` multiplies it by
  the image model's probability ** ``infer.image_model_power`` (the product several top 2021 teams
  submitted); ``mean`` and ``replace`` put the mean of the MIL and image-model probabilities, or the image
  model's alone, in the place of the MIL image term;
- ``IMAGE_LEVELS`` (``infer.image_level``): the image probabilities ``image_level.csv`` is thresholded from
  (``mil``, ``image_model``, or their ``mean``), and where the thresholds tuned on the same source out of
  fold live (``thresholds_file``).

Numpy and pandas only: the thresholds stage imports it without torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from weakcell.config import Config, InferConfig
from weakcell.errors import StageError
from weakcell.scoring import cell_confidence


def blend(tables: list[pd.DataFrame], keys: list[str], weights: list[float] | None = None) -> pd.DataFrame:
    """(Weighted) mean over tables keyed by ``keys``, after asserting they all hold the same keys."""
    first = set(map(tuple, tables[0][keys].to_numpy()))
    for table in tables[1:]:
        if set(map(tuple, table[keys].to_numpy())) != first:
            raise AssertionError(f"predictions to blend hold different {keys}: refusing to average them")
    weights = weights or [1.0] * len(tables)
    weighted = [
        table.set_index(keys).mul(weight / sum(weights)).reset_index()
        for table, weight in zip(tables, weights)
    ]
    return pd.concat(weighted).groupby(keys, sort=False).sum().reset_index()


# -- the cell confidence ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class CellTerms:
    """What a cell's confidence is made from, (N, C) each: ``cell`` its own probability, ``mil`` its image's
    MIL probability, ``image_model`` its image's whole-image-model probability (None without the model);
    ``image_ids`` (N,)."""

    cell: np.ndarray
    mil: np.ndarray
    image_model: np.ndarray | None
    image_ids: np.ndarray

    def model(self, rule: str) -> np.ndarray:
        """The image model's term; a rule that needs it without it is a configuration error."""
        if self.image_model is None:
            raise StageError(
                f"infer.image_model_rule={rule} needs the whole-image model: set image_model.enabled=true "
                "and train it (make image-model), or use infer.image_model_rule=none"
            )
        return self.image_model


def _none(terms: CellTerms, infer: InferConfig) -> np.ndarray:
    return cell_confidence(terms.cell, terms.mil, terms.image_ids, infer.image_power, infer.image_best_cell)


def _product(terms: CellTerms, infer: InferConfig) -> np.ndarray:
    return _none(terms, infer) * terms.model("product") ** infer.image_model_power


def _mean(terms: CellTerms, infer: InferConfig) -> np.ndarray:
    image = 0.5 * (terms.mil + terms.model("mean"))
    return cell_confidence(terms.cell, image, terms.image_ids, infer.image_model_power, infer.image_best_cell)


def _replace(terms: CellTerms, infer: InferConfig) -> np.ndarray:
    image = terms.model("replace")
    return cell_confidence(terms.cell, image, terms.image_ids, infer.image_model_power, infer.image_best_cell)


IMAGE_MODEL_RULES: dict[str, Callable[[CellTerms, InferConfig], np.ndarray]] = {
    "none": _none,
    "product": _product,
    "mean": _mean,
    "replace": _replace,
}


def combined_confidence(terms: CellTerms, infer: InferConfig) -> np.ndarray:
    """(N, C) submitted confidence under ``infer.image_model_rule``."""
    return IMAGE_MODEL_RULES[infer.image_model_rule](terms, infer)


# -- the image level ---------------------------------------------------------------------------------------


def _mil_level(mil: pd.DataFrame, model: pd.DataFrame | None) -> pd.DataFrame:
    return mil


def _model_level(mil: pd.DataFrame, model: pd.DataFrame | None) -> pd.DataFrame:
    if model is None:
        raise StageError(
            "infer.image_level=image_model needs the whole-image model: set image_model.enabled=true and "
            "train it (make image-model)"
        )
    return model


def _mean_level(mil: pd.DataFrame, model: pd.DataFrame | None) -> pd.DataFrame:
    return blend([mil, _model_level(mil, model)], ["image_id"])


@dataclass(frozen=True)
class ImageLevel:
    """One source of image-level probabilities: how it is formed from the MIL head's and the image model's
    tables (``image_id, p_*``, keyed), which of the two it reads (``MIL``, ``IMAGE_MODEL``), and the
    thresholds file tuned on it out of fold, given the folder of the round whose MIL head is read."""

    probs: Callable[[pd.DataFrame, pd.DataFrame | None], pd.DataFrame]
    reads: tuple[str, ...]
    thresholds: Callable[[Config, Path], Path]


MIL, IMAGE_MODEL = "mil", "image_model"
IMAGE_LEVELS: dict[str, ImageLevel] = {
    "mil": ImageLevel(_mil_level, (MIL,), lambda cfg, round_dir: round_dir / "thresholds.json"),
    "image_model": ImageLevel(
        _model_level, (IMAGE_MODEL,), lambda cfg, round_dir: cfg.image_model_dir / "thresholds.json"
    ),
    "mean": ImageLevel(
        _mean_level, (MIL, IMAGE_MODEL), lambda cfg, round_dir: round_dir / "thresholds-mean.json"
    ),
}


def needs_image_model(infer: InferConfig) -> bool:
    """Whether the submitted confidence or ``image_level.csv`` reads the whole-image model."""
    return infer.image_model_rule != "none" or IMAGE_MODEL in IMAGE_LEVELS[infer.image_level].reads


# The infer settings that say how the whole-image model joins the cell model (the rest of ``infer`` is the
# cell model's).
JOINING = ("image_model_rule", "image_model_power", "image_level")


def uses_image_model(cfg: Config) -> bool:
    """Whether a submission made with ``cfg`` depends on the whole-image model: it is enabled, and the rule
    or the image level reads it (enabled under ``none`` / ``mil``, it is predicted but changes nothing)."""
    return cfg.image_model.enabled and needs_image_model(cfg.infer)


def image_level_probs(cfg: Config, mil: pd.DataFrame, model: pd.DataFrame | None) -> pd.DataFrame:
    """The ``image_id, p_*`` table ``image_level.csv`` is thresholded from (``infer.image_level``); only
    ``image_id`` and the ``p_*`` columns are read from either table."""
    columns = ["image_id", *(c for c in mil.columns if c.startswith("p_"))]
    return IMAGE_LEVELS[cfg.infer.image_level].probs(
        mil[columns], model[columns] if model is not None else None
    )


def thresholds_file(cfg: Config, round_dir: Path) -> Path:
    """Where the thresholds of ``infer.image_level``'s source are (``round_dir``: the MIL head's round)."""
    return IMAGE_LEVELS[cfg.infer.image_level].thresholds(cfg, round_dir)
