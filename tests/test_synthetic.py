"""The synthetic benchmark: determinism, truth consistency, the 19 patterns, the written layout."""

from __future__ import annotations

import itertools
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from weakcell.config import SyntheticConfig, load_config
from weakcell.constants import CHANNELS, HPA2021_CLASSES, NEGATIVE
from weakcell.data.images import read_image
from weakcell.data.labels import parse_labels
from weakcell.outputs import LOCK_FILE
from weakcell.synthetic import (
    PATTERNS,
    generate_image,
    image_seed,
    inheritance_errors,
    read_image_labels,
    read_truth,
)
from weakcell.synthetic.generate import draw_image_classes
from weakcell.synthetic.geometry import CELL_LINES, layout_cells
from weakcell.synthetic.patterns import CellView
from weakcell.synthetic.render import er_stain, microtubule_stain, reticulum_field
from weakcell.synthetic.writer import GENERATOR_VERSION, MARKER, is_complete, run

# 128² images with cells at a third of the default scale: a handful of cells, milliseconds per image.
TINY = {"image_size": 128, "cell_scale": 0.08, "workers": 1}
TINY_OVERRIDES = [f"synthetic.{key}={value}" for key, value in TINY.items()]


@pytest.fixture(scope="module")
def tiny() -> SyntheticConfig:
    return SyntheticConfig(**TINY)


def test_same_seed_same_bytes_other_seed_differs(tiny: SyntheticConfig) -> None:
    first, again = (generate_image(tiny, image_seed(7, "train", 3)) for _ in range(2))
    other = generate_image(tiny, image_seed(7, "train", 4))
    assert first.image.tobytes() == again.image.tobytes()
    assert first.cells.tobytes() == again.cells.tobytes()
    assert first.cell_labels == again.cell_labels and first.image_id == again.image_id
    assert first.image.tobytes() != other.image.tobytes()
    assert first.image_id != other.image_id
    assert (
        image_seed(7, "train", 3).generate_state(2).tolist()
        != image_seed(7, "test", 3).generate_state(2).tolist()
    )


@pytest.mark.parametrize("index", range(6))
def test_truth_is_consistent(index: int) -> None:
    # Flattened class frequencies and frequent mitosis reach rare classes and hard negatives.
    cfg = SyntheticConfig(**TINY, class_balance=1.0, mitotic_fraction=0.3)
    sample = generate_image(cfg, image_seed(11, "train", index))
    assert sample.image.shape == (len(CHANNELS), 128, 128) and sample.image.dtype == np.uint8
    assert sample.cells.dtype == np.uint16 and sample.nuclei.dtype == np.uint16
    ids = set(np.unique(sample.cells)) - {0}
    assert ids == set(sample.cell_labels) == set(sample.mitotic) and ids
    # Every nucleus pixel lies inside its own cell, and every cell has a nucleus.
    nucleus_pixels = sample.nuclei > 0
    assert np.array_equal(sample.cells[nucleus_pixels], sample.nuclei[nucleus_pixels])
    assert set(np.unique(sample.nuclei)) - {0} == ids
    union = sorted({c for labels in sample.cell_labels.values() for c in labels} - {NEGATIVE})
    assert sample.image_labels == (union or [NEGATIVE])
    for cell_id, labels in sample.cell_labels.items():
        assert labels == sorted(set(labels)) and labels
        assert NEGATIVE not in labels or labels == [NEGATIVE]
        assert (11 in labels) <= sample.mitotic[cell_id], "only mitotic cells show the spindle"
    # Cells with [18] express nothing: their green is only autofluorescence, dimmer than expressing cells.
    green = sample.image[1].astype(float)
    negative = [c for c, labels in sample.cell_labels.items() if labels == [NEGATIVE]]
    positive = [c for c, labels in sample.cell_labels.items() if labels != [NEGATIVE]]
    if negative and positive:
        dim = max(np.percentile(green[sample.cells == c], 99) for c in negative)
        bright = max(np.percentile(green[sample.cells == c], 99) for c in positive)
        assert bright > dim


def test_spindle_images_have_mitotic_expressing_cells(tiny: SyntheticConfig) -> None:
    sample = generate_image(tiny, image_seed(3, "train", 0), classes=[11])
    spindle = [c for c, labels in sample.cell_labels.items() if 11 in labels]
    assert spindle and all(sample.mitotic[c] for c in spindle)
    assert 11 in sample.image_labels


def _views() -> dict[bool, CellView]:
    """One interphase and one mitotic cell of a U-2 OS layout, with their reference stains."""
    rng = np.random.default_rng(5)
    layout = layout_cells(rng, 160, CELL_LINES["U-2 OS"], 2, 0.1, np.array([False, True]))
    reticulum = reticulum_field(rng, (160, 160), 3.0)
    views = {}
    for cell in layout.cells:
        red = microtubule_stain(rng, cell, 0.1)
        views[cell.mitotic] = CellView(cell, red, er_stain(cell, reticulum[cell.slices], 0.1), 0.1)
    return views


@pytest.fixture(scope="module")
def rendered() -> dict[int, np.ndarray]:
    """Each class rendered on a cell that can show it, masked to that cell."""
    views = _views()
    maps = {}
    for cls, pattern in PATTERNS.items():
        view = views[pattern.mitotic_only]
        maps[cls] = pattern(view, np.random.default_rng(cls))
    return maps


def test_registry_covers_every_class() -> None:
    assert sorted(PATTERNS) == list(range(len(HPA2021_CLASSES)))
    assert [PATTERNS[c].name for c in sorted(PATTERNS)] == list(HPA2021_CLASSES)


@pytest.mark.parametrize("cls", range(len(HPA2021_CLASSES)))
def test_every_pattern_lights_its_cell(rendered: dict[int, np.ndarray], cls: int) -> None:
    signal = rendered[cls]
    assert signal.dtype == np.float32 and np.isfinite(signal).all()
    assert signal.max() > 0.01
    if cls != NEGATIVE:  # a specific pattern is far above the autofluorescence every cell has
        assert signal.max() > 5 * rendered[NEGATIVE].max()


def test_patterns_differ_from_each_other(rendered: dict[int, np.ndarray]) -> None:
    interphase = [c for c in rendered if c not in (NEGATIVE, 11)]
    for a, b in itertools.combinations(interphase, 2):
        correlation = np.corrcoef(rendered[a].ravel(), rendered[b].ravel())[0, 1]
        assert correlation < 0.95, (
            f"{HPA2021_CLASSES[a]} and {HPA2021_CLASSES[b]} look alike ({correlation:.2f})"
        )


def test_spindle_only_in_mitosis() -> None:
    views = _views()
    assert PATTERNS[11](views[False], np.random.default_rng(0)).max() == 0
    assert not PATTERNS[11].allowed(False) and PATTERNS[11].allowed(True)
    assert not PATTERNS[2].allowed(True)


def test_writer_layout_skip_and_truth(tmp_path, capsys) -> None:
    overrides = [f"paths.root={tmp_path}", "synthetic.n_train=4", "synthetic.n_test=2", *TINY_OVERRIDES]
    cfg = load_config(None, [*overrides, "synthetic.workers=2"])
    root = run(cfg)
    assert root == tmp_path / "data" / "synthetic"
    train = pd.read_csv(root / "train.csv", dtype=str)
    test = pd.read_csv(root / "truth" / "test.csv", dtype=str)
    submission = pd.read_csv(root / "sample_submission.csv", dtype=str)
    assert list(train.columns) == ["ID", "Label"] and len(train) == 4 and len(test) == 2
    assert list(submission.columns) == ["ID", "ImageWidth", "ImageHeight", "PredictionString"]
    assert submission["ID"].tolist() == test["ID"].tolist()
    assert (submission["ImageWidth"] == "128").all() and submission["PredictionString"].str.startswith(
        "0 1 "
    ).all()
    for split, table in (("train", train), ("test", test)):
        for image_id in table["ID"]:
            assert read_image(root / split, image_id).shape == (4, 128, 128)
            for kind in ("cells", "nuclei"):  # masks keep 16 bits (read_channel would scale them to 8)
                mask = cv2.imread(str(root / "truth" / f"{image_id}_{kind}.png"), cv2.IMREAD_UNCHANGED)
                assert mask.dtype == np.uint16 and mask.shape == (128, 128)
    # A pool of workers makes exactly what one process makes from the same seed.
    first = generate_image(cfg.synthetic, image_seed(cfg.synthetic.seed, "train", 0))
    assert train["ID"][0] == first.image_id
    assert np.array_equal(read_image(root / "train", first.image_id), first.image)

    cells = read_truth(root)
    assert list(cells.columns[:7]) == [
        "image_id",
        "cell_id",
        "split",
        "Label",
        "cell_line",
        "mitotic",
        "area",
    ]
    images = read_image_labels(root)
    for image_id, group in cells.groupby("image_id"):
        own = {c for labels in group["labels"] for c in labels} - {NEGATIVE}
        image_labels = images.loc[images["ID"] == image_id, "labels"].iloc[0]
        assert image_labels == (sorted(own) or [NEGATIVE])
    assert train["Label"].map(lambda text: parse_labels(text, "|", 19)).map(len).min() >= 1
    # every image with its split, as the truth's image table (an image without cells has no cells.csv row)
    split_table = pd.read_csv(root / "truth" / "images.csv", dtype=str)
    assert split_table.values.tolist() == [
        *[[i, "train"] for i in train["ID"]],
        *[[i, "test"] for i in test["ID"]],
    ]

    def data_files() -> dict[Path, int]:  # the lock file records each run that holds it: not data
        return {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file() and p.name != LOCK_FILE}

    written = data_files()
    capsys.readouterr()
    run(load_config(None, overrides))  # same content settings, other worker count: trusted
    assert "skipping" in capsys.readouterr().out
    assert data_files() == written

    marker = (root / MARKER).read_text()
    (root / MARKER).write_text(marker.replace(f"version {GENERATOR_VERSION}", "version 0"))
    assert not is_complete(root, cfg.synthetic), "a set from another generator version is not trusted"
    (root / MARKER).unlink()  # an interrupted run is not trusted
    run(load_config(None, [*overrides, "synthetic.n_train=3"]))
    assert "skipping" not in capsys.readouterr().out
    assert len(pd.read_csv(root / "train.csv")) == 3 and len(list((root / "train").iterdir())) == 3 * 4


def test_writer_refuses_folders_that_are_not_synthetic(tmp_path) -> None:
    real = tmp_path / "real"
    (real / "train").mkdir(parents=True)
    (real / "train" / "kept.png").write_bytes(b"")
    with pytest.raises(ValueError, match="did not make"):
        run(load_config(None, [f"data.dir={real}", "synthetic.n_train=1", *TINY_OVERRIDES]))
    with pytest.raises(ValueError, match="synthetic set only"):
        run(load_config(None, [f"data.dir={real}", "data.dataset=hpa2021"]))
    assert (real / "train" / "kept.png").is_file()


def test_inheriting_image_labels_is_measurably_wrong(tiny: SyntheticConfig) -> None:
    samples = [generate_image(tiny, image_seed(2, "train", i)) for i in range(6)]
    cells = pd.DataFrame(
        [{"image_id": s.image_id, "labels": labels} for s in samples for labels in s.cell_labels.values()]
    )
    images = pd.DataFrame({"ID": [s.image_id for s in samples], "labels": [s.image_labels for s in samples]})
    errors = inheritance_errors(cells, images)
    assert 0 < errors["pair_error"] < 1 and 0 < errors["cell_error"] < 1
    # With every cell expressing every image class, inheritance is exact.
    everyone = SyntheticConfig(**TINY, expressing_fraction=(1.0, 1.0), mitotic_fraction=0.0)
    exact = [generate_image(everyone, image_seed(2, "train", i), classes=[0, 16]) for i in range(3)]
    cells = pd.DataFrame(
        [{"image_id": s.image_id, "labels": v} for s in exact for v in s.cell_labels.values()]
    )
    images = pd.DataFrame({"ID": [s.image_id for s in exact], "labels": [s.image_labels for s in exact]})
    assert inheritance_errors(cells, images)["pair_error"] == 0


@pytest.mark.slow
def test_preview_writes_png(tmp_path) -> None:
    from weakcell.synthetic import preview

    target = preview.run(load_config(None, [f"paths.root={tmp_path}", *TINY_OVERRIDES]))
    assert target == tmp_path / "reports" / "preview_synthetic.png"
    assert cv2.imread(str(target)).shape[2] == 3


def test_image_classes_follow_hpa2021_frequencies() -> None:
    rng = np.random.default_rng(0)
    real = [draw_image_classes(rng, SyntheticConfig()) for _ in range(3000)]
    flat = [draw_image_classes(rng, SyntheticConfig(class_balance=1.0)) for _ in range(3000)]
    counts = np.bincount([c for classes in real for c in classes], minlength=18)
    assert counts.argmax() == 0 and counts[16] > counts[11] * 10  # nucleoplasm, cytosol common; spindle rare
    mean_labels = np.mean([len(c) for c in real if c])
    assert abs(mean_labels - 1.64) < 0.1
    assert sum(not c for c in real) < 30  # Negative images are rare (34 of 21,806 in hpa2021)
    flat_counts = np.bincount([c for classes in flat for c in classes], minlength=18)
    assert flat_counts[11] > 5 * counts[11]
