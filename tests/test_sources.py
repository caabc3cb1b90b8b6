"""Training on several sources (``data.sources``, issue 23 part 2): the config, one cache per source read
as one through each source's intensity gain, fold -1 in training and refinement, thresholds and scores on
the competition's images, lineage across a changed external set, and images of different sizes.

The end-to-end flow runs on a tiny synthetic competition set plus two external sets made by
``weakcell.synthetic.external`` (dimmed, JPEG or 16-bit, at 128, 256 and 384 px over the competition's
256): ``ext-a`` trained on in every fold (fold -1), ``ext-b`` folded."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

import weakcell.cache.build as build
from tests.conftest import TINY, TRAIN
from weakcell.cache.crops import cut_crops
from weakcell.cache.intensity import cell_means, gain_table, measured_gain
from weakcell.cache.store import CellCache, cache_fingerprint
from weakcell.config import Config, ConfigError, load_config
from weakcell.config.lineage import reads
from weakcell.data.datasets import get_dataset
from weakcell.data.images import read_image, write_channel, write_image
from weakcell.data.labels import read_label_file, to_multi_hot
from weakcell.errors import StageError
from weakcell.lineage import Lineage
from weakcell.metrics import mean_average_precision
from weakcell.refine import fold_targets
from weakcell.segment import Segmentation, segment_image
from weakcell.sources import COMPETITION, data_sources, open_caches
from weakcell.synthetic.external import ExternalLook, make_external_set
from weakcell.synthetic.generate import generate_image, image_seed
from weakcell.training_set import TrainingSet

# -- the config ----------------------------------------------------------------------------------------


def test_sources_join_the_folds_file_with_their_own_modes():
    cfg = load_config(
        None,
        ["data.sources=[{dir: data/a, folds: folded}, {dir: data/b}]", "folds.external_mode=train_only"],
    )
    assert cfg.folds.external == ["data/a", "data/b"]
    assert cfg.folds.external_modes == {"data/a": "folded"}
    assert [cfg.folds.mode_of(f) for f in cfg.folds.external] == ["folded", "train_only"]
    assert cfg.folds_file.name == "synthetic-5x42-ext-mixed.csv"
    assert Config.model_validate(cfg.model_dump(mode="json")) == cfg  # filling in twice changes nothing
    names = [s.name for s in data_sources(cfg)]
    assert names == [COMPETITION, "a", "b"]
    assert data_sources(cfg)[1].cache_dir.as_posix() == "cache/a/classical"


def test_outputs_made_without_sources_keep_their_fingerprints():
    """Neither data.sources nor folds.external_modes enters the lineage of a run or folds file that does
    not use them: those made before them are reused, not refused. (``segment.reference_size``'s rule,
    ``ADDED_SETTINGS``, is tested in test_lineage.)"""
    cfg = load_config(None, [])
    assert not any(key.startswith("data.sources") for key in reads("run", cfg))
    assert not any(key.startswith("folds.external_modes") for key in reads("folds", cfg))
    upstream = {"cache": "c", "folds": "f", "labels": "l", "truth": None}
    assert Lineage.of("run", cfg, **upstream, sources=None).upstream == {
        "cache": "c",
        "folds": "f",
        "labels": "l",
    }


@pytest.mark.parametrize(
    "sources, message",
    [
        ("[{dir: data/x}, {dir: other/x}]", "names 'x' twice"),
        ("[{dir: data/competition}]", "'competition' names"),
        ("[{dir: data/x, gain: [1, 2, 0, 1]}]", "gain"),
        ("[{dir: data/x, intensty: none}]", "intensty"),
        ("[{dir: data/..}]", "not a folder name"),
    ],
)
def test_bad_sources_are_refused_naming_the_key(sources, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [f"data.sources={sources}"])


# -- intensity gains -------------------------------------------------------------------------------------


class _Crops:
    """A stand-in cache: ``crops(rows)`` of a fixed array."""

    def __init__(self, crops: np.ndarray) -> None:
        self.array = crops

    def crops(self, rows: np.ndarray) -> np.ndarray:
        return self.array[rows]


def test_cell_means_average_the_cell_pixels_only():
    crops = np.zeros((2, 4, 2, 2), np.uint8)
    crops[0, :, 0, 0] = [10, 0, 30, 0]  # a cell pixel dark in green and yellow
    crops[0, :, 1, 1] = [20, 40, 0, 8]
    crops[1, :, 0, 1] = [30, 20, 60, 4]  # the other pixels are background (all four 0)
    means = cell_means(_Crops(crops), np.arange(2))  # type: ignore[arg-type]
    np.testing.assert_allclose(means, [(10 + 20 + 30) / 3, (0 + 40 + 20) / 3, (30 + 0 + 60) / 3, 4])


def test_measured_gain_and_its_table():
    gain = measured_gain(np.array([100.0, 50, 80, 60]), np.array([50.0, 50, 160, 0]))
    np.testing.assert_allclose(gain, [2.0, 1.0, 0.5, 1.0])  # nothing to measure on: 1
    assert measured_gain(np.array([100.0] * 4), np.array([1.0] * 4)).tolist() == [16.0] * 4  # limited
    table = gain_table([2.0, 1.0, 0.5, 1.5])
    assert table is not None and table.shape == (4, 256) and table.dtype == np.uint8
    assert table[0, [0, 1, 100, 127, 128, 255]].tolist() == [0, 2, 200, 254, 255, 255]
    assert table[2, [0, 3, 100]].tolist() == [0, 2, 50]  # rint: 1.5 -> 2
    assert table[3, [2, 100]].tolist() == [3, 150]
    assert gain_table([1.0] * 4) is None


# -- one cache per source, read as one ---------------------------------------------------------------------


def _fake_segment(image: np.ndarray, cfg) -> Segmentation:
    """Connected components of the summed signal are cells; their blue part is the nucleus."""
    cells, _ = ndimage.label(image.max(axis=0) > 0)
    return Segmentation(
        cells=cells.astype(np.int32), nuclei=np.where(image[2] > 0, cells, 0).astype(np.int32)
    )


@pytest.fixture
def two_caches(dataset, tmp_path, monkeypatch):
    """The blobs data set and an external copy of its training images at half the intensity (other IDs),
    cached by one ``make cache`` with the copy as a source."""
    monkeypatch.setattr(build, "segment_image", _fake_segment)
    external = tmp_path / "dimmer"
    labels = pd.read_csv(dataset / "train.csv")
    for image_id in labels["ID"]:
        image = read_image(dataset / "train", image_id)
        write_image(external / "train", f"x-{image_id}", np.where(image > 0, np.maximum(image // 2, 1), 0))
    labels.assign(ID="x-" + labels["ID"]).to_csv(external / "train.csv", index=False)
    cfg = load_config(
        None,
        [
            "data.dataset=hpa2021",
            f"paths.root={tmp_path}",
            f"data.dir={dataset}",
            f"cache.dir={tmp_path / 'cache'}",
            "cache.crop_size=16",
            "cache.workers=1",
            f"data.sources=[{{dir: {external}}}]",
        ],
    )
    build.run(cfg)
    return cfg


def test_each_source_gets_its_own_cache_of_its_training_images(two_caches):
    cfg = two_caches
    own, dimmer = (CellCache(source.cache_dir) for source in data_sources(cfg))
    assert dimmer.folder == cfg.path("cache") / "dimmer" / "classical"
    assert set(dimmer.images["image_id"]) == {f"x-{i}" for i in TRAIN}
    assert set(dimmer.images["split"]) == {"train"} and set(own.images["split"]) == {"train", "test"}
    # the same cells, each crop half as bright (the fake segmenter finds every non-zero pixel)
    assert len(dimmer.cells) == len(own.cells[own.cells["split"] == "train"])


def test_joined_cache_reads_each_source_through_its_gain(two_caches):
    cfg = two_caches
    sources = data_sources(cfg)
    joined, summaries = open_caches(cfg, sources)
    own, dimmer = CellCache(sources[0].cache_dir), CellCache(sources[1].cache_dir)
    assert len(joined) == len(own) + len(dimmer)
    assert list(joined.cells.index) == list(range(len(joined)))
    gain = np.array(summaries[1].gain)
    assert summaries[1].measured and np.all(np.abs(gain - 2.0) < 0.1), gain  # the copy is half as bright
    first, second = np.arange(len(own)), len(own) + np.arange(len(dimmer))
    np.testing.assert_array_equal(joined.crops(first), own.crops(first))  # the competition's as cached
    table = gain_table(gain)
    assert table is not None
    expected = np.stack([table[c][dimmer.crops(np.arange(len(dimmer)))[:, c]] for c in range(4)], axis=1)
    np.testing.assert_array_equal(joined.crops(second), expected)
    mixed = np.array([second[0], first[1], second[2]])  # rows of both parts in one batch
    np.testing.assert_array_equal(joined.crops(mixed)[[0, 2]], expected[[0, 2]])
    image_id = dimmer.images.loc[dimmer.images["n_cells"] > 0, "image_id"].iloc[0]
    np.testing.assert_array_equal(joined.masks(image_id).cells, dimmer.masks(image_id).cells)


def test_a_given_gain_or_none_replaces_the_measured_one(two_caches):
    for settings, gain in (("gain: [1, 3, 1, 1]", (1.0, 3.0, 1.0, 1.0)), ("intensity: none", None)):
        source = two_caches.data.sources[0].dir
        cfg = load_config(None, [*_overrides(two_caches), f"data.sources=[{{dir: {source}, {settings}}}]"])
        _, summaries = open_caches(cfg, data_sources(cfg))
        assert summaries[1].gain == gain and not summaries[1].measured


def _overrides(cfg: Config) -> list[str]:
    return [
        "data.dataset=hpa2021",
        f"paths.root={cfg.paths.root}",
        f"data.dir={cfg.data.dir}",
        f"cache.dir={cfg.cache.dir}",
        "cache.crop_size=16",
    ]


def test_a_missing_source_folder_is_one_line(dataset, tmp_path):
    cfg = load_config(
        None, [f"paths.root={tmp_path}", f"data.dir={dataset}", "data.sources=[{dir: nowhere}]"]
    )
    with pytest.raises(StageError, match=r"data.sources: .*nowhere has no train/"):
        build.run(cfg)
    assert not cfg.cache_dir.exists()  # refused before the competition's cache, not after its hours


def test_a_partial_external_source_stops_cache_before_any_cache(dataset, tmp_path):
    """Each source's cache gets the competition's missing-files check before any image is cached: 4 of 5
    labelled images of the external set without files (80% > checks.max_missing_share) is one line naming
    the source's label file and `make external`, and no cache folder is made."""
    external = tmp_path / "partial"
    labels = pd.read_csv(dataset / "train.csv").assign(ID=lambda t: "x-" + t["ID"])
    external.mkdir()
    labels.to_csv(external / "train.csv", index=False)
    first = labels["ID"].iloc[0]
    write_image(external / "train", first, read_image(dataset / "train", first.removeprefix("x-")))
    cfg = load_config(
        None,
        [
            "data.dataset=hpa2021",
            f"paths.root={tmp_path}",
            f"data.dir={dataset}",
            f"data.sources=[{{dir: {external}}}]",
        ],
    )
    with pytest.raises(StageError) as caught:
        build.run(cfg)
    message = str(caught.value)
    assert f"4 of the 5 labelled images in {external / 'train.csv'}" in message
    assert "80.0% > checks.max_missing_share=0.01" in message and "(make external)" in message
    assert not cfg.path(cfg.paths.cache).exists()


def test_joining_refuses_repeated_ids_and_other_crop_sizes(two_caches, dataset, tmp_path):
    own = CellCache(two_caches.cache_dir)
    with pytest.raises(StageError, match="more than one of the caches"):
        CellCache.joined([(own, None), (own, None)])
    cfg = load_config(None, [*_overrides(two_caches), f"cache.dir={tmp_path / 'big'}", "cache.crop_size=24"])
    build.run(cfg.model_copy(update={"data": cfg.data.model_copy(update={"sources": []})}))
    with pytest.raises(StageError, match="16 px"):
        CellCache.joined([(own, None), (CellCache(tmp_path / "big"), None)])


# -- refinement keeps fold -1's inherited labels ------------------------------------------------------------


def test_train_only_cells_keep_their_inherited_labels_in_refinement():
    """Outer fold 0's targets: fold 1's cells by the rule on the inner model's predictions, fold -1's (no
    model predicts them out of fold) stay trainable with their inherited labels."""
    spec = get_dataset("hpa2021")
    images = pd.DataFrame(
        {
            "image_id": ["a", "b", "c"],
            "labels": [[1], [1, 2], [2]],
            "source": [COMPETITION, COMPETITION, "ext"],
            "fold": [0, 1, -1],
        }
    )
    cells = pd.DataFrame(
        {
            "image_id": ["a", "a", "b", "b", "c", "c"],
            "cell_id": [1, 2, 1, 2, 1, 2],
            "fold": [0, 0, 1, 1, -1, -1],
        }
    ).assign(source=lambda t: t["image_id"].map(dict(zip(images["image_id"], images["source"]))))
    inherited = to_multi_hot([[1], [1], [1, 2], [1, 2], [2], [2]], spec.n_classes).astype(np.float32)
    data = TrainingSet(spec, None, cells, images, inherited, None, None)  # type: ignore[arg-type]
    n = spec.n_classes
    probs = np.full((2, n), 0.01)
    probs[0, 1], probs[1, 2] = 0.9, 0.8  # cell b1 shows class 1, cell b2 class 2
    oof_cell = pd.DataFrame(probs, columns=[f"p_{c}" for c in range(n)]).assign(image_id="b", cell_id=[1, 2])
    for prefix in ("mil_p_", "att_"):
        oof_cell[[f"{prefix}{c}" for c in range(n)]] = 1.0
    oof_image = pd.DataFrame([np.full(n, 0.5)], columns=[f"p_{c}" for c in range(n)]).assign(image_id="b")
    rule = load_config(None, ["refine.negative_quantile=null"])
    targets = fold_targets(rule, data, (oof_cell, oof_image), outer=0)
    assert targets.trainable.tolist() == [False, False, True, True, True, True]
    np.testing.assert_array_equal(targets.targets[4:], inherited[4:])  # fold -1: inherited
    # fold 1: the rule; the label each cell misses is left out of the loss (uncertain=ignore, the default)
    assert targets.targets[2, 1] == 1 and np.isnan(targets.targets[2, 2])
    assert targets.targets[3, 2] == 1 and np.isnan(targets.targets[3, 1])
    assert set(targets.table["image_id"]) == {"b"}  # pseudo_labels.parquet: the relabelled cells only


# -- images of different sizes ---------------------------------------------------------------------------


def test_crops_of_one_field_at_every_size_look_alike():
    """One demo-sized field (512 px) stored at 256, 432, 512 and 768 px (1024, 1728, 2048, 3072 over
    2048): with ``segment.reference_size`` the segmenter finds the same cells and their crops differ by
    under 3 grey levels (median over the cells; 0.3-2.4 measured), as little as resampling makes them;
    with absolute sizes (no reference) the median was 4.4-7.7 on these images."""
    cfg = load_config(None, ["segment.classical.nucleus_diameter=45", "segment.classical.working_scale=0.25"])
    segment = cfg.segment.model_copy(update={"reference_size": 512})
    sample = generate_image(cfg.synthetic, image_seed(2021, "train", 3))
    reference = segment_image(sample.image, segment)
    ref_crops, ref_table = cut_crops(sample.image, reference.cells, reference.nuclei, 64)
    assert reference.n_cells >= 8
    for side in (256, 432, 768):
        method = cv2.INTER_AREA if side < 512 else cv2.INTER_CUBIC
        image = np.stack([cv2.resize(plane, (side, side), interpolation=method) for plane in sample.image])
        found = segment_image(image, segment)
        crops, table = cut_crops(image, found.cells, found.nuclei, 64)
        assert abs(found.n_cells - reference.n_cells) <= 1, side
        # each reference cell's crop against the crop of the cell at its centre in the resized image
        diffs = []
        for row, crop in zip(ref_table.itertuples(), ref_crops):
            y, x = ((row.y0 + row.y1) / 2 * side / 512, (row.x0 + row.x1) / 2 * side / 512)
            cell_id = found.cells[min(int(y), side - 1), min(int(x), side - 1)]
            if cell_id:
                other = crops[int(np.flatnonzero(table["cell_id"] == cell_id)[0])]
                diffs.append(np.abs(crop.astype(int) - other.astype(int)).mean())
        assert len(diffs) >= reference.n_cells - 1 and np.median(diffs) < 3, (side, diffs)


# -- the whole flow on a competition set and two external sets -----------------------------------------------

SOURCES = ["data.sources=[{dir: data/ext-a, folds: train_only}, {dir: data/ext-b, folds: folded}]"]
LOOK = {"scales": (0.5, 1.0, 1.5), "gain": (0.5, 0.5, 0.5, 0.5)}


@pytest.fixture(scope="module")
def flow(tmp_path_factory):
    """data -> external sets -> folds -> cache -> train -> refine -> thresholds -> infer -> evaluate."""
    from weakcell import evaluate, infer, refine, thresholds, train
    from weakcell import folds as folds_stage
    from weakcell.synthetic import writer as data_stage

    root = tmp_path_factory.mktemp("sources")
    base = [f"paths.root={root}", *TINY, "segment.reference_size=256"]
    spec = get_dataset("synthetic")
    for name, seed in (("ext-a", 7), ("ext-b", 8)):
        raw = load_config(
            None, [*base, f"data.dir=data/{name}-raw", f"synthetic.seed={seed}", "synthetic.n_test=0"]
        )
        data_stage.run(raw)
        look = ExternalLook(id_prefix=name.replace("-", ""), seed=seed, **LOOK)  # type: ignore[arg-type]
        make_external_set(raw.data_dir, root / "data" / name, spec, look)
    alone = load_config(None, base)
    data_stage.run(alone)
    build.run(alone)
    before = cache_fingerprint(alone.cache_dir)
    cfg = load_config(None, [*base, *SOURCES, "refine.rounds=1"])
    folds_stage.run(cfg)
    build.run(cfg)
    metrics = train.run(cfg)
    refine.run(cfg)
    thresholds.run(cfg)
    infer.run(cfg)
    evaluate.run(cfg)
    return cfg, metrics, before


def _ids(cfg: Config, folder: str) -> set[str]:
    return set(read_label_file(cfg.path(folder) / "train.csv", get_dataset("synthetic"))["ID"])


def test_flow_caches_each_source_apart(flow):
    cfg, _, before = flow
    assert (
        cache_fingerprint(cfg.cache_dir) == before
    )  # adding sources leaves the competition's cache as it was
    for name in ("ext-a", "ext-b"):
        images = pd.read_parquet(cfg.path("cache") / name / "classical" / "images.parquet")
        assert set(images["image_id"]) == _ids(cfg, f"data/{name}") and set(images["split"]) == {"train"}
        assert images["width"].nunique() > 1  # stored at several sizes
    crops = [np.load(p, mmap_mode="r").shape[1:] for p in (cfg.path("cache") / "ext-a").rglob("part*.npy")]
    assert crops and set(crops) == {(4, 32, 32)}


def test_flow_folds_train_only_images_at_minus_one(flow):
    cfg, _, _ = flow
    folds = pd.read_csv(cfg.folds_file).set_index("ID")["fold"]
    assert (folds[list(_ids(cfg, "data/ext-a"))] == -1).all()
    assert sorted(folds[list(_ids(cfg, "data/ext-b"))].unique()) == [0, 1, 2]


def test_flow_validates_competition_and_folded_images_only(flow):
    cfg, metrics, _ = flow
    oof = pd.read_parquet(cfg.run_dir / "oof_image.parquet")
    competition, folded = set(pd.read_csv(cfg.data_dir / "train.csv")["ID"]), _ids(cfg, "data/ext-b")
    assert set(oof["image_id"]) == competition | folded  # never a train-only image
    assert sorted(p.name for p in cfg.run_dir.glob("fold*") if p.is_dir()) == ["fold0", "fold1", "fold2"]
    # the scores are the competition's images', by hand: their OOF rows against their labels
    labels = read_label_file(cfg.data_dir / "train.csv", get_dataset("synthetic")).set_index("ID")
    own = oof[oof["image_id"].isin(competition)]
    y_true = to_multi_hot(labels.loc[own["image_id"], "labels"].tolist(), 19)
    expected = mean_average_precision(y_true, own[[f"p_{c}" for c in range(19)]].to_numpy())
    assert metrics["image_map"] == pytest.approx(expected) and "image_map_ext-b" in metrics
    run = json.loads((cfg.run_dir / "run.json").read_text())
    sources = {s["name"]: s for s in run["sources"]}
    assert sources["ext-a"]["folds"] == "train_only" and sources["ext-b"]["folds"] == "folded"
    assert all(g > 1.3 for name in ("ext-a", "ext-b") for g in sources[name]["gain"])  # a dimmed set: > 1


def test_flow_trains_every_fold_on_the_train_only_cells(flow):
    from weakcell.fold_model import HeldOut, outer_model
    from weakcell.training_set import load_training_set

    cfg, _, _ = flow
    data = load_training_set(cfg)
    train_only = data.cells.index[data.cells["source"] == "ext-a"]
    assert len(train_only) and (data.cells.loc[train_only, "fold"] == -1).all()
    for fold in data.validation_folds:
        held_out = HeldOut.of(data, outer_model(cfg, fold, cfg.run_dir))
        assert set(train_only) <= set(held_out.train_cells)
    pseudo = pd.read_parquet(cfg.round_dir(1) / "pseudo_labels.parquet")
    assert not set(pseudo["image_id"]) & _ids(cfg, "data/ext-a")  # relabelled: validated folds only


def test_flow_tunes_thresholds_on_competition_images(flow):
    from weakcell import thresholds

    cfg, _, _ = flow
    summary = json.loads((cfg.model_dir / "thresholds.json").read_text())["summary"]
    assert summary["images"] == cfg.synthetic.n_train and summary["sources"] == "competition"
    every = cfg.model_copy(update={"thresholds": cfg.thresholds.model_copy(update={"sources": "all"})})
    thresholds.run(every)
    summary = json.loads((cfg.model_dir / "thresholds.json").read_text())["summary"]
    assert summary["images"] == cfg.synthetic.n_train + len(_ids(cfg, "data/ext-b"))
    thresholds.run(cfg)


def test_flow_evaluates_competition_images(flow):
    cfg, _, _ = flow
    evaluation = json.loads((cfg.model_dir / "evaluation.json").read_text())
    assert evaluation["image_oof"]["images"] == cfg.synthetic.n_train
    assert evaluation["image_oof_sources"]["ext-b"]["images"] == len(_ids(cfg, "data/ext-b"))
    assert "cell_oof" in evaluation and "cell_test" in evaluation
    # the out-of-fold file holds the competition's training images, each once: no folded external image
    # (its cells are in another cache and have no truth), so no prediction is left out as another image's
    from weakcell.competition_metric import read_submission
    from weakcell.evaluate import OOF_FILE, submission_dir

    rows = read_submission(submission_dir(cfg) / OOF_FILE)
    assert sorted(rows["ID"]) == sorted(pd.read_csv(cfg.data_dir / "train.csv")["ID"])
    assert evaluation["cell_oof"]["submission"]["ignored"]["other_images"] == 0


def test_flow_changed_external_set_invalidates_its_cache_and_the_run(flow, capsys):
    """Last in the module: it changes ext-a's pixels."""
    from weakcell import train

    cfg, _, _ = flow
    ext_cache = cfg.path("cache") / "ext-a" / "classical"
    old = cache_fingerprint(ext_cache)
    image_id = sorted(_ids(cfg, "data/ext-a"))[0]
    path = cfg.path("data/ext-a/train") / f"{image_id}_green.png"
    write_channel(path, 255 - cv2.imread(str(path), cv2.IMREAD_UNCHANGED))
    capsys.readouterr()
    build.run(cfg)
    assert (
        "cache (ext-a): 9 images (1 processed now, 1 re-cached (content changed)" in capsys.readouterr().out
    )
    assert cache_fingerprint(ext_cache) != old
    with pytest.raises(StageError, match="the external sources"):
        train.run(cfg)
