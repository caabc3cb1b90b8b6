from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.conftest import REPO
from weakcell.config import load_config
from weakcell.data.datasets import get_dataset
from weakcell.data.labels import read_label_file, to_multi_hot
from weakcell.errors import StageError
from weakcell.folds import fold_class_counts, make_folds, read_folds, run
from weakcell.folds_record import FoldsRecord, load_folds, record_path

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


def _label_file(folder, labels: pd.DataFrame) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"ID": labels["ID"], "Label": ["|".join(map(str, r)) for r in labels["labels"]]}).to_csv(
        folder / "train.csv", index=False
    )


def test_stage_writes_once_and_checks_ids(tmp_path, capsys):
    data = tmp_path / "data" / "hpa2021"
    _label_file(data, _random_labels(60))
    cfg = load_config(None, [f"paths.root={tmp_path}", "data.dataset=hpa2021"])
    written = run(cfg)
    assert read_folds(cfg.folds_file).equals(written)
    record = FoldsRecord.read(cfg.folds_file)
    assert record is not None and record.describe() == "5 folds, seed 42"
    run(cfg)
    assert "reused" in capsys.readouterr().out
    # the kit's own file of these settings follows a label file with other images (runs trained on the
    # old folds notice: they record the folds file's content)
    _label_file(data, _random_labels(30, seed=1).assign(ID=lambda t: "new" + t["ID"]))
    rebuilt = run(cfg)
    assert set(rebuilt["ID"]) == {f"newimg{i:04d}" for i in range(30)}
    assert read_folds(cfg.folds_file).equals(rebuilt)


def _git(folder, *args):
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
        cwd=folder,
        check=True,
        capture_output=True,
    )


def test_fold_settings_with_an_existing_folds_file_get_their_own_file(tmp_path, capsys):
    """The README's example: other fold settings once the committed folds exist. They get a file of their
    own that training reads; the committed file stays byte for byte, FORCE=1 included."""
    data = tmp_path / "data" / "hpa2021"
    _label_file(data, _random_labels(80))
    default = load_config(None, [f"paths.root={tmp_path}", "data.dataset=hpa2021"])
    run(default)
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", "folds")
    _git(tmp_path, "commit", "-q", "-m", "committed folds")
    committed = default.folds_file.read_bytes()

    mine = load_config(
        None, [f"paths.root={tmp_path}", "data.dataset=hpa2021", "folds.n_splits=4", "folds.seed=7"]
    )
    assert mine.folds_file == tmp_path / "folds" / "hpa2021-4x7.csv"
    folds = run(mine)
    assert sorted(folds["fold"].unique()) == [0, 1, 2, 3]
    assert folds.equals(
        make_folds(read_label_file(data / "train.csv", get_dataset("hpa2021")), N_CLASSES, 4, 7)
    )
    assert default.folds_file.read_bytes() == committed
    # what a run of these settings reads and records: their own file, by its content
    read, content = load_folds(mine)
    assert read.equals(folds) and content != load_folds(default)[1]
    # pointing folds.file at the committed file with other settings stops in one line; so does FORCE=1 on it
    pointed = mine.model_copy(
        update={"folds": mine.folds.model_copy(update={"file": str(default.folds_file)})}
    )
    for attempt in (
        pointed,
        pointed.model_copy(update={"force": True}),
        default.model_copy(update={"force": True}),
    ):
        with pytest.raises(StageError) as err:
            run(attempt)
        assert "\n" not in str(err.value)
    with pytest.raises(StageError, match=r"folds\.n_splits: 5 -> 4"):
        load_folds(pointed)
    assert default.folds_file.read_bytes() == committed
    # the user's own file is theirs to rebuild
    run(mine.model_copy(update={"force": True}))
    assert load_folds(mine)[1] == content


def test_a_folds_file_without_a_record_is_adopted_only_when_these_settings_make_it(tmp_path, capsys):
    data = tmp_path / "data" / "hpa2021"
    labels = _random_labels(50)
    _label_file(data, labels)
    cfg = load_config(None, [f"paths.root={tmp_path}", "data.dataset=hpa2021"])
    cfg.folds_file.parent.mkdir(parents=True)
    make_folds(labels, N_CLASSES, 5, 42).to_csv(cfg.folds_file, index=False)  # an older weakcell's file
    run(cfg)
    assert FoldsRecord.read(cfg.folds_file) is not None and "reused" in capsys.readouterr().out
    record_path(cfg.folds_file).unlink()
    make_folds(labels, N_CLASSES, 5, 3).to_csv(cfg.folds_file, index=False)  # made with another seed
    with pytest.raises(StageError, match=r"folds\.file="):
        run(cfg)
    # named explicitly, a file of one's own is used as it is
    own = cfg.model_copy(update={"folds": cfg.folds.model_copy(update={"file": str(cfg.folds_file)})})
    assert run(own)["fold"].tolist() == make_folds(labels, N_CLASSES, 5, 3)["fold"].tolist()


def test_committed_hpa2021_folds_match_real_labels():
    from tests.conftest import shared_path

    folds = read_folds(REPO / "folds" / "hpa2021.csv")
    spec = get_dataset("hpa2021")
    labels = read_label_file(shared_path("hpa2021", "train.csv"), spec)
    assert set(folds["ID"]) == set(labels["ID"]) and len(folds) == len(labels)
    counts = fold_class_counts(labels, folds, spec.n_classes)
    # the rare classes 11 (78 images) and 18 (34 images) are spread over every fold
    assert (counts["11"] >= 15).all() and (counts["18"] >= 6).all()


def test_committed_hpa2021_folds_record_their_settings_and_labels():
    """folds/hpa2021.csv is make_folds(5 folds, seed 42) of the competition's train.csv, as its record says."""
    from tests.conftest import shared_path
    from weakcell.data.manifest import file_hash

    folds_file = REPO / "folds" / "hpa2021.csv"
    record = FoldsRecord.read(folds_file)
    assert record is not None and record.content == file_hash(folds_file)
    assert record.lineage.settings == {
        "folds.duplicates": None,
        "folds.external": [],
        "folds.external_mode": "train_only",
        "folds.group_column": None,
        "folds.n_splits": 5,
        "folds.seed": 42,
    }
    assert record.lineage.upstream == {"labels": file_hash(shared_path("hpa2021", "train.csv"))}


def test_folds_without_the_data_say_where_it_should_be(tmp_path, monkeypatch, capsys):
    """Issue 26: the README's `make folds CONFIG=configs/hpa2021.yaml` failed with a bare "label file not
    found: data/hpa2021/train.csv"; it now says how to get the files or where to point data.dir."""
    from weakcell.cli import main

    monkeypatch.chdir(tmp_path)
    config = Path(__file__).resolve().parents[1] / "configs" / "hpa2021.yaml"
    assert main(["folds", str(config)]) == 2
    err = capsys.readouterr().err
    assert "no data/hpa2021/train.csv: make download" in err and "data.dir" in err and "make init" in err
