"""Classical segmentation backend, post-processing rules and instance-matching metrics."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from weakcell.config import PostprocessConfig, SegmentConfig
from weakcell.segment import Segmentation, segment_image
from weakcell.segment.classical import (
    _upscale_labels,
    _upscale_weights,
    segment,
    segment_cells,
    segment_nuclei,
    smooth_borders,
)
from weakcell.segment.metrics import match_at_thresholds, match_instances
from weakcell.segment.postprocess import fill_holes, mark_postprocessed, postprocess

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
NUCLEUS_RADIUS, CELL_RADIUS = 12, 28  # pixels of the hand-drawn test images
CENTRES = [(50, 50), (50, 170), (170, 60), (160, 180)]


def disc(shape: tuple[int, int], centre: tuple[int, int], radius: float) -> np.ndarray:
    """Boolean disc of ``radius`` pixels around ``centre`` (row, col)."""
    rows, cols = np.ogrid[: shape[0], : shape[1]]
    return (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= radius**2


def cells_image(centres=CENTRES, size: int = 224) -> np.ndarray:
    """``(4, size, size)`` uint8: a blue nucleus and a red/yellow/green cell body around every centre."""
    image = np.zeros((4, size, size), dtype=np.uint8)
    rng = np.random.default_rng(0)
    for centre in centres:
        body = disc((size, size), centre, CELL_RADIUS)
        image[0][body] = 120  # red
        image[3][body] = 90  # yellow
        image[1][body] = 40  # green
        image[2][disc((size, size), centre, NUCLEUS_RADIUS)] = 200  # blue
    noise = rng.integers(0, 6, image.shape, dtype=np.uint8)
    return np.clip(image.astype(np.int16) + noise, 0, 255).astype(np.uint8)


def small_config(**classical) -> SegmentConfig:
    """Config for the hand-drawn images: nucleus diameter of the drawing, working scale 0.5."""
    return SegmentConfig(
        classical={"nucleus_diameter": 2 * NUCLEUS_RADIUS, "working_scale": 0.5, **classical}
    )


# -- classical backend ------------------------------------------------------------------------------------


@pytest.mark.parametrize("working_scale", [0.5, 1.0])
def test_classical_finds_every_cell_at_full_resolution(working_scale):
    image = cells_image()
    seg = segment(image, small_config(working_scale=working_scale))
    assert seg.cells.dtype == np.int32 and seg.nuclei.dtype == np.int32
    assert seg.cells.shape == seg.nuclei.shape == image.shape[1:]
    assert seg.n_cells == len(CENTRES)
    assert sorted(np.unique(seg.cells)) == list(range(len(CENTRES) + 1))
    for centre in CENTRES:  # each drawn cell is one predicted cell, its nucleus labelled like it
        label = seg.cells[centre]
        assert label > 0 and seg.nuclei[centre] == label
        assert (
            match_instances(seg.cells == label, disc(image.shape[1:], centre, CELL_RADIUS))["mean_iou"] > 0.8
        )


def test_classical_nuclei_lie_inside_their_cells():
    seg = segment_image(cells_image(), small_config())
    inside = seg.nuclei > 0
    assert inside.any()
    np.testing.assert_array_equal(seg.nuclei[inside], seg.cells[inside])
    assert set(np.unique(seg.nuclei)) == set(np.unique(seg.cells))


def test_classical_black_image_has_no_cells():
    seg = segment_image(np.zeros((4, 128, 160), dtype=np.uint8), small_config())
    assert seg.n_cells == 0 and seg.cells.shape == (128, 160) and not seg.nuclei.any()


def test_classical_rejects_wrong_shape():
    with pytest.raises(ValueError, match=r"\(4, H, W\)"):
        segment(np.zeros((3, 32, 32), dtype=np.uint8), small_config())


def test_nuclei_split_touching_pair_but_not_one_lobed_nucleus():
    shape = (128, 160)
    # Two overlapping nuclei of radius 16: the neck is ~8 px shallower than the peaks (half a radius).
    pair = (disc(shape, (64, 58), 16) | disc(shape, (64, 86), 16)).astype(np.uint8) * 180
    # One kidney-shaped nucleus: neck only ~1.5 px below the peak.
    lobed = (disc(shape, (64, 70), 22) | disc(shape, (64, 86), 22)).astype(np.uint8) * 180
    assert segment_nuclei(pair, diameter=32, split_depth=0.3).max() == 2
    assert segment_nuclei(lobed, diameter=32, split_depth=0.3).max() == 1
    assert segment_nuclei(pair, diameter=32, split_depth=1.0).max() == 1  # deeper than the neck: kept whole


def blurred_nuclei(shape: tuple[int, int], discs: list[tuple[int, int, float]], seed: int = 0) -> np.ndarray:
    """uint16 plane: background 20, discs of radius 12 at (row, col, brightness), blurred like a microscope
    (sigma 2.5 px: halos, and a dim bridge across a narrow gap) plus a little noise."""
    plane = np.full(shape, 20.0, dtype=np.float32)
    for row, col, brightness in discs:
        plane[disc(shape, (row, col), 12)] = brightness
    noise = np.random.default_rng(seed).normal(0, 2, shape)
    return np.clip(cv2.GaussianBlur(plane, (0, 0), 2.5) + noise, 0, 255).astype(np.uint16)


def truth_of(shape: tuple[int, int], discs: list[tuple[int, int, float]]) -> np.ndarray:
    truth = np.zeros(shape, dtype=np.int32)
    for label, (row, col, _) in enumerate(discs, start=1):
        truth[disc(shape, (row, col), 12)] = label
    return truth


def test_nuclei_local_contrast_trims_the_halo_of_a_touching_pair():
    shape, discs = (128, 160), [(64, 60, 150), (64, 86, 150)]  # 2 px apart, bridged by the blur
    plane, truth = blurred_nuclei(shape, discs), truth_of(shape, discs)
    trimmed = match_instances(segment_nuclei(plane, diameter=24), truth)
    assert trimmed["tp"] == 2 and trimmed["fp"] == 0 and trimmed["mean_iou"] > 0.85, trimmed
    # The log-Otsu threshold alone sits in the halo: both are found, but fat.
    log_only = match_instances(segment_nuclei(plane, diameter=24, local_contrast=0.0), truth)
    assert log_only["tp"] == 2 and log_only["mean_iou"] < 0.8, log_only


def test_nuclei_local_contrast_keeps_a_dim_nucleus_beside_a_bright_one():
    shape, discs = (128, 160), [(64, 60, 220), (64, 92, 60)]  # 3.7x dimmer, 8 px apart
    result = match_instances(
        segment_nuclei(blurred_nuclei(shape, discs), diameter=24), truth_of(shape, discs)
    )
    assert result["tp"] == 2 and result["fp"] == 0 and result["mean_iou"] > 0.8, result


# -- cell borders ------------------------------------------------------------------------------------------

# Two cells side by side in one band of cytoplasm (rows 8-55): bar-shaped nuclei (so the distance to the
# nearest nucleus depends on the column only) with inner edges at columns 37 and 92, and a dim gap at
# columns 78-81, off the halfway column 65 (27 px from both nuclei) towards nucleus 2 (14 px from it).
GAP = (78, 81)
DIAMETER = 16.0


def gap_image() -> tuple[np.ndarray, np.ndarray]:
    """``(4, 64, 130)`` uint8 image (red = yellow = 150 in the band, 30 in the gap, 0 outside) and its
    nuclei labels (1: columns 24-37, 2: columns 92-105, rows 16-47)."""
    image = np.zeros((4, 64, 130), dtype=np.uint8)
    for channel in (0, 3):  # red, yellow
        image[channel, 8:56, 4:126] = 150
        image[channel, 8:56, GAP[0] : GAP[1] + 1] = 30
    nuclei = np.zeros((64, 130), dtype=np.int32)
    nuclei[16:48, 24:38], nuclei[16:48, 92:106] = 1, 2
    image[2][nuclei > 0] = 200
    return image, nuclei


def border_columns(cells: np.ndarray, rows: slice) -> set[int]:
    """Last column of cell 1 in each of ``rows`` (where cell 2 begins, one further)."""
    return {int(np.flatnonzero(row == 1).max()) for row in cells[rows]}


def test_cell_border_falls_in_the_dim_gap_not_halfway_between_nuclei():
    """By hand: the relief is ``w * d / diameter - log1p(s) / log1p(300)`` (``d`` = px to the nearest
    nucleus, ``s`` = red + yellow). Cell 1's front reaches every bright pixel left of the gap by crossing
    the halfway ridge, ``w * 27 / 16 - 1``; cell 2's must climb onto the gap, ``w * 14 / 16 - 0.72``
    (log1p(60) / log1p(300) = 0.72). Cell 1 wins the bright side while ``w * 13 / 16 < 0.28``: w = 0.25
    (the default) puts the border in the gap, w = 0.5 lets cell 2 cross it and meet cell 1 halfway."""
    image, nuclei = gap_image()
    cfg = SegmentConfig().classical
    assert cfg.distance_weight == 0.25
    on_gap = segment_cells(image, nuclei, cfg, DIAMETER)
    assert border_columns(on_gap, slice(16, 48)) <= set(range(GAP[0] - 1, GAP[1] + 1))
    heavy_tilt = segment_cells(image, nuclei, cfg.model_copy(update={"distance_weight": 0.5}), DIAMETER)
    assert max(border_columns(heavy_tilt, slice(16, 48))) < GAP[0] - 4


def test_gap_enclosed_by_several_cells_stays_background_hole_in_one_cell_is_filled():
    """Four cells in a 2x2 block of cytoplasm around a dark square (a gap between cells): it stays
    background. A dark square inside one cell's body (a dim spot of its own cytoplasm) becomes that cell
    once the ``fill_holes`` rule runs (``segment``)."""
    image = np.zeros((4, 96, 96), dtype=np.uint8)
    image[0, 8:88, 8:88] = image[3, 8:88, 8:88] = 150
    image[0, 42:54, 42:54] = image[3, 42:54, 42:54] = 0  # the gap between the four cells
    nuclei = np.zeros((96, 96), dtype=np.int32)
    for label, (row, col) in enumerate([(24, 24), (24, 72), (72, 24), (72, 72)], start=1):
        nuclei[disc((96, 96), (row, col), 6)] = label
    image[2][nuclei > 0] = 200
    cells = segment_cells(image, nuclei, SegmentConfig().classical, 12.0)
    assert set(np.unique(cells)) == {0, 1, 2, 3, 4}
    assert not cells[43:53, 43:53].any()  # the gap (one pixel in from its edge: borders are smoothed)
    image[0, 42:54, 42:54] = image[3, 42:54, 42:54] = 150  # gap closed ...
    image[0, 12:18, 12:18] = image[3, 12:18, 12:18] = 0  # ... and a dark spot inside cell 1
    seg = segment(image, SegmentConfig(classical={"nucleus_diameter": 12.0, "working_scale": 1.0}))
    assert seg.n_cells == 4 and (seg.cells[12:18, 12:18] == seg.cells[24, 24]).all()


def test_smooth_borders_removes_a_one_pixel_tooth_and_keeps_straight_borders():
    """Labels 1 | 2 split at column 9.5, a tooth of 2 at (10, 9), a pinhole of background at (4, 3), and
    background below row 16. Gaussian sigma 1 (cv2's 7-tap kernel: centre weight 0.40, the taps beyond
    half a pixel on one side sum to 0.30): at the tooth, label 2 weighs 0.30 + 0.40**2 = 0.46 < 0.5, so
    it goes to 1; on a straight border the near side weighs 0.70 and keeps it; the pinhole goes to 1
    (0.84). A nucleus pixel keeps its cell whatever the vote."""
    cells = np.zeros((22, 20), dtype=np.int32)
    cells[:16, :10], cells[:16, 10:] = 1, 2
    cells[10, 9], cells[4, 3] = 2, 0
    expected = cells.copy()
    expected[10, 9], expected[4, 3] = 1, 1
    np.testing.assert_array_equal(smooth_borders(cells, np.zeros_like(cells), 1.0), expected)
    nuclei = np.zeros_like(cells)
    nuclei[10, 9] = 2
    assert smooth_borders(cells, nuclei, 1.0)[10, 9] == 2
    np.testing.assert_array_equal(smooth_borders(cells, nuclei, 0.0), cells)  # 0 = off


# -- post-processing ----------------------------------------------------------------------------------------

RULES_OFF = PostprocessConfig(
    drop_cells_without_nucleus=False, drop_border_cells_with_small_nucleus=False, fill_holes=False
)


def test_fill_holes_fills_enclosed_background_of_one_cell_only():
    cells = np.zeros((40, 60), dtype=np.int32)
    cells[5:25, 5:25] = 1
    cells[10:15, 10:15] = 0  # a hole inside cell 1
    cells[5:25, 30:40] = 2
    cells[5:25, 42:52] = 3
    cells[5:8, 40:42] = 2
    cells[22:25, 40:42] = 3
    cells[10:15, 40:42] = 0  # a gap enclosed by cells 2 and 3: stays background
    filled = fill_holes(cells)
    assert (filled[10:15, 10:15] == 1).all()
    assert (filled[10:15, 40:42] == 0).all()
    assert (postprocess(Segmentation(cells, cells * 0), RULES_OFF).cells[10:15, 10:15] == 0).all()


def test_drop_cells_without_nucleus_and_relabel_consistently():
    cells = np.zeros((30, 30), dtype=np.int32)
    nuclei = np.zeros_like(cells)
    cells[2:10, 2:10], nuclei[4:6, 4:6] = 3, 3
    cells[12:20, 2:10] = 5  # no nucleus
    cells[12:20, 12:20], nuclei[14:16, 14:16] = 7, 7
    result = postprocess(
        Segmentation(cells, nuclei), RULES_OFF.model_copy(update={"drop_cells_without_nucleus": True})
    )
    assert result.n_cells == 2
    assert result.cells[5, 5] == 1 and result.cells[15, 15] == 2 and result.cells[15, 5] == 0
    assert result.nuclei[5, 5] == 1 and result.nuclei[15, 15] == 2
    kept = postprocess(Segmentation(cells, nuclei), RULES_OFF)
    assert kept.n_cells == 3 and kept.cells[15, 5] == 2 and kept.nuclei[15, 15] == 3


def test_drop_border_cells_with_small_nucleus():
    cells = np.zeros((60, 60), dtype=np.int32)
    nuclei = np.zeros_like(cells)
    for label, (row, col) in enumerate([(15, 15), (15, 40), (40, 15)], start=1):  # interior, 6x6 nuclei
        cells[row - 8 : row + 8, col - 8 : col + 8] = label
        nuclei[row - 3 : row + 3, col - 3 : col + 3] = label
    cells[45:60, 45:60], nuclei[57:60, 57:60] = 4, 4  # on the border, nucleus 9 px < half of 36
    cells[0:8, 50:60], nuclei[0:5, 54:60] = 5, 5  # on the border, nucleus 30 px >= half of 36
    rule = RULES_OFF.model_copy(update={"drop_border_cells_with_small_nucleus": True})
    result = postprocess(Segmentation(cells, nuclei), rule)
    assert result.n_cells == 4 and result.cells[50, 50] == 0 and result.cells[2, 55] == 4
    twice = postprocess(result, rule)  # idempotent: the interior median does not move
    np.testing.assert_array_equal(twice.cells, result.cells)
    assert postprocess(Segmentation(cells, nuclei), RULES_OFF).n_cells == 5


def test_min_cell_area():
    cells = np.zeros((30, 30), dtype=np.int32)
    cells[0:10, 0:10] = 1  # 100 px
    cells[20:24, 20:24] = 2  # 16 px
    result = postprocess(
        Segmentation(cells, cells.copy()), RULES_OFF.model_copy(update={"min_cell_area": 50})
    )
    assert result.n_cells == 1 and not result.cells[20:24, 20:24].any()


@pytest.mark.parametrize(
    ("small", "full"), [((28, 28), (224, 224)), ((37, 53), (150, 211)), ((5, 9), (5, 40))]
)
def test_upscaled_labels_match_cv2_nearest(small, full):
    labels = np.random.default_rng(1).integers(0, 70_000, small).astype(np.int32)
    rows, cols = _upscale_weights(small[0], full[0]), _upscale_weights(small[1], full[1])
    assert rows.sum() == full[0] and cols.sum() == full[1]
    expected = cv2.resize(labels, full[::-1], interpolation=cv2.INTER_NEAREST)
    upscaled = _upscale_labels(labels, rows, cols)
    assert upscaled.dtype == np.int32 and upscaled.flags.c_contiguous
    np.testing.assert_array_equal(upscaled, expected)


@pytest.mark.parametrize("working_scale", [0.3, 0.5, 1.0])
@pytest.mark.parametrize(
    "rules",
    [
        {},
        {"min_cell_area": 1500},
        {"drop_border_cells_with_small_nucleus": True},
        {"fill_holes": False, "drop_cells_without_nucleus": False},
    ],
)
def test_rules_at_working_scale_equal_rules_at_full_resolution(working_scale, rules):
    """The classical backend post-processes its small labels and marks the upscaled result; running every
    rule again over the full-resolution masks must change nothing, so skipping that pass is exact."""
    centres = [*CENTRES, (5, 110), (218, 120)]  # two cells cut by the border
    image = cells_image(centres)
    image[2][disc(image.shape[1:], (218, 120), 3)] = 0  # a small nucleus on the border
    cfg = small_config(working_scale=working_scale).model_copy(
        update={"postprocess": PostprocessConfig(**rules)}
    )
    seg = segment(image, cfg)
    assert segment_image(image, cfg).n_cells == seg.n_cells
    again = postprocess(Segmentation(seg.cells.copy(), seg.nuclei.copy()), cfg.postprocess)  # unmarked copy
    np.testing.assert_array_equal(again.cells, seg.cells)
    np.testing.assert_array_equal(again.nuclei, seg.nuclei)


def test_mark_is_void_for_other_rules_or_replaced_arrays():
    cells = np.zeros((30, 30), dtype=np.int32)
    cells[2:10, 2:10], cells[12:20, 12:20] = 1, 2
    nuclei = np.where(cells == 1, 1, 0).astype(np.int32)  # cell 2 has no nucleus
    rule = RULES_OFF.model_copy(update={"drop_cells_without_nucleus": True})
    seg = mark_postprocessed(Segmentation(cells, nuclei), RULES_OFF)
    assert postprocess(seg, RULES_OFF) is seg  # marked for these rules: returned as is
    assert postprocess(seg, rule).n_cells == 1  # other rules: applied
    seg.cells = cells.copy()
    assert postprocess(seg, RULES_OFF) is not seg  # replaced array: the mark no longer holds


# -- metrics -----------------------------------------------------------------------------------------------


def test_identical_masks_score_one():
    labels = segment_image(cells_image(), small_config()).cells
    result = match_instances(labels, labels, 0.5)
    assert result["f1"] == 1.0 and result["mean_iou"] == pytest.approx(1.0)
    assert result["tp"] == len(CENTRES) and result["fp"] == result["fn"] == 0


def test_iou_just_under_and_over_threshold_changes_tp():
    true = np.zeros((10, 100), dtype=np.int32)
    true[:, :50] = 1  # 500 px
    pred = np.zeros_like(true)
    pred[:, :30] = 1  # IoU 300 / 500 = 0.6 exactly
    assert match_instances(pred, true, 0.6)["tp"] == 1
    pred[:, 29] = 0  # IoU 290 / 500 = 0.58
    result = match_instances(pred, true, 0.6)
    assert result["tp"] == 0 and result["fp"] == 1 and result["fn"] == 1 and result["f1"] == 0.0
    assert [r["tp"] for r in match_at_thresholds(pred, true, (0.5, 0.6))] == [1, 0]


def test_one_to_one_matching_and_empty_masks():
    true = np.zeros((10, 40), dtype=np.int32)
    true[:, :20], true[:, 20:] = 1, 2
    pred = np.zeros_like(true)
    pred[:, 5:35] = 4  # overlaps both halves at IoU 0.375 each: at most one match at a low threshold
    assert match_instances(pred, true, 0.3)["tp"] == 1
    empty = np.zeros_like(true)
    assert match_instances(empty, true)["fn"] == 2 and match_instances(empty, true)["f1"] == 0.0
    assert match_instances(pred, empty)["fp"] == 1 and match_instances(pred, empty)["recall"] == 0.0
    assert match_instances(empty, empty)["f1"] == 1.0


# -- real data -------------------------------------------------------------------------------------------


def test_nucleus_step_on_real_dsb2018_nuclei():
    folder = SHARED / "dsb2018_nuclei"
    if not (folder / "img2d.tif").is_file():
        pytest.skip(f"DSB 2018 nuclei not found in {folder} (a fresh clone has no ../shared)")
    tifffile = pytest.importorskip("tifffile")
    plane = tifffile.imread(folder / "img2d.tif")
    truth = tifffile.imread(folder / "mask2d.tif").astype(np.int32)
    # 125 hand-annotated nuclei ~24 px across, many touching; the log-Otsu threshold alone scored 0.71.
    result = match_instances(segment_nuclei(plane, diameter=24), truth, 0.5)
    assert result["f1"] >= 0.85, result


def test_classical_on_real_hpa_image_matches_reference():
    folder = SHARED / "hpa2021"
    image_id = "f0ac7116-bb99-11e8-b2b9-ac1f6b6435d0"  # the densest of the five, 46 reference cells
    if not (folder / "train" / f"{image_id}_blue.png").is_file():
        pytest.skip(f"real HPA data not found in {folder} (a fresh clone has no ../shared)")
    from weakcell.data.images import read_image

    # The whole field of view shrunk to 512² rather than a 512² crop: HPA cells are ~300 px across at
    # 2048², so a crop holds almost no whole cell and its score would measure the crop, not the method.
    image = np.stack(
        [
            cv2.resize(p, (512, 512), interpolation=cv2.INTER_AREA)
            for p in read_image(folder / "train", image_id)
        ]
    )
    reference = cv2.imread(
        str(folder / "hpacellseg_masks" / f"{image_id}_predictedmask.png"), cv2.IMREAD_UNCHANGED
    )
    reference = cv2.resize(reference, (512, 512), interpolation=cv2.INTER_NEAREST).astype(np.int32)
    defaults = SegmentConfig().classical
    cfg = SegmentConfig(classical={"nucleus_diameter": defaults.nucleus_diameter / 4, "working_scale": 0.5})
    result = match_instances(segment_image(image, cfg).cells, reference, 0.5)
    assert result["f1"] >= 0.75, result
