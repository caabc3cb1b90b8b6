"""Attention maps: one PNG per image, one panel per predicted class, images without cells still drawn."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from weakcell.attention_maps import (
    attention_image,
    chosen_classes,
    draw_attention_maps,
    figure_width_px,
    pick_images,
    plan_panels,
)
from weakcell.constants import HPA2021_CLASSES
from weakcell.data.images import write_image

C = len(HPA2021_CLASSES)


class FakeCache:
    """The one thing the maps read from a CellCache: full-resolution instance masks."""

    def __init__(self, masks: dict[str, np.ndarray]):
        self._masks = masks

    def masks(self, image_id: str):
        if image_id not in self._masks:
            raise FileNotFoundError(image_id)
        return SimpleNamespace(cells=self._masks[image_id], nuclei=self._masks[image_id])


def _image_row(image_id: str, probs: dict[int, float]) -> dict:
    row = {"image_id": image_id, **{f"p_{c}": 0.01 for c in range(C)}, "fold": 0}
    row.update({f"p_{c}": p for c, p in probs.items()})
    return row


@pytest.fixture
def tiny(tmp_path):
    rng = np.random.default_rng(0)
    size = 96
    cells = np.zeros((size, size), dtype=np.int32)
    cells[8:40, 8:40], cells[8:40, 50:90], cells[55:90, 20:70] = 1, 2, 3
    for image_id in ("a", "b", "empty"):
        write_image(tmp_path / "train", image_id, rng.integers(0, 255, (4, size, size), dtype=np.uint8))
    masks = {"a": cells, "b": cells, "empty": np.zeros_like(cells)}
    oof_image = pd.DataFrame(
        [
            _image_row("a", {0: 0.9, 16: 0.7, 2: 0.6}),  # three predicted classes
            _image_row("b", {5: 0.3}),  # nothing above 0.5: the top class alone
            _image_row("empty", {0: 0.8}),
        ]
    )
    pieces = []
    for image_id in ("a", "b"):
        att = rng.uniform(0, 3, (3, C))
        pieces.append(
            pd.DataFrame(att, columns=[f"att_{c}" for c in range(C)]).assign(
                image_id=image_id, cell_id=[1, 2, 3], fold=0
            )
        )
    oof_cell = pd.concat(pieces, ignore_index=True)
    labels = {"a": [0, 16], "b": [5], "empty": [0]}
    return tmp_path, FakeCache(masks), oof_cell, oof_image, labels


def test_chosen_classes_keeps_at_least_the_top_one():
    probs = np.array([0.2, 0.9, 0.6, 0.55, 0.7, 0.1])
    assert chosen_classes(probs, 0.5, 4) == [1, 4, 2, 3]
    assert chosen_classes(probs, 0.5, 2) == [1, 4]
    assert chosen_classes(np.array([0.1, 0.3, 0.2]), 0.5, 4) == [1]


def test_one_png_per_image_with_a_panel_per_class(tiny):
    root, cache, oof_cell, oof_image, labels = tiny
    out = root / "maps"
    ids = ["a", "b", "empty"]
    paths = draw_attention_maps(
        root, "train", cache, oof_cell, oof_image, ids, out, HPA2021_CLASSES, labels=labels
    )
    assert paths == [out / f"{i}.png" for i in ids]
    assert not list(out.glob("*.tmp"))
    expected = {"a": 1 + 3, "b": 1 + 1, "empty": 1}  # composite + classes; without cells the composite only
    for image_id, path in zip(ids, paths):
        plan = plan_panels(oof_image, oof_cell, image_id)
        assert plan.n_panels == expected[image_id]
        with Image.open(path) as png:
            assert png.width == figure_width_px(expected[image_id])
    assert plan_panels(oof_image, oof_cell, "a", max_classes=2).classes == [0, 16]


def test_masks_missing_from_the_cache_still_render(tiny):
    root, _, oof_cell, oof_image, _ = tiny
    paths = draw_attention_maps(
        root, "train", FakeCache({}), oof_cell, oof_image, ["a"], root, HPA2021_CLASSES
    )
    with Image.open(paths[0]) as png:
        assert png.width == figure_width_px(1)


def test_attention_image_paints_cells_and_leaves_background_empty():
    cells = np.array([[0, 1], [2, 2]])
    painted = attention_image(cells, np.array([1, 2]), np.array([0.5, 2.0]))
    assert np.isnan(painted[0, 0]) and painted[0, 1] == 0.5 and (painted[1] == 2.0).all()


def test_pick_images_is_fixed_and_includes_multi_label_ones():
    ids = [f"im{i:02d}" for i in range(20)]
    oof_image = pd.DataFrame({"image_id": ids})
    labels = pd.DataFrame({"image_id": ids, "labels": [[0, 1] if i % 5 == 0 else [3] for i in range(20)]})
    picked = pick_images(oof_image, labels, n=6, seed=1)
    assert picked == pick_images(oof_image.iloc[::-1], labels, n=6, seed=1)
    assert len(picked) == len(set(picked)) == 6
    assert (
        sum(i in {"im00", "im05", "im10", "im15"} for i in picked) >= 3
    )  # half, plus any drawn among the rest
    assert len(pick_images(oof_image, None, n=50, seed=0)) == 20
