"""Pseudo-label refinement: the selection rule on hand-built scores, the label-quality figures, and a round
end to end on the tiny synthetic pipeline (round 1 trains from round 0's OOF outputs)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from weakcell.config import RefineConfig
from weakcell.constants import NEGATIVE
from weakcell.lineage import Lineage, read_lineage, write_lineage
from weakcell.refine import label_quality, negative_floor, pseudo_labels

C = NEGATIVE + 1


def _cells(scores_by_cell: list[dict[int, float]], image_ids: list[str], labels: dict[str, list[int]]):
    scores = np.zeros((len(scores_by_cell), C))
    for row, values in enumerate(scores_by_cell):
        for c, v in values.items():
            scores[row, c] = v
    inherited = np.zeros_like(scores)
    for row, image in enumerate(image_ids):
        inherited[row, labels[image]] = 1
    return scores, np.array(image_ids), inherited


def test_rule_keeps_image_classes_of_cells_near_the_best_cell():
    labels = {"a": [0, 3], "b": [5]}
    scores, ids, inherited = _cells(
        [{0: 0.9, 3: 0.1, 7: 0.99}, {0: 0.5, 3: 0.2}, {0: 0.1, 3: 0.05}, {5: 0.4}, {5: 0.05}],
        ["a", "a", "a", "b", "b"],
        labels,
    )
    attention = np.ones_like(scores)
    targets, trainable = pseudo_labels(
        scores, ids, inherited, attention, np.full(C, 0.5), RefineConfig(relative=0.3, negative_quantile=None)
    )
    # class 7 is not an image label: never kept, however high; class 0: 0.9 and 0.5 >= 0.3 * 0.9, 0.1 not;
    # the image label the third cell misses is left out of the loss (NaN, the default uncertain=ignore),
    # b's cells lack class 0 and learn it as absent
    assert targets[:, 7].tolist() == [0, 0, 0, 0, 0]
    np.testing.assert_array_equal(targets[:, 0], [1, 1, np.nan, 0, 0])
    # class 3: best 0.2 -> 0.1 and 0.2 kept (>= 0.06), 0.05 not
    np.testing.assert_array_equal(targets[:, 3], [1, 1, np.nan, 0, 0])
    # cells keeping nothing learn Negative; everything stays trainable
    assert targets[:, NEGATIVE].tolist() == [0, 0, 1, 0, 1]
    assert trainable.all()
    # relative is per image: b's best cell keeps 5 although 0.4 < 0.3 * 0.9; its second cell misses it
    assert targets[3, 5] == 1 and np.isnan(targets[4, 5])
    # uncertain=negative teaches each miss as 0 instead
    as_zero = RefineConfig(relative=0.3, negative_quantile=None, uncertain="negative")
    taught, _ = pseudo_labels(scores, ids, inherited, attention, np.full(C, 0.5), as_zero)
    assert taught[:, 0].tolist() == [1, 1, 0, 0, 0] and taught[4, 5] == 0 and not np.isnan(taught).any()


def test_rule_floors_drop_and_soft_targets():
    labels = {"a": [0]}
    scores, ids, inherited = _cells([{0: 0.8}, {0: 0.3}, {0: 0.1}], ["a"] * 3, labels)
    attention = np.zeros_like(scores)
    attention[:, 0] = [2.0, 0.5, 0.5]
    thresholds = np.full(C, 0.4)
    floor = RefineConfig(relative=0.0, threshold_scale=0.5, uncertain="negative")  # keep >= 0.2
    targets, _ = pseudo_labels(scores, ids, inherited, attention, thresholds, floor)
    assert targets[:, 0].tolist() == [1, 1, 0]
    attended = RefineConfig(relative=0.0, min_attention=1.0, uncertain="negative")
    targets, _ = pseudo_labels(scores, ids, inherited, attention, thresholds, attended)
    assert targets[:, 0].tolist() == [1, 0, 0]
    dropped = RefineConfig(relative=0.3, unlabelled="drop")
    targets, trainable = pseudo_labels(scores, ids, inherited, attention, thresholds, dropped)
    assert trainable.tolist() == [True, True, False] and targets[:, NEGATIVE].sum() == 0
    soft = RefineConfig(relative=0.3, targets="soft", uncertain="negative")
    targets, _ = pseudo_labels(scores, ids, inherited, attention, thresholds, soft)
    assert targets[:, 0] == pytest.approx([1.0, 0.375, 0.0])
    # ignore: the image label the third cell does not keep is left out of the loss, not taught as 0;
    # classes the image does not have stay 0, and the cell still learns Negative
    ignored = RefineConfig(relative=0.3, uncertain="ignore")
    targets, _ = pseudo_labels(scores, ids, inherited, attention, thresholds, ignored)
    assert targets[:2, 0].tolist() == [1, 1] and np.isnan(targets[2, 0])
    assert np.isnan(targets).sum() == 1 and targets[2, NEGATIVE] == 1


def test_negative_floor_keeps_cells_that_outscore_images_without_the_class():
    # image a has class 0 with one peaky best cell; images b, c lack it, so their cells are known negatives
    labels = {"a": [0], "b": [5], "c": [5]}
    scores, ids, inherited = _cells(
        [{0: 0.9}, {0: 0.2}, {0: 0.05}, {0: 0.1, 5: 0.7}, {0: 0.12}, {0: 0.08}, {0: 0.02, 5: 0.6}],
        ["a", "a", "a", "b", "b", "c", "c"],
        labels,
    )
    floor = negative_floor(scores, inherited, 0.75)
    assert floor[0] == pytest.approx(np.quantile([0.1, 0.12, 0.08, 0.02], 0.75))  # 0.105
    # class 5: the negatives are a's three cells, all at 0 -> floor 0; a class every image has gets none
    assert floor[5] == 0.0 and inherited[:, 8].sum() == 0 and np.isfinite(floor[8])
    every = np.ones_like(inherited)
    assert np.isinf(negative_floor(scores, every, 0.75)).all()
    attention, thresholds = np.ones_like(scores), np.zeros(C)
    # keeps >= 0.27 of a's class 0: the best cell
    relative = RefineConfig(relative=0.3, negative_quantile=None, uncertain="negative")
    targets, _ = pseudo_labels(scores, ids, inherited, attention, thresholds, relative)
    assert targets[:3, 0].tolist() == [1, 0, 0]
    # with the floor, the 0.2 cell outscores the negatives and is kept too; 0.05 is not; b and c never get 0
    either = RefineConfig(relative=0.3, negative_quantile=0.75, uncertain="negative")
    targets, _ = pseudo_labels(scores, ids, inherited, attention, thresholds, either)
    assert targets[:, 0].tolist() == [1, 1, 0, 0, 0, 0, 0]
    with pytest.raises(ValueError, match="negative_quantile"):
        RefineConfig(negative_quantile=1.5)


def test_label_quality_counts_localisation_classes_only():
    true = np.zeros((3, C))
    true[0, 1] = true[1, 2] = true[2, NEGATIVE] = 1
    predicted = np.zeros((3, C))
    predicted[0, 1] = predicted[0, 4] = predicted[1, NEGATIVE] = predicted[2, NEGATIVE] = 1
    quality = label_quality(predicted, true)
    assert quality["precision"] == pytest.approx(0.5) and quality["recall"] == pytest.approx(0.5)


def test_round_trains_on_pseudo_labels_of_models_that_never_saw_the_fold(tiny_run):
    from weakcell import refine as refine_stage

    cfg, _ = tiny_run
    cfg = cfg.model_copy(update={"refine": cfg.refine.model_copy(update={"rounds": 1, "epochs": 1})})
    (metrics,) = refine_stage.run(cfg)
    round_dir = cfg.round_dir(1)
    assert round_dir == cfg.model_dir and round_dir.name == "round1"
    pseudo = pd.read_parquet(round_dir / "pseudo_labels.parquet")
    folds = pd.read_csv(cfg.folds_file).set_index("ID")["fold"]
    oof_cell = pd.read_parquet(cfg.run_dir / "oof_cell.parquet")
    # each outer fold k's model gets a row for every training cell of the other folds, none of its own
    for k in range(3):
        rows = pseudo[pseudo["model_fold"] == k]
        assert not (folds[rows["image_id"]].to_numpy() == k).any()
        others = oof_cell[folds[oof_cell["image_id"]].to_numpy() != k]
        assert sorted(zip(rows["image_id"], rows["cell_id"])) == sorted(
            zip(others["image_id"], others["cell_id"])
        )
    # the models that labelled them held out the outer fold and the cell's own fold: one per pair of
    # folds, and each predicted exactly its two held-out folds' images
    inner = sorted(p.name for p in (cfg.run_dir / "inner").iterdir())
    assert inner == ["fold0-1", "fold0-2", "fold1-2"]
    for name in inner:
        held_out = {int(f) for f in name.removeprefix("fold").split("-")}
        predicted = pd.read_parquet(cfg.run_dir / "inner" / name / "oof_image.parquet")["image_id"]
        assert set(folds[predicted]) == held_out
        assert sorted(predicted) == sorted(folds.index[folds.isin(held_out)])
        # the default rule reads each cell's own probability alone: the inner models skip stage 2
        inner_cells = pd.read_parquet(cfg.run_dir / "inner" / name / "oof_cell.parquet")
        assert inner_cells["attention"].isna().all() and inner_cells["p_0"].notna().all()
    # a pseudo-label never adds a class its image does not have (Negative aside)
    labels = pd.read_csv(cfg.data_dir / "train.csv").set_index("ID")["Label"]
    for row in pseudo.itertuples():
        kept = {c for c in range(C) if getattr(row, f"p_{c}") > 0.5} - {NEGATIVE}
        assert kept <= {int(v) for v in labels[row.image_id].split("|")}
    assert 0 <= metrics["pseudo_precision"] <= 1 and metrics["cells_trainable"] == pseudo["trainable"].sum()
    oof_image = pd.read_parquet(round_dir / "oof_image.parquet")
    assert sorted(oof_image["image_id"]) == sorted(labels.index)
    assert json.loads((round_dir / "metrics.json").read_text())["round"] == 1
    # a second call reuses the finished round; another rule refuses to
    again = refine_stage.run(cfg)[0]
    assert again["round"] == 1
    # what the round cost: its outer folds plus the inner models, counted once however often it is read
    assert again["seconds"] == pytest.approx(metrics["outer_seconds"] + metrics["inner_seconds"])
    assert again["seconds"] == pytest.approx(metrics["seconds"]) and metrics["inner_seconds"] > 0
    changed = cfg.model_copy(update={"refine": cfg.refine.model_copy(update={"relative": 0.9})})
    with pytest.raises(ValueError, match=r"refine\.relative.*FORCE=1"):
        refine_stage.run(changed)
    # the stage-1 rule reads no confidence formula: another one reuses the round ...
    powered = cfg.model_copy(update={"infer": cfg.infer.model_copy(update={"image_power": 3.0})})
    assert refine_stage.run(powered)[0]["seconds"] == pytest.approx(metrics["seconds"])
    # ... while a round whose rule scores cells by the submitted confidence was made from it (its record
    # written here as that round's would be: training one costs stage 2 in every inner model)
    made = read_lineage(round_dir)
    confident = cfg.model_copy(update={"refine": cfg.refine.model_copy(update={"score": "confidence"})})
    as_trained = Lineage.of(
        "refine", refine_stage.round_config(confident, 1), previous=made.upstream["previous"]
    )
    write_lineage(round_dir, as_trained)
    powered = confident.model_copy(update={"infer": cfg.infer.model_copy(update={"image_power": 3.0})})
    with pytest.raises(ValueError, match=r"infer\.image_power: 0\.0 -> 3\.0.*FORCE=1"):
        refine_stage.run(powered)
    write_lineage(round_dir, made)
    # a rule that reads MIL attention has the inner models trained with stage 2 (on a linked copy of
    # round 0, so that the shared tiny run keeps its round)
    from weakcell.ablate import link_round_zero

    attending = cfg.model_copy(
        update={"name": "attending", "refine": cfg.refine.model_copy(update={"min_attention": 0.5})}
    )
    link_round_zero(cfg.run_dir, attending.run_dir)
    refine_stage.run(attending)
    inner_cells = pd.read_parquet(attending.run_dir / "inner" / "fold0-1" / "oof_cell.parquet")
    assert inner_cells["attention"].notna().all()


def test_relative_schedule_by_round():
    schedule = RefineConfig(relative=[0.3, 0.1])
    assert [schedule.for_round(r).relative for r in (1, 2, 3)] == [0.3, 0.1, 0.1]
    assert RefineConfig(relative=0.2).for_round(4).relative == 0.2
    for bad in ([], [0.3, 1.5], -0.1):
        with pytest.raises(ValueError, match=r"refine\.relative"):
            RefineConfig(relative=bad)
