from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from weakcell.config import ThresholdsConfig, load_config
from weakcell.metrics import f1_per_class
from weakcell.thresholds import cross_fitted_f1, read_thresholds, run, tune_thresholds


def _scores(n: int = 400, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Class 0: positives score around 0.3 (0.5 is too high); class 1: 3 positives only."""
    rng = np.random.default_rng(seed)
    y = np.zeros((n, 2), np.uint8)
    y[: n // 2, 0] = 1
    y[:3, 1] = 1
    probs = np.where(y == 1, 0.3, 0.1) + rng.normal(0, 0.05, (n, 2))
    return y, np.clip(probs, 0, 1)


OWN = ThresholdsConfig(shrinkage=0)  # each class its own best threshold, rare classes the fallback


def test_tuned_threshold_beats_half_and_rare_class_falls_back():
    y, probs = _scores()
    table = tune_thresholds(y, probs, OWN)
    row = table.iloc[0]
    assert 0.1 < row["threshold"] < 0.3
    assert row["f1"] > row["f1_at_05"]
    # the reported F1 is the F1 at the reported threshold, computed independently
    assert row["f1"] == f1_per_class(y[:, :1], probs[:, :1] >= row["threshold"])[0]
    rare = table.iloc[1]
    assert not rare["tuned"] and rare["threshold"] == 0.5 and rare["positives"] == 3


def test_shrinkage_pulls_each_class_toward_the_pooled_threshold_by_its_positives():
    y, probs = _scores()
    own = tune_thresholds(y, probs, OWN)["threshold"].to_numpy()
    f1 = np.stack([f1_per_class(y, probs >= t) for t in np.arange(0.01, 1.0, 0.01)])
    pooled = np.arange(0.01, 1.0, 0.01)[f1.mean(1).argmax()]  # best macro-F1 over both classes
    table = tune_thresholds(y, probs, ThresholdsConfig(shrinkage=200))
    # class 0 has 200 positives: half its own threshold, half the pooled one; the rare class: the pooled one
    assert table["threshold"][0] == pytest.approx(0.5 * own[0] + 0.5 * pooled, abs=1e-6)
    assert table["threshold"][1] == pytest.approx(pooled) and not table["tuned"][1]
    assert own[1] == 0.5 and pooled != 0.5


def test_cross_fitted_f1_is_not_above_in_sample():
    y, probs = _scores(seed=1)
    folds = np.arange(len(y)) % 5
    tuning = ThresholdsConfig(min_positives=1, shrinkage=0)
    in_sample = tune_thresholds(y, probs, tuning)["f1"].mean()
    assert cross_fitted_f1(y, probs, folds, tuning) <= in_sample + 1e-9


def test_stage_writes_thresholds_json(tmp_path):
    y, probs = _scores(100)
    ids = [f"img{i}" for i in range(100)]
    data = tmp_path / "data" / "hpa2021"
    data.mkdir(parents=True)
    labels = ["|".join(str(c) for c in np.flatnonzero(row)) or "18" for row in y]
    pd.DataFrame({"ID": ids, "Label": labels}).to_csv(data / "train.csv", index=False)
    run_dir = tmp_path / "runs" / "t"
    run_dir.mkdir(parents=True)
    oof = pd.DataFrame({f"p_{c}": probs[:, c] if c < 2 else 0.0 for c in range(19)}).assign(
        image_id=ids, fold=np.arange(100) % 5
    )
    oof.to_parquet(run_dir / "oof_image.parquet")
    cfg = load_config(None, [f"paths.root={tmp_path}", "data.dataset=hpa2021", "name=t", "refine.rounds=0"])
    table = run(cfg)
    written = json.loads((run_dir / "thresholds.json").read_text())
    assert len(written["classes"]) == 19
    assert np.allclose(read_thresholds(run_dir / "thresholds.json"), table["threshold"])
    assert written["summary"]["macro_f1_tuned"] >= written["summary"]["macro_f1_tuned_cross_fitted"]


def test_too_few_positives_fall_back_loudly_not_to_the_lowest_threshold(tmp_path, capsys):
    """Issue 26: on 5 training images every class's threshold silently became 0.010 (the pooled best on a
    handful of images is the grid's lowest) and image_level.csv listed all 19 classes. With no class
    tunable the fallback is used, and more than half untuned is a warning in the summary and the file."""
    y_true = np.array([[1, 0, 0], [0, 1, 0], [1, 0, 1], [0, 0, 1], [1, 1, 0]])
    probs = np.array([[0.6, 0.2, 0.1], [0.3, 0.4, 0.2], [0.7, 0.1, 0.5], [0.2, 0.3, 0.6], [0.5, 0.6, 0.1]])
    from weakcell.thresholds import fallback_warning

    tuning = ThresholdsConfig(min_positives=5, shrinkage=20, fallback=0.5)
    table = tune_thresholds(y_true, probs, tuning)
    assert table["threshold"].tolist() == [0.5, 0.5, 0.5] and not table["tuned"].any()
    warning = fallback_warning(table, tuning)
    assert warning is not None and warning.startswith(
        "3 of 3 classes have fewer than thresholds.min_positives=5"
    )
    assert fallback_warning(tune_thresholds(y_true, probs, ThresholdsConfig(min_positives=2)), tuning) is None
