"""The training stage end to end on a tiny synthetic set: data -> folds -> cache -> train, checking the
contracts later stages rely on (OOF tables keyed by ID, every image out of fold once, cells of one image in
one fold, scores computed against the per-cell truth)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from tests.conftest import TINY  # noqa: F401  (re-exported: other test modules import it from here)
from weakcell import train as train_stage
from weakcell.cell_truth import ASSIGN_IOU, CellTruth, ImageTruth
from weakcell.competition_metric import TrueCells, label_iou
from weakcell.labelled_crops import balanced_sample_weights, class_pos_weight
from weakcell.training_set import load_training_set


def test_oof_covers_every_image_once(tiny_run):
    cfg, metrics = tiny_run
    run_dir = cfg.path(cfg.paths.runs) / cfg.name
    oof_image = pd.read_parquet(run_dir / "oof_image.parquet")
    oof_cell = pd.read_parquet(run_dir / "oof_cell.parquet")
    train_ids = pd.read_csv(cfg.data_dir / "train.csv")["ID"]
    assert sorted(oof_image["image_id"]) == sorted(train_ids)
    folds = pd.read_csv(cfg.folds_file).set_index("ID")["fold"]
    # each image's prediction comes from the fold that held it out, and its cells carry the same fold
    assert (oof_image["fold"].to_numpy() == folds.loc[oof_image["image_id"]].to_numpy()).all()
    assert (oof_cell.groupby("image_id")["fold"].nunique() == 1).all()
    assert not oof_cell.duplicated(["image_id", "cell_id"]).any()
    probs = oof_image.filter(like="p_").to_numpy()
    assert probs.shape[1] == 19 and np.isfinite(probs).all() and ((probs >= 0) & (probs <= 1)).all()
    # attention x n cells averages to 1 over an image's cells, for every class
    att = oof_cell.groupby("image_id")[[f"att_{c}" for c in range(19)]].mean()
    np.testing.assert_allclose(att.to_numpy(), 1.0, atol=1e-4)
    embedded = np.load(run_dir / "fold0" / "oof_embeddings.npz")
    fold0 = oof_cell[oof_cell["fold"] == 0]
    assert set(zip(embedded["image_id"], embedded["cell_id"])) == set(
        zip(fold0["image_id"], fold0["cell_id"])
    )
    assert embedded["embeddings"].shape[0] == len(fold0) and np.isfinite(embedded["embeddings"]).all()
    maps = sorted((run_dir / "attention").glob("*.png"))
    assert maps and {p.stem for p in maps} <= set(train_ids)
    written = json.loads((run_dir / "metrics.json").read_text())
    assert written["images"] == len(train_ids)
    assert 0 <= written["cell_map_stage1"] <= 1 and 0 <= written["image_map"] <= 1
    assert metrics["folds"] == 3


def test_rerun_skips_finished_folds(tiny_run, capsys):
    cfg, metrics = tiny_run
    again = train_stage.run(cfg)
    assert "skipping" in capsys.readouterr().out
    assert again["cell_map_stage1"] == pytest.approx(metrics["cell_map_stage1"])


def test_oracle_targets_come_from_truth(tiny_run):
    cfg, _ = tiny_run
    oracle = cfg.model_copy(update={"train": cfg.train.model_copy(update={"targets": "truth"})})
    data = load_training_set(oracle)
    weak = load_training_set(cfg)
    rows = data.cells.index
    # inherited targets are a superset of the truth for matched cells, and differ somewhere
    assert (data.cell_targets[rows] <= weak.cell_targets[rows] + (np.arange(19) == 18)).all()
    assert not np.array_equal(data.cell_targets[rows], weak.cell_targets[rows])


def test_oracle_assignment_is_iou_above_one_half():
    # true cells 1 (rows 0-4 x cols 0-4, class 0), 2 (rows 5-9 x cols 5-9, class 1), 3 (rows 0-4 x cols
    # 6-9, 20 px, class 2)
    true = np.zeros((10, 10), np.int32)
    true[:5, :5], true[5:, 5:], true[:5, 6:] = 1, 2, 3
    pred = np.zeros_like(true)
    pred[:5, :4] = 7  # 20 px inside true cell 1 (25 px): IoU 0.8
    pred[5:, 5:7] = 9  # 10 px inside true cell 2 (25 px): IoU 0.4, no true cell
    pred[:5, 5:] = 4  # 25 px: true cell 3's 20 px + 5 px of nothing: IoU 0.8
    pred[9, 0] = 5  # a pixel of background: no true cell
    ids_pred, ids_true, iou = label_iou(pred, true)
    assert ids_pred.tolist() == [4, 5, 7, 9] and ids_true.tolist() == [1, 2, 3]
    assert iou[2, 0] == pytest.approx(0.8) and iou[3, 1] == pytest.approx(0.4)
    assert iou[0, 2] == pytest.approx(0.8) and iou[1].tolist() == [0, 0, 0]
    classes = np.eye(3, dtype=bool)
    truth = CellTruth(
        {"x": ImageTruth(TrueCells(None, ids_true, classes), ids_pred, iou, fold=0)}, n_classes=3
    )
    cells = pd.DataFrame({"image_id": ["x", "x", "x", "x", "y"], "cell_id": [7, 9, 4, 5, 1]})
    assigned, found = truth.assigned(cells)
    assert found.tolist() == [True, False, True, False, False]  # image y has no truth
    assert assigned[[0, 2]].tolist() == [[True, False, False], [False, False, True]]
    assert not assigned[[1, 3, 4]].any()
    # IoU exactly 0.5 is not above one half: two disjoint true cells can both reach it with one cell
    half = np.zeros((2, 4), np.int32)
    half[:, :2], half[:, 2:] = 1, 2
    cell_ids, true_ids, iou = label_iou(np.ones_like(half), half)
    assert iou.tolist() == [[0.5, 0.5]] and ASSIGN_IOU == 0.5
    edge = CellTruth({"x": ImageTruth(TrueCells(None, true_ids, classes[:2, :2]), cell_ids, iou, 0)}, 2)
    assert not edge.assigned(pd.DataFrame({"image_id": ["x"], "cell_id": [1]}))[1].any()


def test_rare_classes_weigh_more():
    targets = np.zeros((100, 3), np.float32)
    targets[:90, 0] = 1  # common
    targets[90:, 1] = 1  # rare
    pos_weight = class_pos_weight(targets)
    assert pos_weight[2] >= pos_weight[1] > pos_weight[0] >= 1.0  # rarer (or absent) weighs more
    weights = balanced_sample_weights(targets)
    assert weights[95] > weights[0]
    # drawn in proportion: the rare tenth of the cells gets about half of the draws
    from weakcell.batches import epoch_order

    order = epoch_order(100, 10, seed=0, epoch=0, weights=weights)
    assert np.array_equal(order, epoch_order(100, 10, seed=0, epoch=0, weights=weights))
    assert 0.3 < (order >= 90).mean() < 0.7


def test_pairs_left_out_of_the_loss_count_as_neither_positive_nor_negative():
    """refine.uncertain=ignore leaves NaN targets; class weights and the sampler read the known pairs only."""
    targets = np.zeros((10, 2), np.float32)
    targets[:2, 0] = 1  # class 0: 2 positives
    targets[2:6, 0] = np.nan  # 4 pairs left out: 4 known negatives remain
    targets[0, 1] = 1  # class 1: 1 positive, 9 negatives, nothing left out
    # sqrt(negatives / positives): class 0 sqrt(4 / 2), class 1 sqrt(9 / 1) = 3
    assert class_pos_weight(targets) == pytest.approx([np.sqrt(2.0), 3.0])
    # frequencies over known pairs: class 0 2 / 6, class 1 1 / 10; a cell weighs its rarest positive class
    weights = balanced_sample_weights(targets)
    assert weights[0] == pytest.approx(np.sqrt(10.0))  # classes 0 and 1: the rarer, 1
    assert weights[1] == pytest.approx(np.sqrt(3.0))  # class 0 alone
    assert weights[2:].tolist() == [1.0] * 8  # no positive (or left out): 1


def test_changed_settings_do_not_reuse_finished_folds(tiny_run):
    cfg, _ = tiny_run
    changed = cfg.model_copy(update={"train": cfg.train.model_copy(update={"lr": cfg.train.lr * 2})})
    with pytest.raises(ValueError, match=r"train\.lr.*FORCE=1"):
        train_stage.run(changed)
    # where it runs is not what it computes, nor are later stages' settings: the folds are reused
    moved = cfg.model_copy(
        update={
            "train": cfg.train.model_copy(update={"workers": 0, "device": "cpu"}),
            "infer": cfg.infer.model_copy(update={"image_power": 2.0}),
        }
    )
    assert train_stage.run(moved)["folds"] == 3


def test_infer_writes_valid_submissions(tiny_run):
    from weakcell import infer as infer_stage
    from weakcell import thresholds as thresholds_stage
    from weakcell.rle import decode_mask
    from weakcell.submission import validate_cell_level, validate_image_level

    cfg, _ = tiny_run
    thresholds_stage.run(cfg)
    out_dir = infer_stage.run(cfg)
    sample = pd.read_csv(cfg.data_dir / "sample_submission.csv")
    cell_level = pd.read_csv(out_dir / "cell_level.csv")
    assert cell_level["ID"].tolist() == sample["ID"].tolist()
    assert validate_cell_level(out_dir / "cell_level.csv", sample)["rows"] == len(sample)
    validate_image_level(out_dir / "image_level.csv")
    # the masks in the file are the cache's cells at the original size
    from weakcell.cache.store import CellCache

    cache = CellCache(cfg.cache_dir)
    row = cell_level.iloc[0]
    triples = row["PredictionString"].split()
    mask = decode_mask(triples[2], row["ImageHeight"], row["ImageWidth"])
    cells = cache.masks(row["ID"]).cells
    assert mask.shape == cells.shape and len(np.unique(cells[mask])) == 1 and cells[mask][0] > 0
    # confidences are cell probability x image probability: never above either
    pred_cell = pd.read_parquet(out_dir / "pred_cell.parquet")
    assert ((pred_cell["p_0"] * pred_cell["image_0"]) <= pred_cell["p_0"] + 1e-12).all()


def test_every_mil_mode_has_a_stage2_contract():
    """Training and inference read stage 2 from one registry: a mode the config accepts must be in it."""
    import typing

    from weakcell.config import MilConfig
    from weakcell.stage2 import STAGE2

    assert set(STAGE2) == set(typing.get_args(MilConfig.model_fields["mode"].annotation))


def test_end_to_end_mode_trains_and_infers_a_valid_submission(tiny_run):
    """mil.mode=end_to_end trains the dual-head model per fold; inference rebuilds that model (not the
    frozen MIL head) from the run's weights and writes validated submissions."""
    from weakcell import infer as infer_stage
    from weakcell import thresholds as thresholds_stage
    from weakcell.submission import validate_cell_level, validate_image_level

    cfg, _ = tiny_run
    e2e = cfg.model_copy(
        update={"name": "end-to-end", "mil": cfg.mil.model_copy(update={"mode": "end_to_end", "epochs": 1})}
    )
    train_stage.run(e2e)
    thresholds_stage.run(e2e)
    out_dir = infer_stage.run(e2e)
    sample = pd.read_csv(cfg.data_dir / "sample_submission.csv")
    assert validate_cell_level(out_dir / "cell_level.csv", sample)["rows"] == len(sample)
    validate_image_level(out_dir / "image_level.csv")
    images = pd.read_parquet(out_dir / "pred_image.parquet")
    assert sorted(images["image_id"]) == sorted(sample["ID"])
    probs = images[[f"p_{c}" for c in range(19)]].to_numpy()
    assert ((probs > 0) & (probs < 1)).all()  # sigmoids of the dual head's logits, not placeholders
    # the networks are built as the run trained them: a frozen-mode config refuses, naming the setting
    with pytest.raises(ValueError, match=r"mil\.mode"):
        infer_stage.run(e2e.model_copy(update={"mil": e2e.mil.model_copy(update={"mode": "frozen"})}))


def test_blend_refuses_different_keys():
    from weakcell.infer import blend

    a = pd.DataFrame({"image_id": ["x", "y"], "p_0": [0.2, 0.4]})
    b = pd.DataFrame({"image_id": ["y", "x"], "p_0": [0.6, 0.8]})
    blended = blend([a, b], ["image_id"]).set_index("image_id")["p_0"]
    assert blended["x"] == pytest.approx(0.5) and blended["y"] == pytest.approx(0.5)
    weighted = blend([a, b], ["image_id"], weights=[3.0, 1.0]).set_index("image_id")["p_0"]
    assert weighted["x"] == pytest.approx(0.75 * 0.2 + 0.25 * 0.8) and weighted["y"] == pytest.approx(0.45)
    with pytest.raises(AssertionError, match="different"):
        blend([a, b.iloc[:1]], ["image_id"])


def test_infer_other_split_folds_and_models(tiny_run):
    """A submission for the cached training images (no sample submission), from one fold of a run named
    by ``infer.models``, into ``infer.output``; network settings that differ from the run's refuse."""
    from weakcell import infer as infer_stage
    from weakcell import thresholds as thresholds_stage
    from weakcell.submission import validate_cell_level

    cfg, _ = tiny_run
    thresholds_stage.run(cfg)
    other = cfg.model_copy(
        update={
            "name": "another-name",
            "infer": cfg.infer.model_copy(
                update={"split": "train", "models": cfg.name, "folds": [0], "output": "train-split"}
            ),
        }
    )
    out_dir = infer_stage.run(other)
    assert out_dir.name == "train-split"
    written = pd.read_csv(out_dir / "cell_level.csv")
    assert sorted(written["ID"]) == sorted(pd.read_csv(cfg.data_dir / "train.csv")["ID"])
    sizes = written[["ImageWidth", "ImageHeight"]].drop_duplicates().to_numpy().tolist()
    assert sizes == [[256, 256]]
    validate_cell_level(out_dir / "cell_level.csv", written[["ID", "ImageWidth", "ImageHeight"]])
    # one fold: the probabilities are that fold's alone, not the blend of all
    blended = pd.read_parquet(
        infer_stage.run(
            other.model_copy(
                update={"infer": other.infer.model_copy(update={"folds": None, "output": "all"})}
            )
        )
        / "pred_image.parquet"
    )
    single = pd.read_parquet(out_dir / "pred_image.parquet")
    assert not np.allclose(blended.sort_values("image_id")["p_0"], single.sort_values("image_id")["p_0"])
    # runs blended with weights: the same run twice (as itself and as its round 0) changes nothing
    twice = other.model_copy(
        update={
            "infer": other.infer.model_copy(
                update={"blend": {cfg.name: 1.0, f"{cfg.name}/round0": 3.0}, "output": "blend"}
            )
        }
    )
    together = pd.read_parquet(infer_stage.run(twice) / "pred_image.parquet").sort_values("image_id")
    alone = single.sort_values("image_id")
    assert np.allclose(together[[f"p_{c}" for c in range(19)]], alone[[f"p_{c}" for c in range(19)]])
    with pytest.raises(ValueError, match="round<r>"):
        infer_stage.run(
            twice.model_copy(
                update={"infer": twice.infer.model_copy(update={"blend": {f"{cfg.name}/best": 1.0}})}
            )
        )
    wider = other.model_copy(update={"model": other.model.model_copy(update={"drop_rate": 0.5})})
    with pytest.raises(ValueError, match=r"model\.drop_rate"):
        infer_stage.run(wider)


def test_infer_reuses_an_unchanged_publication_and_names_its_final_files(tiny_run, tmp_path, capsys, caplog):
    """Issue 26: `make infer` with unchanged settings reran in full; it printed the staging path; the 2021
    image_level.csv carried the 2018 header Id,Predicted; infer refused when only model.pretrained_file
    differed from the run; infer.output=submissions/x wrote to submissions/submissions/x."""
    from weakcell import infer as infer_stage
    from weakcell import thresholds as thresholds_stage

    cfg, _ = tiny_run
    cfg = cfg.model_copy(update={"infer": cfg.infer.model_copy(update={"output": "submissions/again"})})
    thresholds_stage.run(cfg)
    capsys.readouterr()
    out_dir = infer_stage.run(cfg)
    assert out_dir == cfg.path("submissions") / "again"
    out = capsys.readouterr().out + caplog.text
    assert ".staging" not in out and f"{out_dir / 'cell_level.csv'} (the Kaggle file)" in out
    header = (out_dir / "image_level.csv").read_text().splitlines()[0]
    assert header == "ID,Label"  # the 2021 label-file layout: this competition scores only cells
    published = {name: (out_dir / name).stat().st_mtime_ns for name in infer_stage.OUTPUT_FILES}

    # same inputs: nothing is recomputed; an init weight that differs from the run's is no reason to refuse
    elsewhere = cfg.model_copy(update={"model": cfg.model.model_copy(update={"pretrained_file": "weights"})})
    assert infer_stage.run(elsewhere) == out_dir
    assert "is up to date" in capsys.readouterr().out
    assert {name: (out_dir / name).stat().st_mtime_ns for name in published} == published
    # new thresholds (or FORCE=1) redo it
    (cfg.model_dir / "thresholds.json").write_text((cfg.model_dir / "thresholds.json").read_text() + " ")
    infer_stage.run(cfg)
    assert "is up to date" not in capsys.readouterr().out
    infer_stage.run(cfg.model_copy(update={"force": True}))
    assert "is up to date" not in capsys.readouterr().out
