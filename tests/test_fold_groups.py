"""Grouped folds: near-duplicate clusters and external antibodies never straddle folds, train-only external
images, the folds report beside plain stratification, test-set twins, and today's folds when no groups
are configured."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.conftest import REPO, shared_path
from tests.test_folds import N_CLASSES, _random_labels
from weakcell.config import Config, load_config
from weakcell.data.datasets import get_dataset
from weakcell.data.labels import read_label_file
from weakcell.errors import StageError
from weakcell.fold_groups import (
    COMPETITION,
    FoldInputs,
    fold_inputs,
    group_codes,
    straddling,
    twins_in_test,
)
from weakcell.folds import grouped_folds, make_folds, plain_folds, read_folds, run
from weakcell.folds_record import FoldsRecord

NO_PAIRS = pd.DataFrame({"a": [], "b": [], "distance": []})


def inputs_of(images: pd.DataFrame, pairs: pd.DataFrame, mode: str = "train_only") -> FoldInputs:
    modes = {source: mode for source in images["source"].unique() if source != COMPETITION}
    return FoldInputs(images, pairs, frozenset(), modes, "dups.json")


def competition(labels: pd.DataFrame) -> pd.DataFrame:
    return labels[["ID", "labels"]].assign(source=COMPETITION, antibody=None)


def test_committed_folds_unchanged_without_a_duplicates_file():
    spec = get_dataset("hpa2021")
    labels = read_label_file(shared_path("hpa2021", "train.csv"), spec)
    committed = read_folds(REPO / "folds" / "hpa2021.csv")
    assert make_folds(labels, spec.n_classes, 5, 42).equals(committed)
    # a duplicates file without pairs: every group a single image, the same folds
    assert grouped_folds(inputs_of(competition(labels), NO_PAIRS), spec.n_classes, 5, 42).equals(committed)


def test_groups_by_hand():
    ids = pd.Series(["a", "b", "c", "d", "e"])
    antibodies = pd.Series([None, None, "7", "7", None])
    pairs = pd.DataFrame({"a": ["a", "b"], "b": ["e", "zz"], "distance": [3, 1]})  # zz is no image here
    assert group_codes(ids, antibodies, pairs).tolist() == [0, 1, 2, 2, 0]
    fold_of = pd.Series({"a": 0, "b": 1, "c": -1, "d": -1, "e": 0})
    four = pd.DataFrame({"a": ["a", "c", "a", "c", "q"], "b": ["b", "d", "e", "a", "a"], "distance": 1})
    assert straddling(fold_of, four) == (2, 4)  # a|b and c(-1)|a straddle; c|d both train-only, a|e one fold
    twins = twins_in_test(
        pd.DataFrame({"a": ["t1", "x", "y"], "b": ["x", "t2", "z"], "distance": [5, 2, 1]}),
        {"x", "y", "z"},
        frozenset({"t1", "t2"}),
    )
    assert twins.to_dict("list") == {"test": ["t2", "t1"], "train": ["x", "x"], "distance": [2, 5]}


def test_near_duplicate_clusters_never_straddle_folds():
    labels = _random_labels(600, seed=3)
    rng = np.random.default_rng(0)
    ids = labels["ID"].to_numpy()
    pairs = pd.DataFrame(
        {"a": ids[rng.integers(0, 600, 120)], "b": ids[rng.integers(0, 600, 120)], "distance": 2}
    )
    pairs = pairs[pairs["a"] != pairs["b"]]
    inputs = inputs_of(competition(labels), pairs)
    kit = grouped_folds(inputs, N_CLASSES, 5, 0).set_index("ID")["fold"]
    plain = plain_folds(inputs, N_CLASSES, 5, 0).set_index("ID")["fold"]
    assert straddling(kit, pairs)[0] == 0
    assert straddling(plain, pairs)[0] >= 0.6 * len(pairs)  # chance level is 80% at 5 folds
    assert sorted(kit.unique()) == [0, 1, 2, 3, 4]
    assert kit.value_counts().between(90, 150).all()  # groups of up to a few images keep folds near 120


def test_external_images_train_only_or_folded():
    labels = _random_labels(200, seed=1)
    external = _random_labels(60, seed=2).assign(ID=lambda t: "ext" + t["ID"])
    external = external.assign(source="data/ext", antibody=[f"ab{k // 3}" for k in range(60)])
    images = pd.concat([competition(labels), external], ignore_index=True)
    # ext img0000 (antibody ab0, with ext img0001 and img0002) is a near-duplicate of competition img0005
    pairs = pd.DataFrame({"a": ["extimg0000"], "b": ["img0005"], "distance": [4]})
    train_only = grouped_folds(inputs_of(images, pairs), N_CLASSES, 5, 0).set_index("ID")["fold"]
    tied = ["extimg0000", "extimg0001", "extimg0002", "img0005"]
    assert train_only[tied].nunique() == 1 and train_only["img0005"] >= 0
    assert (train_only[external["ID"].iloc[3:]] == -1).all()
    folded = grouped_folds(inputs_of(images, pairs, "folded"), N_CLASSES, 5, 0).set_index("ID")["fold"]
    assert (folded >= 0).all()
    assert (folded[external["ID"]].groupby(external["antibody"].to_numpy()).nunique() == 1).all()
    assert folded[tied].nunique() == 1


def write_set(folder, ids, label_texts, antibodies=None):  # type: ignore[no-untyped-def]
    folder.mkdir(parents=True)
    pd.DataFrame({"ID": ids, "Label": label_texts}).to_csv(folder / "train.csv", index=False)
    if antibodies is not None:
        pd.DataFrame({"ID": ids, "antibody": antibodies, "status": "ok"}).to_csv(
            folder / "sources.csv", index=False
        )


def test_make_folds_writes_the_report_warns_of_test_twins_and_refuses_leaky_files(tmp_path, capsys):
    labels = _random_labels(100, seed=4)
    data = tmp_path / "data" / "hpa2021"
    write_set(data, labels["ID"], ["|".join(map(str, r)) for r in labels["labels"]])
    pd.DataFrame({"ID": ["t1", "t2"], "ImageWidth": 8, "ImageHeight": 8, "PredictionString": ""}).to_csv(
        data / "sample_submission.csv", index=False
    )
    write_set(tmp_path / "ext", ["e1", "e2", "e3"], ["0", "16", "0|16"], ["55", "55", "56"])
    duplicates = tmp_path / "dups.json"
    pairs = [{"a": f"img{k:04d}", "b": f"img{k + 1:04d}", "distance": 1} for k in range(0, 40, 2)]
    pairs += [{"a": "e3", "b": "img0050", "distance": 2}, {"a": "img0007", "b": "t2", "distance": 6}]
    duplicates.write_text(json.dumps({"pairs": pairs, "clusters": []}))
    base = [f"paths.root={tmp_path}", "data.dataset=hpa2021"]
    plain_cfg = load_config(None, base)
    plain = run(plain_cfg)  # today's folds first
    assert len(plain) == 100
    plain_bytes = plain_cfg.folds_file.read_bytes()
    capsys.readouterr()
    grouped = [*base, f"folds.duplicates={duplicates}", f"folds.external=[{tmp_path / 'ext'}]"]
    grouped_cfg = load_config(None, grouped)
    # grouped settings get a file of their own, which records the groups' inputs; the plain file stays
    assert grouped_cfg.folds_file == tmp_path / "folds" / "hpa2021-5x42-dups-ext.csv"
    folds = run(grouped_cfg).set_index("ID")["fold"]
    out = capsys.readouterr().out
    assert folds["e3"] == folds["img0050"] and folds["e1"] == folds["e2"] == -1
    assert "21 near-duplicate pairs among the folded images (1 more name other images)" in out
    assert "0 (0%) with the kit's grouped folds" in out
    assert "warning: 1 test image(s) are near-duplicates of training images: t2 ~ img0007 (d=6)" in out
    report = (tmp_path / "reports" / "folds-hpa2021.md").read_text()
    assert "| kit: grouped by antibody and near-duplicate cluster | 0 | 0% | 0 |" in report
    assert "| t2 | img0007 | 6 |" in report
    assert "103 images in" in report and "3 external images, 2 train-only (fold -1)" in report
    assert plain_cfg.folds_file.read_bytes() == plain_bytes
    record = FoldsRecord.read(grouped_cfg.folds_file)
    assert record is not None and set(record.lineage.upstream) == {"labels", "duplicates", "external"}
    assert record.describe() == "5 folds, seed 42, near-duplicates of dups.json, 1 external set(s) train_only"
    assert "reused" in _rerun(grouped_cfg, capsys)
    # a file of one's own that splits pairs (plain stratification over the same images) is refused
    mine = tmp_path / "mine.csv"
    plain_folds(fold_inputs(grouped_cfg, get_dataset("hpa2021"), _labels(data)), N_CLASSES, 5, 42).to_csv(
        mine, index=False
    )
    with pytest.raises(StageError, match=r"splits \d+ near-duplicate pair.*FORCE=1"):
        run(load_config(None, [*grouped, f"folds.file={mine}"]))
    assert run(load_config(None, [*grouped, f"folds.file={mine}", "force=true"])).equals(
        read_folds(grouped_cfg.folds_file)
    )
    # a duplicates file from elsewhere: the same file name, but its record refuses it
    elsewhere = tmp_path / "other" / "dups.json"
    elsewhere.parent.mkdir()
    elsewhere.write_text(duplicates.read_text())
    other = [*base, f"folds.duplicates={elsewhere}", f"folds.external=[{tmp_path / 'ext'}]"]
    with pytest.raises(StageError, match=r"folds\.duplicates: .* point folds\.file at another file"):
        run(load_config(None, other))


def _rerun(cfg: Config, capsys: pytest.CaptureFixture[str]) -> str:
    run(cfg)
    return capsys.readouterr().out


def _labels(data: Path) -> pd.DataFrame:
    return read_label_file(data / "train.csv", get_dataset("hpa2021"))
