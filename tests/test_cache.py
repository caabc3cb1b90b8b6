"""The cell-crop cache: crop geometry, the build stage on a tiny hand-made hpa2021 layout (with a fake
thresholding segmenter, so nothing here depends on the real segmenter's quality), the reader and the
training loader."""

from __future__ import annotations

import re

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from scipy import ndimage

import weakcell.cache.build as build
from tests.conftest import TEST, TRAIN
from weakcell.cache.crops import CELL_COLUMNS, cut_crops, label_boxes
from weakcell.cache.loader import (
    BagSampler,
    CellCrops,
    CropAugment,
    apply_symmetries,
    augment_batch_,
    make_loader,
    scale_channels,
)
from weakcell.cache.store import CELLS_COLUMNS, IMAGES_COLUMNS, CellCache, read_masks
from weakcell.config import load_config
from weakcell.data.images import ImageReadError, read_image, write_image
from weakcell.errors import StageError
from weakcell.segment import Segmentation, segment_image

SIZE = 16  # crop side in these tests

# -- crop geometry -------------------------------------------------------------------------------------


def _image_with(cells: np.ndarray, values: tuple[int, int, int, int] = (10, 20, 30, 40)) -> np.ndarray:
    """(4, H, W) with constant channel values inside any cell, 0 outside."""
    return np.stack([np.where(cells > 0, v, 0) for v in values]).astype(np.uint8)


def test_crop_keeps_aspect_ratio_and_channel_order():
    cells = np.zeros((30, 30), np.int32)
    cells[5:25, 10:20] = 1  # 20 tall, 10 wide
    crops, table = cut_crops(_image_with(cells), cells, cells, size=20)
    assert crops.shape == (1, 4, 20, 20) and crops.dtype == np.uint8
    # Padded to 20x20 around the box: the cell fills the middle 10 columns, zeros on both sides.
    for channel, value in enumerate((10, 20, 30, 40)):
        assert (crops[0, channel, :, 5:15] == value).all()
        assert (crops[0, channel, :, :5] == 0).all() and (crops[0, channel, :, 15:] == 0).all()
    assert table.iloc[0][["x0", "y0", "x1", "y1", "area"]].tolist() == [10, 5, 20, 25, 200]


def test_crop_holds_only_its_own_cell():
    cells = np.zeros((40, 40), np.int32)
    cells[5:30, 5:20] = 3  # labels need not be contiguous
    cells[10:35, 20:35] = 7  # touches cell 3 along a column
    image = _image_with(cells)
    image[:, cells == 7] = 200  # a neighbour bright enough to notice if it leaked
    image[:, 0, 0] = 90  # background signal must vanish too
    nuclei = np.where(np.isin(cells, [3, 7]) & (np.arange(40)[:, None] % 2 == 0), cells, 0)
    crops, table = cut_crops(image, cells, nuclei, size=SIZE)
    assert list(table.columns) == list(CELL_COLUMNS)
    assert table["cell_id"].tolist() == [3, 7]
    assert table["area"].tolist() == [int((cells == 3).sum()), int((cells == 7).sum())]
    assert table["nucleus_area"].tolist() == [int((nuclei == 3).sum()), int((nuclei == 7).sum())]
    assert not table["touches_border"].any()
    assert crops[0].max() < 200 and crops[0].max() > 0  # cell 3: no neighbour, no background
    assert crops[1].min() == 0 and crops[1].max() == 200  # cell 7: itself, zero padding


def test_crops_of_an_empty_image_and_border_cells():
    empty = np.zeros((16, 24), np.int32)
    crops, table = cut_crops(np.zeros((4, 16, 24), np.uint8), empty, empty, SIZE)
    assert crops.shape == (0, 4, SIZE, SIZE) and len(table) == 0 and list(table.columns) == list(CELL_COLUMNS)
    border = empty.copy()
    border[10:16, 0:3] = 1
    _, table = cut_crops(_image_with(border), border, border, SIZE)
    assert table["touches_border"].tolist() == [True]


def _reference_crops(image, cells, nuclei, size):
    """The plain algorithm: find_objects boxes, full-image counts, the cell's masked box resized."""
    boxes = ndimage.find_objects(cells)
    rows, crops = [], []
    for cell_id, box in enumerate(boxes, start=1):
        if box is None:
            continue
        own = cells[box] == cell_id
        h, w = own.shape
        side = max(h, w)
        new_h, new_w = max(1, round(h * size / side)), max(1, round(w * size / side))
        cell = np.where(own[None], image[(slice(None), *box)], 0).transpose(1, 2, 0)
        small = cv2.resize(np.ascontiguousarray(cell), (new_w, new_h), interpolation=cv2.INTER_AREA)
        crop = np.zeros((4, size, size), np.uint8)
        top, left = (size - new_h) // 2, (size - new_w) // 2
        crop[:, top : top + new_h, left : left + new_w] = small.reshape(new_h, new_w, 4).transpose(2, 0, 1)
        crops.append(crop)
        y, x = box
        nucleus_area = int((nuclei[box] == cell_id).sum())  # the nucleus inside the cell's box
        rows.append([cell_id, x.start, y.start, x.stop, y.stop, int(own.sum()), nucleus_area])
    return np.stack(crops), rows


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_crops_and_table_match_the_plain_algorithm(seed):
    """Random blocky labels with gaps in the ids, cells touching every border, ragged shapes and nuclei
    partly outside their own cell's box: the run-length boxes and counts agree with find_objects."""
    rng = np.random.default_rng(seed)
    cells = cv2.resize(
        rng.integers(0, 12, (9, 13)).astype(np.int32) * 3, (131, 97), interpolation=cv2.INTER_NEAREST
    )
    cells[rng.random(cells.shape) < 0.05] = 0  # ragged edges and holes
    nuclei = np.where(rng.random(cells.shape) < 0.3, np.roll(cells, 5, axis=1), 0).astype(np.int32)
    image = rng.integers(0, 256, (4, *cells.shape), dtype=np.uint8)
    crops, table = cut_crops(image, cells, nuclei, SIZE)
    expected_crops, expected_rows = _reference_crops(image, cells, nuclei, SIZE)
    np.testing.assert_array_equal(crops, expected_crops)
    assert table[list(CELL_COLUMNS[:-1])].to_numpy().tolist() == expected_rows
    ids, boxes, areas = label_boxes(cells)
    assert boxes.tolist() == [r[1:5] for r in expected_rows]
    assert ids.tolist() == [row[0] for row in expected_rows] and areas.tolist() == [
        r[5] for r in expected_rows
    ]


# -- the build stage on a tiny dataset -----------------------------------------------------------------


def fake_segment(image: np.ndarray, cfg) -> Segmentation:
    """Connected components of the summed signal are cells; their blue part is the nucleus."""
    cells, _ = ndimage.label(image.max(axis=0) > 0)
    return Segmentation(
        cells=cells.astype(np.int32), nuclei=np.where(image[2] > 0, cells, 0).astype(np.int32)
    )


@pytest.fixture(autouse=True)
def _fake_segmenter(monkeypatch):
    monkeypatch.setattr(build, "segment_image", fake_segment)


def _config(dataset, cache_dir, *overrides):
    return load_config(
        None,
        [
            "data.dataset=hpa2021",
            f"data.dir={dataset}",
            f"cache.dir={cache_dir}",
            f"cache.crop_size={SIZE}",
            "cache.workers=1",
            "cache.shard_mb=0.008",  # 8 crops of 16 px per shard: several shards even here
            *overrides,
        ],
    )


def _content(cache_dir):
    """Everything a later stage sees, without the shard layout (which depends on how work was split)."""
    cache = CellCache(cache_dir)
    cells = cache.cells.drop(columns=["shard", "row"])
    return cells, cache.images, cache.crops(np.arange(len(cache)))


def _assert_same(left, right):
    pd.testing.assert_frame_equal(left[0], right[0])
    pd.testing.assert_frame_equal(left[1], right[1])
    np.testing.assert_array_equal(left[2], right[2])


def test_cache_tables_agree_with_masks_and_images(dataset, tmp_path, capsys):
    cfg = _config(dataset, tmp_path / "cache")
    build.run(cfg)
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert "7 images" in summary and f"{sum(TRAIN.values()) + sum(TEST.values())} cells" in summary
    cache = CellCache(cfg.cache_dir)
    assert list(cache.cells.columns) == list(CELLS_COLUMNS)
    assert list(cache.images.columns) == list(IMAGES_COLUMNS)
    assert (cfg.cache_dir / "config.yaml").is_file()
    assert cache.cells["shard"].nunique() > 1  # the shard size forced several flushes
    images = cache.images.set_index("image_id")
    assert images.loc["img-b", "n_cells"] == 0 and images.loc["img-b", "status"] == "ok"
    assert images["split"].to_dict() == {**dict.fromkeys(TRAIN, "train"), **dict.fromkeys(TEST, "test")}
    assert (images[["width", "height"]] == [56, 40]).all().all()
    for image_id, n in {**TRAIN, **TEST}.items():
        split = images.loc[image_id, "split"]
        masks = read_masks(cfg.cache_dir, image_id)
        rows = cache.cells[cache.cells["image_id"] == image_id]
        assert images.loc[image_id, "n_cells"] == len(rows) == n == masks.n_cells
        image = read_image(dataset / split, image_id)
        expected_crops, expected = cut_crops(image, masks.cells, masks.nuclei, SIZE)
        columns = list(CELL_COLUMNS)
        pd.testing.assert_frame_equal(
            rows[columns].reset_index(drop=True), expected[columns], check_dtype=False, check_like=True
        )
        np.testing.assert_array_equal(cache.crops(rows.index.to_numpy()), expected_crops)
        np.testing.assert_array_equal(masks.cells, fake_segment(image, None).cells)


def test_rerun_skips_finished_images_and_force_rebuilds(dataset, tmp_path, monkeypatch):
    cfg = _config(dataset, tmp_path / "cache")
    build.run(cfg)
    first = _content(cfg.cache_dir)
    calls = []
    monkeypatch.setattr(build, "segment_image", lambda image, c: calls.append(1) or fake_segment(image, c))
    build.run(cfg)
    assert calls == []
    _assert_same(_content(cfg.cache_dir), first)
    build.run(cfg.model_copy(update={"force": True}))
    assert len(calls) == len(TRAIN) + len(TEST)
    _assert_same(_content(cfg.cache_dir), first)


def test_interrupted_run_resumes_to_the_same_cache(dataset, tmp_path, monkeypatch):
    reference = _config(dataset, tmp_path / "reference")
    build.run(reference)
    cfg = _config(dataset, tmp_path / "cache")
    real_write = build._write_npy
    written = []

    def write_then_die(blocks, path):
        real_write(blocks, path)
        written.append(path)
        if len(written) == 2:  # killed after the second shard's crops, before its index
            raise KeyboardInterrupt

    monkeypatch.setattr(build, "_write_npy", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        build.run(cfg)
    assert written[1].is_file() and not (cfg.cache_dir / "cells.parquet").exists()
    monkeypatch.setattr(build, "_write_npy", real_write)
    build.run(cfg)
    assert not any(p.name.endswith(".tmp") for p in (cfg.cache_dir / "shards").iterdir())
    _assert_same(_content(cfg.cache_dir), _content(reference.cache_dir))


def test_corrupt_and_mismatched_channels_are_reported_by_id(dataset, tmp_path, capsys):
    (dataset / "train" / "img-c_red.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    write_image(dataset / "test", "tst-a", np.zeros((4, 40, 56), np.uint8))
    (dataset / "test" / "tst-a_yellow.png").unlink()
    from weakcell.data.images import write_channel

    write_channel(dataset / "test" / "tst-a_yellow.png", np.zeros((20, 20), np.uint8))
    labels = pd.read_csv(dataset / "train.csv")
    pd.concat([labels, pd.DataFrame({"ID": ["ghost"], "Label": ["3"]})]).to_csv(
        dataset / "train.csv", index=False
    )
    # 1 of 6 labelled images without files: a per-image skip while within checks.max_missing_share
    cfg = _config(dataset, tmp_path / "cache", "checks.max_missing_share=0.2")
    build.run(cfg)
    assert "3 skipped" in capsys.readouterr().out
    skipped = pd.read_csv(cfg.cache_dir / "skipped.csv").set_index("image_id")
    assert set(skipped.index) == {"img-c", "tst-a", "ghost"}
    assert "img-c_red.png" in skipped.loc["img-c", "reason"]
    assert "differ in size" in skipped.loc["tst-a", "reason"]
    assert "missing channel file" in skipped.loc["ghost", "reason"]
    images = CellCache(cfg.cache_dir).images.set_index("image_id")
    assert images.loc["img-c", "status"] == "skipped" and images.loc["img-c", "n_cells"] == 0
    assert images.loc["img-c", "width"] == 56  # read from a healthy channel's header

    with pytest.raises(ImageReadError, match=r"img-c_red\.png"):
        build.run(
            _config(dataset, tmp_path / "strict", "cache.on_error=raise", "checks.max_missing_share=0.2")
        )


def test_too_many_labelled_images_without_files_stop_the_cache_before_it_starts(dataset, tmp_path):
    """Issue 26: the full 21,806-row train.csv beside 5 images made `make cache` mark 21,799 images skipped
    one by one for 3 min 20 s, exit 0. Above checks.max_missing_share it now stops at once, naming why."""
    labels = pd.read_csv(dataset / "train.csv")
    ghosts = pd.DataFrame({"ID": [f"ghost{i}" for i in range(20)], "Label": ["3"] * 20})
    pd.concat([labels, ghosts]).to_csv(dataset / "train.csv", index=False)
    cfg = _config(dataset, tmp_path / "cache")
    with pytest.raises(
        StageError,
        match=r"20 of the 25 labelled images .* no channel files .*80\.0% > checks\.max_missing_share=0\.01",
    ):
        build.run(cfg)
    assert not (tmp_path / "cache").exists()  # nothing was started
    build.run(_config(dataset, tmp_path / "cache", "checks.max_missing_share=0.9"))  # the user's choice
    assert CellCache(tmp_path / "cache").images["status"].eq("skipped").sum() == 20


@pytest.mark.parametrize("backend", ["cellpos", "cellpose", "classical+sma"])
def test_a_backend_that_cannot_start_stops_the_cache_once(dataset, tmp_path, backend, monkeypatch):
    """Issue 26: a typo (cellpos) or cellpose without weights made every image a per-image skip, exit 0.
    A configuration fault now stops the stage before it starts, in one line."""
    from weakcell.errors import BackendError

    monkeypatch.delenv("CELLPOSE_LOCAL_MODELS_PATH", raising=False)
    with pytest.raises(BackendError, match=rf"segment\.backend='{re.escape(backend)}' cannot start"):
        build.run(_config(dataset, tmp_path / "cache", f"segment.backend={backend}"))
    assert not (tmp_path / "cache").exists()


def test_a_model_that_fails_to_load_stops_the_cache_not_the_image(dataset, tmp_path, monkeypatch):
    """A backend whose network fails to load raises BackendError from the first image: the stage stops
    (it was a per-image skip before), whereas a fault of one image stays a skipped row."""

    from weakcell.errors import BackendError

    def broken(image, cfg):
        raise BackendError("segment.backend=cellpose cannot start (Cellpose-SAM): weights do not fit")

    monkeypatch.setattr(build, "segment_image", broken)
    with pytest.raises(BackendError, match="weights do not fit"):
        build.run(_config(dataset, tmp_path / "cache"))
    assert not list((tmp_path / "cache" / "shards").glob("*.images.parquet"))  # no image marked skipped


def test_missing_split_folder_is_announced(dataset, tmp_path, capsys):
    import shutil

    shutil.rmtree(dataset / "test")
    build.run(_config(dataset, tmp_path / "cache"))
    assert "skipping the test split" in capsys.readouterr().out
    assert set(CellCache(tmp_path / "cache").images["split"]) == {"train"}


def test_two_parts_merge_to_the_single_part_cache(dataset, tmp_path):
    whole = _config(dataset, tmp_path / "whole")
    build.run(whole)
    parts = [
        _config(dataset, tmp_path / "parts", "cache.num_shards=2", f"cache.shard_index={i}") for i in (0, 1)
    ]
    build.run(parts[0])
    with pytest.raises(ValueError, match="part\\(s\\) 1 of 2"):
        build.merge(parts[0])
    build.run(parts[1])
    build.merge(parts[1])
    _assert_same(_content(tmp_path / "parts"), _content(tmp_path / "whole"))


def test_worker_pool_gives_the_same_cache(dataset, tmp_path, monkeypatch):
    # spawned workers import the real segmenter (a monkeypatch does not cross into them): use it in both
    monkeypatch.setattr(build, "segment_image", segment_image)
    build.run(_config(dataset, tmp_path / "one"))
    build.run(_config(dataset, tmp_path / "two", "cache.workers=2"))
    _assert_same(_content(tmp_path / "two"), _content(tmp_path / "one"))


# -- reader and loader ---------------------------------------------------------------------------------


def test_a_batched_network_that_fails_to_load_stops_the_cache(dataset, tmp_path, monkeypatch):
    """The batched path (one process runs the network, ``weakcell.cache.batched``) stops on a model that
    fails to load too, instead of marking every image skipped: HPA-Cell-Segmentation's files are there (the
    check before the stage passes) but hold no network."""
    from weakcell.errors import BackendError

    monkeypatch.delenv("WEAKCELL_HPACELLSEG_WEIGHTS", raising=False)
    weights = tmp_path / "weights"
    weights.mkdir()
    for stem in ("dpn_unet_nuclei_v1", "dpn_unet_cell_3ch_v1"):
        (weights / f"{stem}.safetensors").write_bytes(b"not a safetensors file")
    cfg = _config(
        dataset,
        tmp_path / "cache",
        "segment.backend=hpacellseg",
        f"segment.hpacellseg.weights={weights}",
        "segment.hpacellseg.device=cpu",
        "cache.batched=always",
    )
    with pytest.raises(BackendError, match=r"segment\.backend='hpacellseg' cannot start.*dpn_unet_nuclei_v1"):
        build.run(cfg)
    assert not list((tmp_path / "cache" / "shards").glob("*.images.parquet"))  # no image marked skipped


@pytest.fixture
def cache(dataset, tmp_path):
    build.run(_config(dataset, tmp_path / "cache"))
    return CellCache(tmp_path / "cache")


def test_reader_returns_crops_in_the_order_asked(cache):
    everything = cache.crops(np.arange(len(cache)))
    order = np.random.default_rng(1).permutation(len(cache))[:9]
    np.testing.assert_array_equal(cache.crops(order), everything[order])
    with pytest.raises(IndexError):
        cache.crops([len(cache)])


def test_symmetries_are_the_eight_of_the_square():
    crop = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(1, 2, 3, 3)
    images = [apply_symmetries(crop, np.array([code]))[0, 0] for code in range(8)]
    expected = [np.rot90(m, k) for m in (crop[0, 0], crop[0, 0].T) for k in range(4)]
    assert sorted(i.tobytes() for i in images) == sorted(e.tobytes() for e in expected)
    for code in (1, 2, 4):  # each generator undoes itself
        once = apply_symmetries(crop, np.array([code]))
        np.testing.assert_array_equal(apply_symmetries(once, np.array([code])), crop)


def test_gains_stay_in_range():
    crops = torch.full((2, 4, 3, 3), 200, dtype=torch.uint8)
    gains = torch.tensor([[1.0, 0.5, 1.5, 0.0], [1.0, 1.0, 1.0, 1.0]])
    scaled = scale_channels(crops, gains)
    assert scaled.dtype == torch.uint8
    assert scaled[0, :, 0, 0].tolist() == [200, 100, 255, 0]
    assert torch.equal(scaled[1], crops[1])


def test_augmented_batches_keep_content(cache):
    crops = cache.crops(np.arange(len(cache)))
    own = crops.copy()
    both = augment_batch_(own, CropAugment(intensity=0.5)).numpy()
    assert np.shares_memory(both, own) and both.dtype == np.uint8  # in place: the batch is the read buffer
    # Symmetries move pixels and gains never light up a zero: background never shrinks.
    assert ((both == 0).sum(axis=(2, 3)) >= (crops == 0).sum(axis=(2, 3))).all()
    moved = augment_batch_(crops.copy(), CropAugment(intensity=0.0)).numpy()
    # Geometry only moves pixels: each crop's multiset of values per channel is unchanged.
    np.testing.assert_array_equal(
        np.sort(moved.reshape(*moved.shape[:2], -1), axis=-1),
        np.sort(crops.reshape(*crops.shape[:2], -1), axis=-1),
    )
    jittered = augment_batch_(crops.copy(), CropAugment(symmetries=False, intensity=0.3)).numpy().astype(int)
    ratio = jittered.sum(axis=(2, 3)) / np.maximum(crops.astype(int).sum(axis=(2, 3)), 1)
    assert ((ratio > 0.65) & (ratio < 1.35) | (crops.sum(axis=(2, 3)) == 0)).all()


def test_loader_yields_every_cell_once_per_epoch(cache):
    loader = make_loader(CellCrops(cache, augment=CropAugment()), batch_size=8)
    seen = []
    for batch in loader:
        assert batch["crops"].dtype == torch.uint8 and batch["crops"].shape[1:] == (4, SIZE, SIZE)
        assert batch["index"].dtype == torch.int64 and len(batch["index"]) == len(batch["crops"])
        seen.extend(batch["index"].tolist())
    assert sorted(seen) == list(range(len(cache)))


def test_bag_sampler_batches_whole_images(cache):
    dataset = CellCrops(cache, indices=np.flatnonzero(cache.cells["split"] == "train"))
    image_ids = cache.cells["image_id"].to_numpy()[dataset.indices]
    sampler = BagSampler(image_ids, images_per_batch=2, seed=3)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 2  # 4 train images with cells
    for positions in batches:
        chosen = set(image_ids[positions])
        assert len(positions) == np.isin(image_ids, list(chosen)).sum() and len(chosen) <= 2
    batch = dataset.__getitems__(batches[0])
    assert set(cache.cells.loc[batch["index"].numpy(), "image_id"]) == set(image_ids[batches[0]])


def test_sorted_and_unsorted_symmetry_codes_agree():
    crops = np.random.default_rng(2).integers(0, 256, (40, 4, 5, 5), dtype=np.uint8)
    codes = np.random.default_rng(3).integers(0, 8, 40)
    order = np.argsort(codes, kind="stable")
    np.testing.assert_array_equal(
        apply_symmetries(crops, codes)[order], apply_symmetries(crops[order], codes[order])
    )


def test_augmented_crops_stay_with_their_index(cache):
    torch.manual_seed(0)
    batch = CellCrops(cache, augment=CropAugment(intensity=0.0)).__getitems__(list(range(len(cache))))
    originals = cache.crops(batch["index"].numpy())
    for crop, original in zip(batch["crops"].numpy(), originals):
        variants = [apply_symmetries(original[None], np.array([code]))[0] for code in range(8)]
        assert any(np.array_equal(crop, variant) for variant in variants)


def test_bags_and_a_cache_without_cells(cache, dataset, tmp_path):
    bags = cache.bags()
    assert {k: len(v) for k, v in bags.items()} == {k: n for k, n in {**TRAIN, **TEST}.items() if n}
    for image_id, positions in bags.items():
        assert (cache.cells.loc[positions, "image_id"] == image_id).all()
    black = tmp_path / "black"
    write_image(black / "train", "dark", np.zeros((4, 20, 30), np.uint8))
    pd.DataFrame({"ID": ["dark"], "Label": ["18"]}).to_csv(black / "train.csv", index=False)
    build.run(_config(black, tmp_path / "black-cache"))
    empty = CellCache(tmp_path / "black-cache")
    assert len(empty) == 0 and empty.crop_size == SIZE and empty.crops([]).shape == (0, 4, SIZE, SIZE)
    assert empty.images[["image_id", "n_cells", "status"]].values.tolist() == [["dark", 0, "ok"]]


def test_hundreds_of_tiny_cells_keep_16_bit_masks(tmp_path):
    image = np.zeros((4, 40, 40), np.uint8)
    image[:, ::2, ::2] = 255  # 400 isolated one-pixel cells: more than an 8-bit mask holds
    write_image(tmp_path / "data" / "train", "dots", image)
    pd.DataFrame({"ID": ["dots"], "Label": ["0"]}).to_csv(tmp_path / "data" / "train.csv", index=False)
    cfg = _config(tmp_path / "data", tmp_path / "cache")
    build.run(cfg)
    cache = CellCache(cfg.cache_dir)
    assert len(cache) == 400 and cache.images["n_cells"].tolist() == [400]
    np.testing.assert_array_equal(cache.masks("dots").cells, fake_segment(image, None).cells)
    assert (cache.crops(np.arange(400)).reshape(400, -1).max(axis=1) > 0).all()


def test_changed_segmentation_settings_are_refused(dataset, tmp_path):
    build.run(_config(dataset, tmp_path / "c"))
    with pytest.raises(ValueError, match=r"segment\.postprocess\.min_cell_area: 0 -> 5.*FORCE=1"):
        build.run(_config(dataset, tmp_path / "c", "segment.postprocess.min_cell_area=5"))
    build.run(_config(dataset, tmp_path / "c", "segment.postprocess.min_cell_area=5", "force=true"))
    build.run(_config(dataset, tmp_path / "c", "segment.postprocess.min_cell_area=5", "cache.workers=1"))


def test_an_id_in_two_splits_is_refused_rather_than_miscounted(dataset, tmp_path, capsys):
    """Issue 26: test copies of training images under their training IDs printed "21806 images (21808
    processed now)", and one split's row of each such image silently vanished from images.parquet (rows,
    masks and predictions are keyed by the ID alone). It is now refused, naming the ID and the way out."""
    write_image(dataset / "test", "img-a", read_image(dataset / "train", "img-a"))
    with pytest.raises(
        StageError, match=r"1 image ID\(s\) are in more than one split \(train, test\), e\.g\. img-a"
    ):
        build.run(_config(dataset, tmp_path / "cache"))
    (dataset / "test" / "img-a_red.png").rename(dataset / "test" / "copy-a_red.png")
    for channel in ("green", "blue", "yellow"):
        (dataset / "test" / f"img-a_{channel}.png").rename(dataset / "test" / f"copy-a_{channel}.png")
    build.run(_config(dataset, tmp_path / "cache"))
    assert "8 images (8 processed now, 0 cached before)" in capsys.readouterr().out
    assert len(CellCache(tmp_path / "cache").images) == 8
