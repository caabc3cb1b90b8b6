from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.conftest import REPO
from weakcell.config import load_config
from weakcell.data.datasets import get_dataset
from weakcell.data.labels import read_label_file, to_multi_hot
from weakcell.folds import fold_class_counts, make_folds, read_folds, run

N_CLASSES = 19


def _random_labels(n: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    freq = np.linspace(0.5, 0.02, N_CLASSES)
    hot = rng.random((n, N_CLASSES)) < freq
    hot[hot.sum(1) == 0, 18] = True
    return pd.DataFrame(
        {"ID": [f"img{i:04d}" for i in range(n)], "labels": [list(np.flatnonzero(r)) for r in hot]}
    )


def test_every_id_in_exactly_one_fold_and_balanced():
    labels = _random_labels(500)
    folds = make_folds(labels, N_CLASSES, n_splits=5, seed=1)
    assert folds["ID"].tolist() == labels["ID"].tolist()
    assert set(folds["fold"]) == set(range(5))
    counts = fold_class_counts(labels, folds, N_CLASSES)
    # the stratifier balances labels first; fold sizes stay within 10% of the ideal 100
    assert counts["images"].between(90, 110).all()
    per_class = counts.drop(columns="images").to_numpy()
    ideal = to_multi_hot(labels["labels"].tolist(), N_CLASSES).sum(0) / 5
    assert (np.abs(per_class - ideal) <= 0.2 * ideal + 2).all()
    # and clearly better balanced than folds drawn at random
    shuffled = folds.assign(fold=np.random.default_rng(0).permutation(folds["fold"].to_numpy()))
    random_counts = fold_class_counts(labels, shuffled, N_CLASSES).drop(columns="images").to_numpy()
    assert ((per_class - ideal) ** 2).sum() < 0.5 * ((random_counts - ideal) ** 2).sum()


def test_seed_changes_assignment_but_is_deterministic():
    labels = _random_labels(200)
    a = make_folds(labels, N_CLASSES, 5, seed=1)
    assert a.equals(make_folds(labels, N_CLASSES, 5, seed=1))
    assert not a.equals(make_folds(labels, N_CLASSES, 5, seed=2))


def test_groups_never_straddle_folds():
    labels = _random_labels(300)
    labels["plate"] = [f"p{i // 4}" for i in range(len(labels))]
    folds = make_folds(labels, N_CLASSES, 5, seed=0, group_column="plate")
    per_group = folds.assign(plate=labels["plate"]).groupby("plate")["fold"].nunique()
    assert (per_group == 1).all()
    with pytest.raises(KeyError, match="plate2"):
        make_folds(labels, N_CLASSES, 5, seed=0, group_column="plate2")


def test_stage_writes_once_and_checks_ids(tmp_path, capsys):
    data = tmp_path / "data" / "hpa2021"
    data.mkdir(parents=True)
    labels = _random_labels(60)
    pd.DataFrame({"ID": labels["ID"], "Label": ["|".join(map(str, r)) for r in labels["labels"]]}).to_csv(
        data / "train.csv", index=False
    )
    cfg = load_config(None, [f"paths.root={tmp_path}", "data.dataset=hpa2021"])
    written = run(cfg)
    assert read_folds(cfg.folds_file).equals(written)
    run(cfg)
    assert "already covers" in capsys.readouterr().out
    pd.DataFrame({"ID": ["other"], "Label": ["1"]}).to_csv(data / "train.csv", index=False)
    with pytest.raises(ValueError, match="FORCE=1"):
        run(cfg)


def test_committed_hpa2021_folds_match_real_labels():
    from tests.conftest import shared_path

    folds = read_folds(REPO / "folds" / "hpa2021.csv")
    spec = get_dataset("hpa2021")
    labels = read_label_file(shared_path("hpa2021", "train.csv"), spec)
    assert set(folds["ID"]) == set(labels["ID"]) and len(folds) == len(labels)
    counts = fold_class_counts(labels, folds, spec.n_classes)
    # the rare classes 11 (78 images) and 18 (34 images) are spread over every fold
    assert (counts["11"] >= 15).all() and (counts["18"] >= 6).all()


def test_folds_without_the_data_say_where_it_should_be(tmp_path, monkeypatch, capsys):
    """Issue 26: the README's `make folds CONFIG=configs/hpa2021.yaml` failed with a bare "label file not
    found: data/hpa2021/train.csv"; it now says how to get the files or where to point data.dir."""
    from weakcell.cli import main

    monkeypatch.chdir(tmp_path)
    config = Path(__file__).resolve().parents[1] / "configs" / "hpa2021.yaml"
    assert main(["folds", str(config)]) == 2
    err = capsys.readouterr().err
    assert "no data/hpa2021/train.csv: make download" in err and "data.dir" in err and "make init" in err
