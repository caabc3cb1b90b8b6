"""HPA-Cell-Segmentation without its weights: the post-processing against an upstream-equivalent reference,
the network against upstream's parameter list, the published whole-model pickles read without running
code, the backend end to end with weights made here, batching, and sizes that follow the image.

Figures (measured when written, 2048² maps built from the 5 real images' HPA-Cell-Segmentation masks,
``tests/hpacellseg_reference.py``): ``label_cell`` gives the reference's cell count on all 5 images, mean
matched IoU 0.99999-1.00000, 1-56 pixels of 4.2 M differing (watershed ties the two break in another order);
at 1024² (the fast tests) the same counts and at least 0.9999 pixel agreement. The label_cell tests run on
both flood paths: numba's bucket queue (where numba is installed) and scikit-image's watershed.
"""

from __future__ import annotations

import io
import os
import pickle
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from skimage.segmentation import watershed

from tests.conftest import HPA2021_IDS, shared_path
from tests.hpacellseg_models import (
    random_state,
    save_weights,
    thresholding_state,
    tiny_upstream_like,
    upstream_classes,
)
from tests.hpacellseg_reference import label_cell_reference, network_like_maps
from weakcell.config import SegmentConfig, load_config
from weakcell.data.images import read_image
from weakcell.errors import BackendError
from weakcell.segment import for_image, segment_image
from weakcell.segment.batched import batches, segment_batch
from weakcell.segment.cellpose_backend import resize_labels
from weakcell.segment.hpacellseg import backend, label_cell, labels
from weakcell.segment.hpacellseg.labels import _LEVELS, Sizes, _flood, _label_large
from weakcell.segment.hpacellseg.network import DPNUnet
from weakcell.segment.hpacellseg.pickles import MODULE_CLASSES, load_whole_model
from weakcell.segment.metrics import match_instances
from weakcell.weights import WeightsError

FIXTURE = Path(__file__).parent / "fixtures" / "hpacellseg_dpn_unet.json"
DENSE, SPARSE = "f0ac7116-bb99-11e8-b2b9-ac1f6b6435d0", "5c27f04c-bb99-11e8-b2b9-ac1f6b6435d0"


def real_maps(image_id: str, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Network-like maps at ``side``² of a real image, from its HPA-Cell-Segmentation mask."""
    folder = shared_path("hpa2021")
    cells = cv2.imread(
        str(folder / "hpacellseg_masks" / f"{image_id}_predictedmask.png"), cv2.IMREAD_UNCHANGED
    )
    blue = read_image(folder / "train", image_id)[2]
    if side != cells.shape[0]:
        cells = cv2.resize(cells, (side, side), interpolation=cv2.INTER_NEAREST)
        blue = cv2.resize(blue, (side, side), interpolation=cv2.INTER_AREA)
    return network_like_maps(cells, blue)


def assert_same_labels(ours: tuple[np.ndarray, np.ndarray], reference: tuple[np.ndarray, np.ndarray]) -> None:
    """Same cells and nuclei up to watershed ties: counts equal, matched IoU and pixel agreement ~1."""
    for mine, theirs in zip(ours, reference):
        theirs = theirs.astype(np.int32)
        assert len(np.unique(mine)) == len(np.unique(theirs))
        assert (mine == theirs).mean() >= 0.9999
        match = match_instances(mine, theirs, 0.5)
        assert match["f1"] == 1.0 and match["mean_iou"] >= 0.999, match
    assert ours[1].max() == reference[1].max()


# -- label_cell -------------------------------------------------------------------------------------------


@pytest.fixture(params=["compiled", "scikit-image"])
def flood_path(request, monkeypatch) -> str:
    """Each label_cell test on both floods: numba's bucket queue (skipped where numba is absent) and the
    scikit-image path Kaggle's image runs."""
    if request.param == "compiled":
        pytest.importorskip("numba", reason="numba (the segment extra) is not installed")
        assert labels._compiled_kernels() is not None
    monkeypatch.setattr(labels, "USE_COMPILED", request.param == "compiled")
    return request.param


@pytest.mark.parametrize("image_id", [DENSE, SPARSE])
@pytest.mark.usefixtures("flood_path")
def test_label_cell_gives_the_references_labels(image_id: str) -> None:
    nuclei_pred, cell_pred = real_maps(image_id, 1024)
    nuclei, cells = label_cell(nuclei_pred, cell_pred)
    assert nuclei.dtype == cells.dtype == np.int32
    assert_same_labels((nuclei, cells), label_cell_reference(nuclei_pred, cell_pred))
    inside = nuclei > 0
    assert (nuclei[inside] == cells[inside]).all()  # nucleus k lies in cell k


@pytest.mark.slow
@pytest.mark.parametrize("image_id", sorted(HPA2021_IDS))
@pytest.mark.usefixtures("flood_path")
def test_label_cell_gives_the_references_labels_at_full_resolution(image_id: str) -> None:
    nuclei_pred, cell_pred = real_maps(image_id, 2048)
    assert_same_labels(label_cell(nuclei_pred, cell_pred), label_cell_reference(nuclei_pred, cell_pred))


def grid_maps(rows: int, cols: int, cell: int = 90) -> tuple[np.ndarray, np.ndarray]:
    """Maps of ``rows`` x ``cols`` separate square cells of ``cell`` px, each with a round nucleus."""
    height, width = rows * cell, cols * cell
    cells = np.zeros((height, width), np.int32)
    nuclei = np.zeros((height, width), np.uint8)
    for k in range(rows * cols):
        y, x = (k // cols) * cell, (k % cols) * cell
        cells[y + 2 : y + cell - 2, x + 2 : x + cell - 2] = k + 1
        cv2.circle(nuclei, (x + cell // 2, y + cell // 2), cell // 3, 1, -1)
    maps = []
    for foreground in (nuclei > 0, cells > 0):
        pred = np.zeros((height, width, 3), np.uint8)
        pred[..., 2] = np.where(foreground, 250, 5)
        maps.append(pred)
    return maps[0], maps[1]


@pytest.mark.usefixtures("flood_path")
def test_more_than_255_cells_keep_their_own_labels() -> None:
    """Upstream casts the cell labels to uint8: cell 256 vanishes and 257.. merge with 1.. in the closing."""
    nuclei_pred, cell_pred = grid_maps(16, 20)
    nuclei, cells = label_cell(nuclei_pred, cell_pred)
    assert cells.max() == 320 and len(np.unique(cells)) == 321
    assert len(np.unique(nuclei)) == 321
    _, upstream_cells = label_cell_reference(nuclei_pred, cell_pred)
    assert upstream_cells.max() < 320  # the wrap the reimplementation leaves out


@pytest.mark.usefixtures("flood_path")
def test_sizes_follow_the_resolution() -> None:
    assert Sizes.at(1.0) == Sizes(500, 1000, 8, 2500, 5500, 6)
    half = Sizes.at(0.5)
    assert (half.nucleus, half.cell, half.closing_radius) == (625, 1375, 3)
    # the same grid at half the resolution, labelled with halved sizes: the same cells
    nuclei_pred, cell_pred = grid_maps(3, 4)
    small = [
        cv2.resize(pred, None, fx=0.5, fy=0.5, interpolation=cv2.INTER_AREA)
        for pred in (nuclei_pred, cell_pred)
    ]
    assert label_cell(*small, scale=0.5)[1].max() == label_cell(nuclei_pred, cell_pred)[1].max() == 12
    assert label_cell(*small)[1].max() == 0  # upstream's full-resolution sizes drop every half-size cell


def flood_by_height(heights: list[list[int]], markers: list[list[int]], settle_at: int) -> np.ndarray:
    """``_flood`` of a hand-made height map (the heights themselves, 0-255) settling at ``settle_at``,
    checked against scikit-image's watershed of the same map before it is returned."""
    levels, seeds = np.array(heights, np.uint8), np.array(markers, np.int32)
    mask = np.ones(levels.shape, bool)
    flooded = _flood(levels, _LEVELS, seeds.copy(), mask, settle_at=settle_at)  # the queue floods in place
    np.testing.assert_array_equal(flooded, watershed(levels.astype(float), seeds, mask=mask))
    return flooded


@pytest.mark.usefixtures("flood_path")
def test_settled_low_ground_keeps_the_watersheds_labels() -> None:
    """Marker 1 (left) and 2 (right); the flood rises to 5 on the left, 6 on the right. Under 2 each
    plateau holds one label and touches no pass: both are settled up front. The column of 9s and the 4 go
    to 1 (its side reaches them at level 5, the right one only at 6); the 6s to 2 (its plateau pushes them
    at level 2, the 4 only at 5)."""
    heights = [[0, 0, 5, 9, 6, 2, 2], [0, 0, 5, 9, 6, 2, 2], [0, 0, 5, 4, 6, 2, 2]]
    markers = [[0, 0, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0, 2], [0, 0, 0, 0, 0, 0, 0]]
    expected = [[1, 1, 1, 1, 2, 2, 2]] * 3
    np.testing.assert_array_equal(flood_by_height(heights, markers, settle_at=2), expected)


@pytest.mark.usefixtures("flood_path")
def test_a_pass_between_settled_components_is_flooded_in_order() -> None:
    """Heights 0 5 1 8 3 3, markers at both ends. Under 5 the left three hold marker 1 and the right two
    marker 2; the 8 between them is a pass. The flood reaches the 1 only at level 5 (over the 5) and the
    3 at level 3, so the 3 pushes the pass first: it goes to 2. Settled as a marker, the 1 would leave the
    heap at its own height, before the 3, and give the pass to 1: components at a pass stay unsettled."""
    flooded = flood_by_height([[0, 5, 1, 8, 3, 3]], [[1, 0, 0, 0, 0, 2]], settle_at=5)
    np.testing.assert_array_equal(flooded, [[1, 1, 1, 2, 2, 2]])


def test_large_components_are_numbered_in_raster_order() -> None:
    """measure.label, remove_small_objects (under 2 px), measure.label again: the lone corner pixel goes,
    the others are numbered by their first pixel, (0, 4) before (1, 1) before (3, 0)."""
    mask = np.array(
        [
            [1, 0, 0, 0, 1, 0],
            [0, 1, 1, 0, 1, 0],
            [0, 0, 0, 0, 1, 0],
            [1, 1, 1, 0, 0, 0],
        ],
        bool,
    )
    expected = [
        [0, 0, 0, 0, 1, 0],
        [0, 2, 2, 0, 1, 0],
        [0, 0, 0, 0, 1, 0],
        [3, 3, 3, 0, 0, 0],
    ]
    np.testing.assert_array_equal(_label_large(mask, 4, 2), expected)


def test_label_cell_refuses_other_inputs() -> None:
    pred = np.zeros((64, 64, 3), np.uint8)
    with pytest.raises(ValueError, match="nuclei_pred must be a uint8"):
        label_cell(pred.astype(np.float32), pred)
    with pytest.raises(ValueError, match="differ in shape"):
        label_cell(pred, pred[:32])


# -- the network and its files ---------------------------------------------------------------------------------


def test_network_has_upstreams_parameter_names_shapes_and_order() -> None:
    import json

    fixture = json.loads(FIXTURE.read_text())
    with torch.device("meta"):
        network = DPNUnet()
    ours = [
        [name, list(value.shape), str(value.dtype).removeprefix("torch.")]
        for name, value in network.state_dict().items()
    ]
    assert ours == fixture["parameters"]
    assert set(fixture["module_classes"]) <= MODULE_CLASSES


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("parallel", [False, True], ids=["plain", "dataparallel"])
def test_whole_model_pickles_load_without_their_classes(tmp_path: Path, legacy: bool, parallel: bool) -> None:
    path = tmp_path / "model.pth"
    with upstream_classes() as classes, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch cannot find the source of classes made here
        model, state = tiny_upstream_like(classes, parallel)
        torch.save(model, path, _use_new_zipfile_serialization=not legacy)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)  # why a restricted unpickler is needed
    loaded = load_whole_model(path)
    assert list(loaded) == list(state)
    for key, value in state.items():
        assert torch.equal(loaded[key], value) and loaded[key].shape == value.shape, key


class RunsCode:
    """Unpickling it would call ``os.system`` (or anything else its ``__reduce__`` names)."""

    def __init__(self, call: object, *args: object) -> None:
        self.call, self.args = call, args

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return self.call, self.args


@pytest.mark.parametrize(
    "payload",
    [
        lambda marker: RunsCode(os.system, f"touch {marker}"),
        lambda marker: RunsCode(Path.touch, marker),
        lambda marker: {"weights": RunsCode(eval, f"open({str(marker)!r}, 'w')")},
    ],
    ids=["os.system", "a method", "eval inside a dict"],
)
def test_a_pickle_that_calls_a_function_fails_in_one_line_and_runs_nothing(tmp_path: Path, payload) -> None:
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pth"
    torch.save(payload(marker), path)
    with pytest.raises(WeightsError) as caught:
        load_whole_model(path)
    message = str(caught.value)
    assert "\n" not in message and str(path) in message and "is not one of the classes" in message
    assert not marker.exists()


def test_an_allowed_class_called_with_arguments_is_refused(tmp_path: Path) -> None:
    """REDUCE on a module class (instead of NEWOBJ + state) must not reach any constructor."""
    with upstream_classes() as classes:
        evil = RunsCode(classes["DPNUnet"], "argument")
        data = io.BytesIO()
        pickle.Pickler(data, protocol=2).dump(evil)
    path = tmp_path / "evil.pth"
    torch.save(None, path)  # a valid zip ...
    import zipfile

    with zipfile.ZipFile(path) as archive:
        names = {name: archive.read(name) for name in archive.namelist()}
    pickle_name = next(name for name in names if name.endswith("data.pkl"))
    names[pickle_name] = data.getvalue()  # ... whose pickle calls a module class with an argument
    with zipfile.ZipFile(path, "w") as archive:
        for name, content in names.items():
            archive.writestr(name, content)
    with pytest.raises(WeightsError, match="not an HPA-Cell-Segmentation model file"):
        load_whole_model(path)


# -- the backend -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Iterator[Path]:
    """The two model files (safetensors) of a thresholding U-Net (``tests/hpacellseg_models.py``); 1 GB,
    removed after the module (pytest keeps its last temporary folders)."""
    folder = save_weights(tmp_path_factory.mktemp("hpacellseg"), thresholding_state(), thresholding_state())
    yield folder
    shutil.rmtree(folder)


def config(weights: Path | None, *overrides: str) -> SegmentConfig:
    where = [f"segment.hpacellseg.weights={weights}"] if weights else []
    return load_config(None, ["segment.backend=hpacellseg", *where, *overrides]).segment


def hpa_image(side: int, image_id: str = DENSE) -> np.ndarray:
    image = read_image(shared_path("hpa2021") / "train", image_id)
    return (
        image
        if side == 2048
        else np.stack([cv2.resize(p, (side, side), interpolation=cv2.INTER_AREA) for p in image])
    )


def test_missing_weights_name_both_files_and_every_place(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.delenv(backend.ENV_VAR, raising=False)
    backend._located.cache_clear()
    # a backend that cannot start is the configuration's fault: BackendError stops the stage (issue 26)
    with pytest.raises(BackendError) as caught:
        segment_image(np.zeros((4, 64, 64), np.uint8), config(None, "segment.hpacellseg.cell_model=2ch"))
    message = str(caught.value)
    assert "\n" not in message
    for text in (
        "dpn_unet_nuclei_v1.safetensors",
        "dpn_unet_cell_v2.safetensors",
        f"${backend.ENV_VAR}",
        "/kaggle/input/*",
        "make weights",
    ):
        assert text in message, text
    (tmp_path / "dpn_unet_nuclei_v1.safetensors").write_bytes(b"")  # only one of the two
    with pytest.raises(FileNotFoundError, match="dpn_unet_cell_3ch_v1") as caught:
        backend.locate_weights(config(tmp_path).hpacellseg)
    assert "dpn_unet_nuclei_v1" not in str(caught.value)


def test_weights_of_another_network_fail_naming_the_file(tmp_path: Path) -> None:
    state = {
        "final.0.weight": torch.zeros(2, 64, 3, 3),
        "final.0.bias": torch.zeros(2),
    }  # a 2-class head only
    save_weights(tmp_path, state, state)
    backend._networks.cache_clear()
    with pytest.raises(
        BackendError,
        match=r"dpn_unet_nuclei_v1.safetensors does not fit HPA-Cell-Segmentation's DPN-92 U-Net",
    ):
        segment_image(np.zeros((4, 64, 64), np.uint8), config(tmp_path))


# Small network inputs keep the 133 M-parameter U-Nets quick on a CPU: no 32-px border, 32-64 px sides.
QUICK = ("segment.hpacellseg.network_scale=0.125", "segment.hpacellseg.padding=false")


def test_segments_a_real_image_with_made_weights(weights: Path) -> None:
    image = hpa_image(512)
    seg = segment_image(image, config(weights, *QUICK))
    assert seg.cells.shape == seg.nuclei.shape == (512, 512) and seg.cells.dtype == np.int32
    assert seg.n_cells >= 5
    inside = seg.nuclei > 0
    assert (seg.nuclei[inside] == seg.cells[inside]).all()


@pytest.mark.slow
def test_the_published_whole_model_files_work_as_weights(tmp_path: Path, weights: Path) -> None:
    """The .pth files as Zenodo serves them (whole-model pickles with upstream's class paths) segment like
    their safetensors conversion."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        save_weights(tmp_path, thresholding_state(), thresholding_state(), whole_model=True)
    image = hpa_image(256)
    try:
        pickled = segment_image(image, config(tmp_path, *QUICK))
    finally:
        shutil.rmtree(tmp_path)
    converted = segment_image(image, config(weights, *QUICK))
    np.testing.assert_array_equal(pickled.cells, converted.cells)
    assert pickled.n_cells > 0


def test_batching_gives_each_image_its_own_masks(weights: Path) -> None:
    """Same-shape inputs share a batch, others wait for theirs; every image gets the masks it gets alone."""
    images = [hpa_image(384), hpa_image(256, SPARSE), hpa_image(384, SPARSE)]
    cfg = config(weights, *QUICK, "segment.hpacellseg.batch_size=2")
    together = segment_batch(images, cfg)
    for image, result in zip(images, together):
        alone = segment_image(image, cfg)
        np.testing.assert_array_equal(result.cells, alone.cells)
        np.testing.assert_array_equal(result.nuclei, alone.nuclei)
    assert batches([(1,), (2,), (1,), (1,), (2,)], 2) == [[0, 2], [3], [1, 4]]


def test_random_weights_run_end_to_end(tmp_path: Path) -> None:
    save_weights(tmp_path, random_state(1), random_state(2), cell_model="dpn_unet_cell_v2")
    try:
        seg = segment_image(hpa_image(128), config(tmp_path, "segment.hpacellseg.cell_model=2ch", *QUICK))
    finally:
        shutil.rmtree(tmp_path)  # 1 GB: pytest keeps its last temporary folders
    assert seg.cells.shape == (128, 128)


# -- sizes relative to the image -------------------------------------------------------------------------------


def test_for_image_rescales_sizes_and_scales() -> None:
    cfg = load_config("configs/hpa2021.yaml").segment
    assert cfg.reference_size == 2048
    assert for_image(cfg, (2048, 2048)) is cfg
    big = for_image(cfg, (4096, 4096))
    assert big.classical.nucleus_diameter == 2 * cfg.classical.nucleus_diameter
    assert big.classical.working_scale == cfg.classical.working_scale / 2
    assert big.hpacellseg.network_scale == 0.125 and big.hpacellseg.label_scale == 0.5
    small = for_image(
        cfg.model_copy(update={"postprocess": cfg.postprocess.model_copy(update={"min_cell_area": 1000})}),
        (1024, 1024),
    )
    assert small.postprocess.min_cell_area == 250 and small.hpacellseg.label_scale == 1.0  # never above 1
    odd = for_image(cfg, (3072, 3072))  # a factor that is not a power of two
    assert odd.classical.working_scale == pytest.approx(cfg.classical.working_scale / 1.5)
    absolute = cfg.model_copy(update={"reference_size": None})
    assert for_image(absolute, (1024, 1024)) is absolute  # unset: sizes in absolute pixels


@pytest.mark.parametrize("side", [1728, 3072, 4096])
def test_resized_copies_of_a_real_image_give_the_same_cells(side: int) -> None:
    """The classical default at HPA's sizes: with sizes in pixels of the 2048² reference, a resized copy
    gives the same cells (count, and matched IoU after resizing back). In absolute pixels (the old
    behaviour) the 3072² and 4096² copies split cells: 54 and 56 instead of 48."""
    image = hpa_image(2048)
    cfg = load_config("configs/hpa2021.yaml").segment
    reference = segment_image(image, cfg)
    resized = np.stack(
        [
            cv2.resize(plane, (side, side), interpolation=cv2.INTER_AREA if side < 2048 else cv2.INTER_LINEAR)
            for plane in image
        ]
    )
    seg = segment_image(resized, cfg)
    assert seg.n_cells == reference.n_cells
    match = match_instances(resize_labels(seg.cells, (2048, 2048)), reference.cells, 0.5)
    assert match["f1"] == 1.0 and match["mean_iou"] >= 0.97, match


def test_cache_runs_the_network_in_one_process_and_the_rest_in_workers(
    tmp_path: Path, weights: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``make cache`` with a learned backend: two workers decode and finish around the parent's network
    (the pool path) and write what one process alone writes."""
    from weakcell.cache import build
    from weakcell.data.images import write_image

    data = tmp_path / "data"
    ids = sorted(HPA2021_IDS)[:3]
    for side, image_id in zip((256, 256, 192), ids):
        write_image(data / "train", image_id, hpa_image(side, image_id))
    import pandas as pd

    pd.DataFrame({"ID": ids, "Label": ["0", "1", "2"]}).to_csv(data / "train.csv", index=False)
    tables = []
    for workers in (1, 2):
        cfg = load_config(
            None,
            [
                f"paths.root={tmp_path / str(workers)}",
                "data.dataset=hpa2021",
                f"data.dir={data}",
                "cache.splits=[train]",
                f"cache.workers={workers}",
                "cache.batched=always",  # on a CPU, auto runs the whole backend in each worker
                "cache.crop_size=32",
                "segment.backend=hpacellseg",
                f"segment.hpacellseg.weights={weights}",
                "segment.reference_size=2048",  # 256² copies of 2048² images: sizes / 8, network input 64²
                "segment.hpacellseg.network_scale=0.03125",
                "segment.hpacellseg.padding=false",
                "segment.hpacellseg.batch_size=2",
            ],
        )
        cache_dir = build.run(cfg)
        tables.append(pd.read_parquet(cache_dir / "cells.parquet").drop(columns=["shard", "row"]))
        masks = sorted((cache_dir / "masks").iterdir())
        assert len(masks) == 6
        # the workers hash what they decode, as the per-image path does: a second run has nothing to do
        images = pd.read_parquet(cache_dir / "images.parquet")
        assert (images["status"] == "ok").all() and (images["content_hash"].str.len() > 0).all()
        build.run(cfg)
        assert "(0 processed now" in capsys.readouterr().out
    pd.testing.assert_frame_equal(tables[0], tables[1])
    assert tables[0]["image_id"].nunique() == 3 and len(tables[0]) >= 6
