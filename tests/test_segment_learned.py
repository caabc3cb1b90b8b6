"""Learned backends (Cellpose-SAM, SAM refinement) on randomly initialised weights: no official weights are
on disk and none may be downloaded, so these tests check the code path, shapes, dtypes and labelling,
never mask quality. A tiny SAM encoder (2 blocks, 32 channels) keeps the default run fast; the real sizes
run under ``-m slow``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("cellpose")
pytestmark = pytest.mark.filterwarnings("ignore:Sparse invariant checks:UserWarning")  # inside cellpose
pytest.importorskip("segment_anything")

from segment_anything import sam_model_registry  # noqa: E402
from segment_anything.build_sam import _build_sam  # noqa: E402

from weakcell.config import SegmentConfig  # noqa: E402
from weakcell.errors import BackendError  # noqa: E402
from weakcell.segment import Segmentation, cellpose_backend, sam_refine  # noqa: E402
from weakcell.segment.sam_refine import Proposal, cell_windows, merge_proposals  # noqa: E402
from weakcell.weights import WeightsError  # noqa: E402


def tiny_sam(checkpoint: None = None) -> torch.nn.Module:
    """A SAM with a 2-block, 32-channel encoder: same structure and parameter names, ~1/1000 of the work."""
    return _build_sam(
        encoder_embed_dim=32,
        encoder_depth=2,
        encoder_num_heads=2,
        encoder_global_attn_indexes=[1],
        checkpoint=checkpoint,
    )


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Register the tiny encoder size, make any download attempt fail loudly, forget cached models."""
    import cellpose.models
    import cellpose.utils

    def no_download(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"a download was attempted: {args}")

    monkeypatch.setitem(sam_model_registry, "tiny", tiny_sam)
    monkeypatch.setattr(cellpose.models, "cache_model_path", no_download)
    monkeypatch.setattr(cellpose.utils, "download_url_to_file", no_download)
    for variable in (cellpose_backend.ENV_VAR, sam_refine.ENV_VAR):
        monkeypatch.delenv(variable, raising=False)
    for cached in (
        cellpose_backend._model,
        cellpose_backend._located,
        sam_refine._predictor,
        sam_refine._located,
    ):
        cached.cache_clear()


def random_cellpose_weights(path: Path, backbone: str) -> Path:
    """Random Cellpose-SAM weights of ``backbone`` size saved as a plain state dict (like ``cpsam``)."""
    torch.manual_seed(0)
    net = cellpose_backend._cpsam_skeleton(backbone).to_empty(device="cpu")
    for parameter in net.parameters():
        torch.nn.init.normal_(parameter, std=0.02)
    torch.save(net.state_dict(), path)
    return path


def random_sam_weights(path: Path, model_type: str) -> Path:
    torch.manual_seed(0)
    torch.save(sam_model_registry[model_type](None).state_dict(), path)
    return path


def hpa_like_image(size: int, seed: int = 0) -> np.ndarray:
    """``(4, size, size)`` uint8: noise plus bright blobs in every channel, so thresholds have something."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 40, (4, size, size), dtype=np.uint8)
    yy, xx = np.mgrid[:size, :size]
    for _ in range(6):
        cy, cx = rng.integers(size // 8, size - size // 8, 2)
        radius = size // 10
        blob = (yy - cy) ** 2 + (xx - cx) ** 2 < radius**2
        image[:, blob] = 200
    return image


def grid_cells(size: int, per_side: int) -> Segmentation:
    """Square cells on a grid with a square nucleus in each, at ``size``² resolution."""
    step = size // per_side
    cells = np.zeros((size, size), np.int32)
    nuclei = np.zeros_like(cells)
    for index in range(per_side * per_side):
        row, col = divmod(index, per_side)
        y0, x0 = row * step, col * step
        cells[y0 + step // 8 : y0 + step - step // 8, x0 + step // 8 : x0 + step - step // 8] = index + 1
        nuclei[y0 + step // 3 : y0 + 2 * step // 3, x0 + step // 3 : x0 + 2 * step // 3] = index + 1
    return Segmentation(cells=cells, nuclei=nuclei)


def assert_valid(seg: Segmentation, shape: tuple[int, int]) -> None:
    """Full resolution, int32, every nucleus pixel inside the cell of the same id."""
    assert seg.cells.shape == seg.nuclei.shape == shape
    assert seg.cells.dtype == seg.nuclei.dtype == np.int32
    inside = seg.nuclei > 0
    assert np.array_equal(seg.nuclei[inside], seg.cells[inside])


# -- Cellpose-SAM ------------------------------------------------------------------------------------------


def test_cellpose_without_weights_says_where_it_looked() -> None:
    # a backend that cannot start is the configuration's fault: BackendError stops the stage (issue 26)
    with pytest.raises(BackendError) as raised:
        cellpose_backend.segment(hpa_like_image(64), SegmentConfig(backend="cellpose"))
    message = str(raised.value)
    for expected in ("cpsam", "$CELLPOSE_LOCAL_MODELS_PATH (not set)", "/kaggle/input/*", "Kaggle dataset"):
        assert expected in message
    assert "segment.cellpose.weights=/kaggle/input/cellpose-sam/cpsam" in message


def test_cellpose_weights_typo_fails_at_once(tmp_path: Path) -> None:
    cfg = SegmentConfig.model_validate({"cellpose": {"weights": str(tmp_path / "cpsma")}})
    with pytest.raises(BackendError, match=r"segment\.cellpose\.weights=.*cpsma does not exist"):
        cellpose_backend.segment(hpa_like_image(64), cfg)


def test_cellpose_tiny_forward(tmp_path: Path) -> None:
    weights = random_cellpose_weights(tmp_path / "cpsam", "tiny")
    cfg = SegmentConfig.model_validate(
        {"cellpose": {"weights": str(tmp_path), "backbone": "tiny", "device": "cpu"}}
    )
    image = hpa_like_image(200)  # 0.25 -> 50 px: one padded 256-px tile
    seg = cellpose_backend.segment(image, cfg)
    assert_valid(seg, (200, 200))
    assert cellpose_backend._model.cache_info().currsize == 1
    cellpose_backend.segment(image, cfg)
    assert cellpose_backend._model.cache_info().hits == 1  # loaded once per process
    assert weights.exists()


def test_cellpose_masks_are_upscaled_and_nuclei_labelled(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Everything around the network: working-scale masks come back at full resolution by nearest
    neighbour, and nuclei are blue foreground inside cells, labelled with the cell's id."""
    small = np.zeros((25, 25), np.int32)
    small[2:12, 2:12], small[14:24, 10:24] = 1, 2
    calls = []

    class FakeModel:
        def eval(self, x: np.ndarray, **kwargs: object) -> tuple[np.ndarray, None, None]:
            calls.append((x.shape, kwargs))
            return small, None, None

    monkeypatch.setattr(cellpose_backend, "_model", lambda *args: FakeModel())
    (tmp_path / "cpsam").write_bytes(b"unused")
    image = np.zeros((4, 100, 100), np.uint8)
    image[2, 20:36, 20:36] = 220  # a nucleus inside cell 1
    image[2, 85:95, 2:12] = 220  # blue outside every cell: not a nucleus
    cfg = SegmentConfig.model_validate({"cellpose": {"weights": str(tmp_path / "cpsam"), "diameter": 120}})
    seg = cellpose_backend.segment(image, cfg)

    assert calls[0][0] == (25, 25, 3)
    assert calls[0][1]["diameter"] == 30  # 120 px at full resolution = 30 px at working scale 0.25
    assert_valid(seg, (100, 100))
    assert np.array_equal(seg.cells[::4, ::4], small)
    assert set(np.unique(seg.nuclei)) == {0, 1}
    assert seg.nuclei[28, 28] == 1 and seg.nuclei[90, 5] == 0


def test_cellpose_rejects_cellpose3_and_mismatched_weights(tmp_path: Path) -> None:
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "cyto3")
    with pytest.raises(WeightsError, match="not a Cellpose 4"):
        cellpose_backend.load_network(tmp_path / "cyto3", "tiny", torch.device("cpu"))
    random_cellpose_weights(tmp_path / "cpsam", "tiny")
    with pytest.raises(WeightsError, match=r"does not fit segment\.cellpose\.backbone='vit_b'.*need vit_l"):
        cellpose_backend.load_network(tmp_path / "cpsam", "vit_b", torch.device("cpu"))


def test_cellpose_skeleton_keeps_cellpose_parameter_names() -> None:
    """A smaller encoder gets CPSAM's surgery: same names outside the block stack, 8-px patches, a 32x32
    position grid for 256-px tiles; vit_l is cellpose's own network (what the official cpsam needs)."""
    from cellpose.vit import CPSAM

    with torch.device("meta"):
        reference = CPSAM().state_dict()
    large = cellpose_backend._cpsam_skeleton("vit_l").state_dict()
    assert {k: v.shape for k, v in large.items()} == {k: v.shape for k, v in reference.items()}
    small = cellpose_backend._cpsam_skeleton("vit_b").state_dict()
    outside_blocks = {k for k in reference if ".blocks." not in k}
    assert outside_blocks == {k for k in small if ".blocks." not in k}
    assert small["encoder.patch_embed.proj.weight"].shape == (768, 3, 8, 8)
    assert small["encoder.pos_embed"].shape == (1, 32, 32, 768)


@pytest.mark.slow
def test_cellpose_vit_b_forward(tmp_path: Path) -> None:
    random_cellpose_weights(tmp_path / "cpsam", "vit_b")
    cfg = SegmentConfig.model_validate(
        {"cellpose": {"weights": str(tmp_path / "cpsam"), "backbone": "vit_b", "working_scale": 0.5}}
    )
    assert_valid(cellpose_backend.segment(hpa_like_image(400), cfg), (400, 400))


# -- SAM refinement ----------------------------------------------------------------------------------------


def test_sam_without_weights_says_where_it_looked() -> None:
    with pytest.raises(BackendError) as raised:
        sam_refine.refine(hpa_like_image(64), grid_cells(64, 2), SegmentConfig())
    message = str(raised.value)
    for expected in (
        "sam_vit_b*.pth",
        "$WEAKCELL_SAM_WEIGHTS (not set)",
        "/kaggle/input/*",
        "segment.sam.weights=/kaggle/input/segment-anything/sam_vit_b_01ec64.pth",
    ):
        assert expected in message


def test_sam_tiny_refine_keeps_ids_shapes_and_nuclei(tmp_path: Path) -> None:
    random_sam_weights(tmp_path / "sam_tiny.pth", "tiny")
    cfg = SegmentConfig.model_validate(
        {"sam": {"weights": str(tmp_path), "model_type": "tiny", "device": "cpu"}}
    )
    first = grid_cells(256, 3)
    seg = sam_refine.refine(hpa_like_image(256), first, cfg)
    assert_valid(seg, (256, 256))
    assert set(np.unique(seg.cells)) <= set(np.unique(first.cells))
    # Random weights give random masks; the IoU fallback still keeps every first-pass cell.
    assert set(np.unique(seg.cells)) == set(np.unique(first.cells))


def test_sam_refine_without_cells_returns_empty(tmp_path: Path) -> None:
    random_sam_weights(tmp_path / "sam_tiny.pth", "tiny")
    cfg = SegmentConfig.model_validate(
        {"sam": {"weights": str(tmp_path / "sam_tiny.pth"), "model_type": "tiny"}}
    )
    empty = Segmentation(np.zeros((64, 64), np.int32), np.zeros((64, 64), np.int32))
    assert sam_refine.refine(hpa_like_image(64), empty, cfg).n_cells == 0


def test_sam_checkpoint_of_another_size_is_refused(tmp_path: Path) -> None:
    random_sam_weights(tmp_path / "sam_tiny.pth", "tiny")
    with pytest.raises(WeightsError, match=r"does not fit segment\.sam\.model_type='vit_b'"):
        sam_refine.load_sam(tmp_path / "sam_tiny.pth", "vit_b", torch.device("cpu"))


def test_cell_windows() -> None:
    labels = np.zeros((50, 60), np.int32)
    labels[10:20, 5:25] = 1
    labels[40:50, 50:60] = 3  # id 2 absent
    ids, boxes, windows = cell_windows(labels)
    assert ids.tolist() == [1, 3]
    assert boxes.tolist() == [[5, 10, 25, 20], [50, 40, 60, 50]]
    assert windows[0] == (slice(8, 22), slice(3, 27))
    assert windows[1] == (slice(38, 50), slice(48, 60))  # clipped at the image edge


def test_merge_accepts_grows_into_background_and_falls_back() -> None:
    first = np.zeros((40, 40), np.int32)
    first[5:15, 5:15] = 1
    first[5:15, 16:26] = 2
    first[25:35, 5:15] = 3
    window = (slice(0, 40), slice(0, 40))
    grown = np.zeros((40, 40), bool)
    grown[4:16, 4:22] = True  # cell 1 one pixel larger, reaching into cell 2 and the gap at column 15
    elsewhere = np.zeros((40, 40), bool)
    elsewhere[25:35, 25:35] = True  # no overlap with cell 3
    proposals = [
        Proposal(1, window, grown, score=0.9),
        Proposal(2, window, np.zeros((40, 40), bool), score=0.9),  # empty: keep the first pass
        Proposal(3, window, elsewhere, score=0.99),  # IoU 0: keep the first pass
    ]
    refined, fallbacks = merge_proposals(first, proposals, min_iou=0.5)
    assert fallbacks == 2
    assert np.array_equal(refined == 2, first == 2)  # cell 1 never takes cell 2's pixels
    assert np.array_equal(refined == 3, first == 3)
    assert np.array_equal(refined == 1, grown & ((first == 1) | (first == 0)))


def test_merge_higher_score_wins_in_former_background() -> None:
    first = np.zeros((20, 30), np.int32)
    first[5:15, 2:12] = 1
    first[5:15, 18:28] = 2
    window = (slice(0, 20), slice(0, 30))
    left, right = np.zeros((20, 30), bool), np.zeros((20, 30), bool)
    left[5:15, 2:16] = True
    right[5:15, 14:28] = True  # both claim columns 14-15
    refined, fallbacks = merge_proposals(
        first, [Proposal(1, window, left, 0.7), Proposal(2, window, right, 0.8)], min_iou=0.5
    )
    assert fallbacks == 0
    assert (refined[5:15, 14:16] == 2).all() and (refined[5:15, 12:14] == 1).all()


@pytest.mark.slow
def test_sam_vit_b_refine(tmp_path: Path) -> None:
    random_sam_weights(tmp_path / "sam_vit_b_random.pth", "vit_b")
    cfg = SegmentConfig.model_validate({"sam": {"weights": str(tmp_path)}})
    first = grid_cells(512, 4)
    assert_valid(sam_refine.refine(hpa_like_image(512), first, cfg), (512, 512))


# -- end to end ------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("first_pass", ["network", "grid"])
def test_cellpose_plus_sam_through_segment_image(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, first_pass: str
) -> None:
    """``backend=cellpose+sam``: Cellpose-SAM, SAM refinement, shared post-processing. A random network
    finds no cells, so the ``grid`` case stands in a known first pass to give SAM prompts."""
    pytest.importorskip("weakcell.segment.postprocess")
    from weakcell.segment import segment_image

    random_cellpose_weights(tmp_path / "cpsam", "tiny")
    random_sam_weights(tmp_path / "sam_tiny.pth", "tiny")
    if first_pass == "grid":

        class GridModel:
            def eval(self, x: np.ndarray, **kwargs: object) -> tuple[np.ndarray, None, None]:
                return grid_cells(x.shape[0], 3).cells, None, None

        monkeypatch.setattr(cellpose_backend, "_model", lambda *args: GridModel())
    cfg = SegmentConfig.model_validate(
        {
            "backend": "cellpose+sam",
            "cellpose": {"weights": str(tmp_path / "cpsam"), "backbone": "tiny"},
            "sam": {"weights": str(tmp_path / "sam_tiny.pth"), "model_type": "tiny"},
            "postprocess": {"drop_cells_without_nucleus": False},
        }
    )
    seg = segment_image(hpa_like_image(256), cfg)
    assert_valid(seg, (256, 256))
    assert np.array_equal(np.unique(seg.cells), np.arange(seg.n_cells + 1))  # relabelled 1..n
    if first_pass == "grid":
        assert seg.n_cells == 9
