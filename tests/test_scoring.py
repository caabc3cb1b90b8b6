"""The score formulas of ``weakcell.scoring``; expected values worked out by hand."""

from __future__ import annotations

import typing

import numpy as np
import pandas as pd

from weakcell.constants import CellScore
from weakcell.scoring import CELL_SCORES, cell_confidence, cell_scores, max_pool_images


def test_cell_confidence_mixes_the_image_and_its_best_cell() -> None:
    # three cells of image "b" around one of image "a", two classes; "b"'s best cells: 0.8 and 0.4
    cell = np.array([[0.8, 0.1], [0.5, 0.2], [0.2, 0.9], [0.4, 0.4]])
    image = np.array([[0.6, 0.5], [0.6, 0.5], [0.1, 0.3], [0.6, 0.5]])
    ids = np.array(["b", "b", "a", "b"])
    np.testing.assert_allclose(cell_confidence(cell, image, ids, 1.0, 0.0), cell * image)
    best = np.array([[0.8, 0.4], [0.8, 0.4], [0.2, 0.9], [0.8, 0.4]])
    np.testing.assert_allclose(cell_confidence(cell, image, ids, 1.0, 1.0), cell * best)
    mixed = cell_confidence(cell, image, ids, 3.0, 0.25)
    np.testing.assert_allclose(
        mixed[0], [0.8 * (0.75 * 0.6 + 0.25 * 0.8) ** 3, 0.1 * (0.75 * 0.5 + 0.1) ** 3]
    )
    np.testing.assert_allclose(mixed[2], [0.2 * (0.75 * 0.1 + 0.05) ** 3, 0.9 * (0.75 * 0.3 + 0.225) ** 3])
    # power 0: the cell's own probability, whatever the image says
    np.testing.assert_allclose(cell_confidence(cell, image, ids, 0.0, 0.25), cell)


def test_max_pool_images_takes_each_images_best_cell_and_zero_without_cells() -> None:
    cells = pd.DataFrame({"image_id": ["a", "b", "a"]})
    probs = np.array([[0.2, 0.7], [0.9, 0.1], [0.6, 0.3]])
    pooled = max_pool_images(cells, probs, ["b", "none", "a"])
    np.testing.assert_allclose(pooled, [[0.9, 0.1], [0.0, 0.0], [0.6, 0.7]])


def test_cell_scores_join_each_cell_to_its_images_probability() -> None:
    # one class; cells of images "a" and "b" interleaved, images listed in another order
    oof_cell = pd.DataFrame(
        {
            "image_id": ["a", "b", "a"],
            "cell_id": [1, 1, 2],
            "p_0": [0.5, 0.4, 0.2],
            "mil_p_0": [0.3, 0.6, 0.1],
            "att_0": [1.5, 0.5, 0.5],
        }
    )
    oof_image = pd.DataFrame({"image_id": ["b", "a"], "p_0": [0.25, 0.8]})
    np.testing.assert_allclose(cell_scores("stage1", oof_cell, oof_image, 1).ravel(), [0.5, 0.4, 0.2])
    np.testing.assert_allclose(cell_scores("mil_instance", oof_cell, oof_image, 1).ravel(), [0.3, 0.6, 0.1])
    # image probability x attention clipped to [0, 1]
    np.testing.assert_allclose(
        cell_scores("mil_attention", oof_cell, oof_image, 1).ravel(), [0.8, 0.125, 0.4]
    )
    np.testing.assert_allclose(
        cell_scores("stage1_x_image", oof_cell, oof_image, 1).ravel(), [0.4, 0.1, 0.16]
    )


def test_every_cell_score_a_config_may_name_has_a_formula() -> None:
    assert set(CELL_SCORES) == set(typing.get_args(CellScore))
