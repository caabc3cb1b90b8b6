"""``weakcell duplicates``: transformed copies of the real images (JPEG re-encoded, 1728 and 3072 px,
16-bit .tif.gz, brighter) must all pair up with their original and with each other, and no two different
images may pair; the search is exact against all pairs; hashes come back from the cache by content."""

from __future__ import annotations

import json
import shutil
from itertools import combinations
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.conftest import shared_path
from weakcell.cli import main as cli_main
from weakcell.constants import CHANNELS
from weakcell.data.images import read_image, write_image
from weakcell.duplicates import hashing
from weakcell.duplicates.search import clusters, distances, find_pairs
from weakcell.duplicates.stage import MAX_DISTANCE, main
from weakcell.synthetic.duplicates import TRANSFORMS, plant_copy

SIDE = 512  # the real 2048 px images area-reduced, so that the suite stays fast; ratios are the real ones


def real_images(side: int | None) -> dict[str, np.ndarray]:
    """The 5 real images, area-reduced to ``side`` (None = their own 2048²), by the first 8 ID characters."""
    train = shared_path("hpa2021", "train")
    ids = sorted({p.name.rsplit("_", 1)[0] for p in train.glob("*_green.png")})
    images = {}
    for image_id in ids:
        image = read_image(train, image_id)
        if side is not None:
            image = np.stack([cv2.resize(c, (side, side), interpolation=cv2.INTER_AREA) for c in image])
        images[image_id[:8]] = image
    return images


def plant_all(root: Path, side: int | None) -> tuple[Path, Path, dict[str, str]]:
    """A 'train' folder of originals (and their copies turned a quarter: different images), an 'external'
    folder of every transformed copy. Returns the folders and each ID's original."""
    origin: dict[str, str] = {}
    for name, image in real_images(side).items():
        write_image(root / "train", name, image)
        write_image(root / "train", f"{name}-turned", np.rot90(image, 1, axes=(1, 2)).copy())
        origin[name] = name
        origin[f"{name}-turned"] = f"{name}-turned"
        for transform in TRANSFORMS:
            plant_copy(image, root / "external", f"{name}-{transform}", transform)
            origin[f"{name}-{transform}"] = name
    return root / "train", root / "external", origin


def precision_recall(found_json: Path, origin: dict[str, str]) -> tuple[float, float, set, set]:
    pairs = {(p["a"], p["b"]) for p in json.loads(found_json.read_text())["pairs"]}
    truth = {tuple(sorted(ab)) for ab in combinations(origin, 2) if origin[ab[0]] == origin[ab[1]]}
    hits = len(pairs & truth)
    return hits / max(len(pairs), 1), hits / len(truth), pairs, truth


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> tuple[Path, Path, dict[str, str]]:
    return plant_all(tmp_path_factory.mktemp("planted"), SIDE)


def test_every_true_pair_and_no_false_one(planted, tmp_path, capsys):
    train, external, origin = planted
    out = tmp_path / "duplicates.json"
    cache = tmp_path / "hashes.parquet"
    assert main([str(train), str(external), "--json", str(out), "--cache", str(cache), "--workers", "2"]) == 0
    found = json.loads(out.read_text())
    assert set(found) == {"pairs", "clusters"}
    precision, recall, pairs, truth = precision_recall(out, origin)
    assert (precision, recall) == (1.0, 1.0), (sorted(pairs - truth), sorted(truth - pairs))
    assert len(truth) == 5 * 15  # each original and its 5 copies: 15 pairs
    assert all(p["a"] < p["b"] and 0 <= p["distance"] <= MAX_DISTANCE for p in found["pairs"])
    assert [p["distance"] for p in found["pairs"]] == sorted(p["distance"] for p in found["pairs"])
    groups = sorted(sorted(k for k in origin if origin[k] == name) for name in {origin[k] for k in origin})
    assert found["clusters"] == [g for g in groups if len(g) > 1]
    assert "35 images in 2 folder(s) (0 from the cache), 75 pairs" in capsys.readouterr().out


@pytest.mark.slow
def test_full_size_copies_pair_up(tmp_path):
    """The same at the real size: 2048² originals, 1728² and 3072² copies (about 30 s)."""
    train, external, origin = plant_all(tmp_path / "full", None)
    out = tmp_path / "duplicates.json"
    assert main([str(train), str(external), "--json", str(out), "--cache", ""]) == 0
    precision, recall, pairs, truth = precision_recall(out, origin)
    assert (precision, recall) == (1.0, 1.0), (sorted(pairs - truth), sorted(truth - pairs))


def test_hashes_come_from_the_cache_by_content(planted, tmp_path, monkeypatch, capsys):
    train, _, _ = planted
    cache = tmp_path / "hashes.parquet"
    first = tmp_path / "first.json"
    assert main([str(train), "--json", str(first), "--cache", str(cache)]) == 0  # 10 images: no pool
    copy = tmp_path / "copy"
    shutil.copytree(train, copy)  # other paths and times, same bytes

    def no_decoding(*args: object) -> None:
        raise AssertionError("a cached image was decoded again")

    monkeypatch.setattr(hashing, "decode_channel", no_decoding)
    second = tmp_path / "second.json"
    assert main([str(copy), "--json", str(second), "--cache", str(cache)]) == 0
    assert json.loads(first.read_text()) == json.loads(second.read_text())
    assert main([str(train), "--json", str(second), "--cache", str(cache)]) == 0
    assert "(10 from the cache)" in capsys.readouterr().out


def test_folder_errors_and_incomplete_images(tmp_path, capsys):
    rng = np.random.default_rng(0)
    for folder in ("a", "b"):
        write_image(tmp_path / folder, "same", rng.integers(0, 255, (4, 32, 32), dtype=np.uint8))
    write_image(tmp_path / "a", "partial", rng.integers(0, 255, (4, 32, 32), dtype=np.uint8))
    (tmp_path / "a" / f"partial_{CHANNELS[-1]}.png").unlink()
    out = str(tmp_path / "d.json")
    assert (
        cli_main(["duplicates", str(tmp_path / "a"), str(tmp_path / "b"), "--json", out, "--cache", ""]) == 2
    )
    assert "image same is in both" in capsys.readouterr().err
    assert main([str(tmp_path / "a"), "--json", out, "--cache", ""]) == 0
    assert "skipped 1 image(s)" in capsys.readouterr().out
    assert main([str(tmp_path / "missing"), "--json", out]) == 2


def test_search_is_exact_against_all_pairs():
    rng = np.random.default_rng(1)
    hashes = rng.integers(0, 2**63, (1500, 4), dtype=np.int64).astype(np.uint64)
    for _ in range(150):  # near copies: up to 30 of 256 bits flipped
        a, b = rng.integers(0, len(hashes), 2)
        hashes[b] = hashes[a]
        for bit in rng.integers(0, 256, rng.integers(0, 31)):
            hashes[b, bit // 64] ^= np.uint64(1) << np.uint64(bit % 64)
    every_i, every_j = np.triu_indices(len(hashes), 1)
    every_d = distances(hashes, every_i, every_j)
    for max_distance in (0, 15, 24, 40):
        i, j, d = find_pairs(hashes, max_distance)
        close = every_d <= max_distance
        assert np.array_equal(i, every_i[close]) and np.array_equal(j, every_j[close])
        assert np.array_equal(d, every_d[close])
    groups = clusters(5, np.array([0, 1, 3]), np.array([1, 2, 4]))
    assert [g.tolist() for g in groups] == [[0, 1, 2], [3, 4]]
