"""The 2018 competition end to end: 28 classes without Negative, the Id,Target / Id,Predicted layout,
the synthetic2018 benchmark, and the real sample submission of ../shared/data/hpa2018."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pandas as pd
import pytest

from tests.conftest import REPO, TINY, shared_path
from weakcell.config import SyntheticConfig, load_config
from weakcell.constants import HPA2018_CLASS_COUNTS, HPA2018_CLASSES, HPA2018_N_IMAGES, prob_columns
from weakcell.data.datasets import get_dataset
from weakcell.data.labels import read_label_file
from weakcell.refine import label_quality, pseudo_labels
from weakcell.submission import SubmissionError, validate_image_level, write_image_level
from weakcell.synthetic.classes import class_table
from weakcell.synthetic.generate import class_probabilities, draw_image_classes, generate_image, image_seed
from weakcell.synthetic.geometry import CELL_LINES, layout_cells
from weakcell.synthetic.patterns import CellView
from weakcell.synthetic.render import er_stain, microtubule_stain, reticulum_field

TABLE = class_table("synthetic2018")
C = len(HPA2018_CLASSES)


# -- the class table ------------------------------------------------------------------------------------


def test_class_counts_are_the_real_2018_frequencies():
    labels = read_label_file(shared_path("hpa2018", "train.csv"), get_dataset("hpa2018"))
    counts = np.bincount([c for row in labels["labels"] for c in row], minlength=C)
    assert tuple(counts) == HPA2018_CLASS_COUNTS and len(labels) == HPA2018_N_IMAGES


def test_table_has_28_named_patterns_and_no_negative():
    assert TABLE.negative is None and TABLE.n_classes == 28
    assert sorted(TABLE.patterns) == list(range(28))
    assert [TABLE.patterns[c].name for c in range(28)] == list(HPA2018_CLASSES)
    # by hand: 12885 of the 50782 labels of the 2018 train.csv are Nucleoplasm, 11 Rods & rings
    p = class_probabilities(0.0, TABLE)
    assert sum(HPA2018_CLASS_COUNTS) == 50782
    assert p[0] == pytest.approx(12885 / 50782) and p[27] == pytest.approx(11 / 50782)


def test_every_drawn_image_has_classes_and_no_negative():
    rng = np.random.default_rng(0)
    cfg = SyntheticConfig(labels_per_image_mean=1.63)
    drawn = [draw_image_classes(rng, cfg, TABLE) for _ in range(3000)]
    assert all(1 <= len(classes) <= 6 and all(0 <= c < 28 for c in classes) for classes in drawn)
    share = np.mean([0 in classes for classes in drawn])
    assert 0.3 < share < 0.6  # Nucleoplasm is on ~41% of the real 2018 images


def _views() -> dict[str, CellView]:
    """An interphase cell touching its neighbour, a mitotic cell, with their stains (a dense CACO-2 field)."""
    rng = np.random.default_rng(5)
    mitotic = np.array([False, False, True, False, False, False])
    layout = layout_cells(rng, 200, CELL_LINES["CACO-2"], 6, 0.12, mitotic)
    reticulum = reticulum_field(rng, (200, 200), 3.0)
    views = {}
    for cell in layout.cells:
        box = layout.cell_mask[cell.slices]
        others = (box != 0) & (box != cell.cell_id)
        view = CellView(
            cell,
            microtubule_stain(rng, cell, 0.12),
            er_stain(cell, reticulum[cell.slices], 0.12),
            0.12,
            others,
        )
        key = "mitotic" if cell.mitotic else "interphase"
        if key not in views and (cell.mitotic or others.any()):
            views[key] = view
    return views


@pytest.fixture(scope="module")
def rendered() -> dict[int, np.ndarray]:
    views = _views()
    return {
        c: pattern(views["mitotic" if pattern.mitotic_only else "interphase"], np.random.default_rng(c))
        for c, pattern in TABLE.patterns.items()
    }


@pytest.mark.parametrize("cls", range(28))
def test_every_2018_pattern_lights_its_cell(rendered, cls):
    assert np.isfinite(rendered[cls]).all() and rendered[cls].max() > 0.1, HPA2018_CLASSES[cls]


def test_2018_patterns_differ_from_each_other(rendered):
    interphase = [c for c, p in TABLE.patterns.items() if not p.mitotic_only]
    for a, b in itertools.combinations(interphase, 2):
        correlation = np.corrcoef(rendered[a].ravel(), rendered[b].ravel())[0, 1]
        assert correlation < 0.95, (
            f"{HPA2018_CLASSES[a]} and {HPA2018_CLASSES[b]} look alike ({correlation:.2f})"
        )


def test_cell_junctions_only_where_cells_touch():
    view = _views()["interphase"]
    lonely = CellView(view.cell, view.red, view.yellow, view.scale, np.zeros_like(view.cell.mask))
    junction = TABLE.patterns[22]
    assert junction(lonely, np.random.default_rng(0)).max() == 0
    lit = junction(view, np.random.default_rng(0)) > 0.2
    assert lit.any() and not junction.allowed(False, touching=False)
    # lit pixels lie at most a few px from another cell
    import cv2

    near = cv2.dilate(view.neighbours.astype(np.uint8), np.ones((3, 3), np.uint8), iterations=6) > 0
    assert near[lit].all()


def test_no_class_cells_have_empty_labels_and_images_never_do():
    cfg = SyntheticConfig(image_size=128, cell_scale=0.08, workers=1)
    for index in range(12):
        sample = generate_image(cfg, image_seed(1, "train", index), table=TABLE)
        assert sample.image_labels  # the 2018 set has no unlabelled image
        own = sorted({c for labels in sample.cell_labels.values() for c in labels})
        assert sample.image_labels == own
        assert all(0 <= c < 28 for c in own)
    bridge = generate_image(cfg, image_seed(1, "train", 0), classes=[16], table=TABLE)
    expressing = [c for c, labels in bridge.cell_labels.items() if 16 in labels]
    assert expressing and all(bridge.mitotic[c] for c in expressing)


# -- refinement without Negative --------------------------------------------------------------------------


def test_cell_keeping_no_class_gets_all_zero_target_without_negative():
    from weakcell.config import RefineConfig

    # one image labelled {3, 20}; cell 0 is the best for both, cell 1 far below: it keeps nothing
    scores = np.zeros((2, C))
    scores[:, 3] = [0.9, 0.05]
    scores[:, 20] = [0.8, 0.01]
    inherited = np.zeros((2, C))
    inherited[:, [3, 20]] = 1
    ids = np.array(["a", "a"])
    rule = RefineConfig(relative=0.5, threshold_scale=0.0, negative_quantile=None, uncertain="negative")
    targets, trainable = pseudo_labels(scores, ids, inherited, np.ones((2, C)), np.full(C, 0.5), rule, None)
    assert np.flatnonzero(targets[0]).tolist() == [3, 20]
    assert targets[1].sum() == 0 and trainable.tolist() == [True, True]  # all zero, still learned from
    # with the 2021 table the same cell would learn Negative (18): here class 18 is MTOC, untouched
    assert targets[:, 18].sum() == 0
    # the default (uncertain=ignore) leaves its two missed labels out of the loss; every other class is 0
    ignored, _ = pseudo_labels(
        scores,
        ids,
        inherited,
        np.ones((2, C)),
        np.full(C, 0.5),
        rule.model_copy(update={"uncertain": "ignore"}),
        None,
    )
    assert np.flatnonzero(np.isnan(ignored[1])).tolist() == [3, 20]
    assert np.nansum(ignored[1]) == 0 and ignored[0].tolist() == targets[0].tolist()


def test_label_quality_counts_every_2018_class():
    predicted = np.zeros((2, C))
    true = np.zeros((2, C))
    predicted[0, 27] = true[0, 27] = 1  # Rods & rings: a finding, not a Negative column
    predicted[1, 18] = 1  # wrong MTOC call
    assert label_quality(predicted, true, None) == {"precision": 0.5, "recall": 1.0}


# -- files --------------------------------------------------------------------------------------------------


def test_real_sample_submission_validates_and_a_written_file_matches_it(tmp_path):
    sample_path = shared_path("hpa2018", "sample_submission.csv")
    stats = validate_image_level(sample_path, n_classes=28)
    assert stats["rows"] == 11702
    sample = pd.read_csv(sample_path, dtype=str)
    # a dummy model: class c's probability rises with the row, so rows differ in what they predict
    rng = np.random.default_rng(0)
    probs = pd.DataFrame(rng.random((len(sample), C)), columns=prob_columns(C))
    probs = probs.assign(image_id=sample["Id"].to_numpy()).iloc[::-1]  # predicted in another order
    out = write_image_level(probs, np.full(C, 0.9), tmp_path / "image_level.csv", sample_submission=sample)
    stats = validate_image_level(out, sample_path, n_classes=28)
    written = pd.read_csv(out, dtype=str, keep_default_na=False)
    assert written["Id"].tolist() == sample["Id"].tolist() and stats["rows"] == 11702
    assert written.columns.tolist() == ["Id", "Predicted"] and stats["labels"] > 0
    with pytest.raises(SubmissionError):  # class 28 does not exist in 2018
        validate_image_level(written.assign(Predicted="28"), sample_path, n_classes=28)


def test_submit_dry_run_against_real_sample(tmp_path, capsys):
    from weakcell.cli import main
    from weakcell.submission import publish

    sample_path = shared_path("hpa2018", "sample_submission.csv")
    sample = pd.read_csv(sample_path, dtype=str)
    target = tmp_path / "data" / "hpa2018" / "sample_submission.csv"
    target.parent.mkdir(parents=True)
    sample.to_csv(target, index=False)  # a temporary copy where `make download` puts it
    probs = pd.DataFrame(np.full((len(sample), C), 0.6), columns=prob_columns(C)).assign(
        image_id=sample["Id"]
    )
    staged = write_image_level(probs, np.full(C, 0.5), tmp_path / "staged.csv", sample_submission=sample)
    (tmp_path / "submissions" / "run1").mkdir(parents=True)
    publish(tmp_path / "submissions" / "run1", {"image_level.csv": staged})  # as `make infer` publishes it
    args = [f"paths.root={tmp_path}", "name=run1", "kaggle.competition=hpa2018", "kaggle.dry_run=true"]
    assert main(["submit", *args]) == 0
    out = capsys.readouterr().out
    assert "11702 rows" in out and "human-protein-atlas-image-classification" in out


# -- the tiny demo ------------------------------------------------------------------------------------------


def test_tiny_2018_demo_end_to_end(tmp_path):
    """data -> folds -> cache -> train -> refine -> thresholds -> infer -> evaluate on a tiny synthetic2018 set."""
    from weakcell import evaluate as evaluate_stage
    from weakcell import folds as folds_stage
    from weakcell import infer as infer_stage
    from weakcell import refine as refine_stage
    from weakcell import thresholds as thresholds_stage
    from weakcell import train as train_stage
    from weakcell.cache import build as cache_stage
    from weakcell.synthetic import writer as data_stage

    overrides = [f"paths.root={tmp_path}", *TINY, "synthetic.n_train=12", "refine.rounds=1"]
    cfg = load_config(REPO / "configs" / "hpa2018-demo.yaml", overrides)
    data_stage.run(cfg)
    assert (cfg.data_dir / "train.csv").read_text().startswith("Id,Target\n")
    sample = pd.read_csv(cfg.data_dir / "sample_submission.csv", dtype=str)
    assert sample.columns.tolist() == ["Id", "Predicted"]
    folds_stage.run(cfg)
    cache_stage.run(cfg)
    train_stage.run(cfg)
    refine_stage.run(cfg)
    pseudo = pd.read_parquet(cfg.round_dir(1) / "pseudo_labels.parquet")
    assert len(prob_columns(C)) == C and set(prob_columns(C)) <= set(pseudo.columns)
    thresholds_stage.run(cfg)
    out = infer_stage.run(cfg)
    image_level = pd.read_csv(out / "image_level.csv", dtype=str, keep_default_na=False)
    assert image_level["Id"].tolist() == sample["Id"].tolist()
    validate_image_level(out / "image_level.csv", cfg.data_dir / "sample_submission.csv", n_classes=C)
    assert (out / "cell_level.csv").is_file()
    evaluation = evaluate_stage.run(cfg)
    oof, test = evaluation["image_oof"], evaluation["image_test"]
    for key in ("macro_f1_at_05", "macro_f1_tuned", "macro_f1_tuned_cross_fitted"):
        assert oof[key] is None or 0.0 <= oof[key] <= 1.0
    assert 0.0 <= test["macro_f1_at_05"] <= 1.0
    assert 0.0 <= evaluation["cell_test"]["submission"]["map"] <= 1.0
    assert len(json.loads((cfg.model_dir / "evaluation.json").read_text())["per_class"]) == C

    # the ablation grid on the same run: every row scored with 28 classes and no Negative
    from weakcell import ablate

    grid = cfg.model_copy(
        update={
            "ablate": cfg.ablate.model_copy(update={"rounds": 1}),
            "refine": cfg.refine.model_copy(update={"epochs": 1}),
        }
    )
    table = ablate.run(grid)
    assert set(table["variant"]) == {row.label for row in ablate.rows(1)}
    assert table[["cell_map", "test_cell_map"]].notna().all().all()
    assert ((table["test_cell_map"] >= 0) & (table["test_cell_map"] <= 1)).all()
    oracle = pd.read_parquet(next(cfg.path(cfg.paths.runs).glob(f"{cfg.name}-oracle*")) / "oof_cell.parquet")
    assert set(prob_columns(C)) <= set(oracle.columns) and f"p_{C}" not in oracle.columns


# -- the claim's benchmark ---------------------------------------------------------------------------------


def _bench_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_hpa2018", REPO / "benchmarks" / "bench_hpa2018.py")
    assert spec and spec.loader
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_claim_verdict_pairs_gains_by_seed():
    """Gains by hand. OOF: seed 42 tuning +0.10 vs focal +0.05, seed 43 tuning +0.02 vs focal +0.05; the
    paired margins +0.05 and -0.03 have mean +0.01 and sd 0.0566: a tie, tuning ahead at 1 of 2 seeds.
    Test: tuning +0.05 vs focal +0.03 at both seeds: margin +0.02 ± 0, the claim holds at 2 of 2; with
    the two variants' test gains swapped it does not hold."""
    bench = _bench_module()

    def table(test_tuned: float, focal_test: float) -> pd.DataFrame:
        rows = []
        for seed, tuned_oof in ((42, 0.20), (43, 0.12)):
            rows.append(
                dict(
                    variant="baseline",
                    seed=seed,
                    oof_f1_at_05=0.10,
                    oof_f1_tuned_cross_fitted=tuned_oof,
                    test_f1_at_05=0.30,
                    test_f1_tuned=test_tuned,
                )
            )
            rows.append(
                dict(
                    variant="focal",
                    seed=seed,
                    oof_f1_at_05=0.15,
                    oof_f1_tuned_cross_fitted=0.0,
                    test_f1_at_05=focal_test,
                    test_f1_tuned=0.0,
                )
            )
        return pd.DataFrame(rows)

    oof_line, test_line = bench.verdict(table(0.35, 0.33)).splitlines()
    assert "gains +0.060 ± 0.057" in oof_line and "focal, +0.050 ± 0.000" in oof_line
    assert "Margin, paired by seed: +0.010 ± 0.057; tuning gains more at 1 of 2 seeds" in oof_line
    assert oof_line.endswith("The claim is a tie (the margin is within its seeds' sd).")
    assert "gains +0.050" in test_line and "focal, +0.030" in test_line
    assert test_line.endswith("+0.020 ± 0.000; tuning gains more at 2 of 2 seeds. The claim holds.")
    _, swapped = bench.verdict(table(0.33, 0.35)).splitlines()
    assert swapped.endswith("-0.020 ± 0.000; tuning gains more at 0 of 2 seeds. The claim does not hold.")


def test_claim_variants_train_round_0_under_their_own_names():
    bench = _bench_module()
    config = str(REPO / "configs" / "hpa2018-bench.yaml")
    base = bench.variant_config(config, [], "baseline", [], 42)
    assert (base.name, base.infer.output, base.refine.rounds) == (
        "hpa2018-bench",
        "hpa2018-bench-baseline",
        0,
    )
    focal = bench.variant_config(config, [], "focal", bench.variants("efficientnet_lite0")["focal"], 43)
    assert (focal.name, focal.seed, focal.train.loss) == ("hpa2018-bench-seed43-focal", 43, "focal")
    assert (focal.data_dir, focal.folds.file) == (base.data_dir, base.folds.file)
    # the whole-image model alone: at the stage-1 epochs, its image level cut from its own probabilities
    grid = bench.variants("efficientnet_lite0", epochs=base.train.epochs, whole_image_same_time_epochs=5)
    whole = bench.variant_config(config, [], "whole_image", grid["whole_image"], 42)
    same_time = bench.variant_config(config, [], "whole_image_same_time", grid["whole_image_same_time"], 42)
    assert whole.image_model.enabled and whole.infer.image_level == "image_model"
    assert (whole.image_model.epochs, same_time.image_model.epochs) == (base.train.epochs, 5)
    assert (
        whole.image_model_dir == whole.run_dir / "image_model" and whole.name == "hpa2018-bench-whole_image"
    )


def test_claim_report_holds_the_tables(tmp_path):
    bench = _bench_module()
    row = dict(oof_f1_at_05=0.1, oof_f1_tuned_cross_fitted=0.2, test_f1_at_05=0.1, test_f1_tuned=0.2)
    row.update(oof_map=0.3, test_map=0.3, oof_classes=20, test_classes=25, train_seconds=100)
    table = pd.DataFrame(
        [
            {"variant": "baseline", "seed": 42, **row},
            {"variant": "focal", "seed": 42, **row, "oof_f1_at_05": 0.25},
        ]
    )
    cells = [{"run": "oracle", "test cell mAP": 0.7291, "OOF cell mAP": 0.75}]
    out = tmp_path / "hpa2018.md"
    cfg = load_config(REPO / "configs" / "hpa2018-bench.yaml", [])
    bench.write_report(table, cfg, "cmd", out, 1.0, "SEGMENTATION", cells)
    text = out.read_text()
    assert "| oracle | 0.729 | 0.750 |" in text and "SEGMENTATION" in text
    assert "| focal | 0.250 | 0.200 |" in text and "| focal (seed 42) | 0.250 |" in text
    assert "focal, +0.150" in text  # 0.25 - 0.10 at 0.5 beats tuning's 0.2 - 0.1
