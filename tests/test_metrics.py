from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, f1_score

from weakcell.metrics import (
    average_precision,
    expected_calibration_error,
    f1_per_class,
    macro_f1,
    mean_average_precision,
)


def test_average_precision_matches_sklearn_without_ties():
    rng = np.random.default_rng(0)
    for _ in range(20):
        y = rng.random(50) < 0.3
        if not y.any():
            continue
        s = rng.random(50)
        assert average_precision(y, s) == pytest.approx(average_precision_score(y, s))


def test_missed_positives_lower_ap_like_recall():
    y = np.array([1, 0, 1])
    s = np.array([0.9, 0.5, 0.8])
    assert average_precision(y, s) == pytest.approx(1.0)
    # two retrievable positives at precision 1, one that was never found: AP = 2/3
    assert average_precision(y, s, n_missed=1) == pytest.approx(2 / 3)
    assert np.isnan(average_precision(np.zeros(3), s))


def test_map_skips_classes_without_positives():
    y = np.array([[1, 0], [0, 0], [1, 0]])
    s = np.array([[0.9, 0.1], [0.1, 0.9], [0.8, 0.3]])
    assert mean_average_precision(y, s) == pytest.approx(1.0)


def test_f1_matches_sklearn():
    rng = np.random.default_rng(1)
    y = (rng.random((40, 5)) < 0.4).astype(int)
    p = (rng.random((40, 5)) < 0.4).astype(int)
    assert f1_per_class(y, p) == pytest.approx(f1_score(y, p, average=None, zero_division=0))
    assert macro_f1(y, p) == pytest.approx(f1_score(y, p, average="macro", zero_division=0))


def test_expected_calibration_error_by_hand():
    # bin [0.1, 0.2): probabilities 0.1, 0.1 against one positive in two -> |0.5 - 0.1| = 0.4, weight 2
    # bin [0.9, 1.0]: probabilities 0.9, 1.0 against two positives -> |1 - 0.95| = 0.05, weight 2
    y = np.array([[1, 0], [1, 1]])
    p = np.array([[0.1, 0.1], [0.9, 1.0]])
    assert expected_calibration_error(y, p) == pytest.approx((2 * 0.4 + 2 * 0.05) / 4)
    # perfectly calibrated bins: half the pairs in the 0.5 bin are positives
    assert expected_calibration_error(np.array([1, 0]), np.array([0.5, 0.5])) == pytest.approx(0.0)
