"""Lineage: each output records what it was made from and is reused only for that. The data's content
(a regenerated set under the same IDs), the settings a stage reads under the config at hand (refinement
under ``refine.score=confidence``), resuming a fold killed under ``train.folds=[0]``."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest

from tests.conftest import TINY, _blobs
from tests.test_cache import _config, fake_segment
from weakcell.cache import build
from weakcell.cache.crops import cut_crops
from weakcell.cache.store import IMAGES_FILE, SHARDS_DIR, CellCache, cache_fingerprint, read_masks
from weakcell.config import load_config
from weakcell.data.images import read_image, write_image
from weakcell.errors import StageError
from weakcell.lineage import Lineage, read_lineage, stale, write_lineage


def test_a_fingerprint_covers_settings_and_upstream_and_names_what_changed():
    cfg = load_config(None, [])
    rest = {"folds": "f1", "labels": "l1", "truth": None, "sources": None}  # no truth, no sources: real data
    lineage = Lineage.of("run", cfg, cache="c1", **rest)
    assert lineage.upstream == {"cache": "c1", "folds": "f1", "labels": "l1"}
    assert "train.lr" in lineage.settings and "train.workers" not in lineage.settings
    with pytest.raises(ValueError, match="upstream"):
        Lineage.of("run", cfg, cache="c1")
    other = Lineage.of("run", load_config(None, ["train.lr=0.01"]), cache="c2", **rest)
    assert other.fingerprint != lineage.fingerprint
    assert other.changes(lineage) == ["train.lr: 0.001 -> 0.01", "the cell cache changed (c1 -> c2)"]
    moved = Lineage.of("run", load_config(None, ["train.workers=3"]), cache="c1", **rest)
    assert moved.fingerprint == lineage.fingerprint


def test_a_record_from_before_an_added_setting_stays_valid(tmp_path):
    """A cache recorded before ``segment.reference_size`` existed (its settings lack the key) reads it as
    None, the absolute sizes it was made with: it keeps its fingerprint (so the runs trained on it stay
    valid) and is reused; a cache made at another reference side is a change."""
    cfg = load_config(None, [])
    now = Lineage.of("cache", cfg, images="i1")
    assert now.settings["segment.reference_size"] is None
    before = {key: value for key, value in now.settings.items() if key != "segment.reference_size"}
    write_lineage(tmp_path, Lineage("cache", before, {"images": "i1"}))
    recorded = read_lineage(tmp_path)
    assert recorded is not None and recorded.fingerprint == now.fingerprint
    assert not stale(tmp_path, now, cfg)
    sized = load_config(None, ["segment.reference_size=2048"])
    relative = Lineage.of("cache", sized, images="i1")
    assert relative.fingerprint != now.fingerprint
    assert stale(tmp_path, relative, sized) == ["segment.reference_size: None -> 2048"]


def test_refinement_under_confidence_reads_the_submitted_formula(tmp_path):
    """A round whose rule scores cells by the submitted confidence is made from infer.image_power and
    infer.image_best_cell: changing them invalidates it; under the stage-1 score they are not read."""
    for score, invalidated in (("confidence", True), ("stage1", False)):
        made = load_config(None, [f"refine.score={score}"])
        folder = tmp_path / score
        write_lineage(folder, Lineage.of("refine", made, previous="run"))
        for override in ("infer.image_power=3", "infer.image_best_cell=0.5"):
            now = load_config(None, [f"refine.score={score}", override])
            differ = stale(folder, Lineage.of("refine", now, previous="run"), now)
            assert bool(differ) is invalidated, (score, override, differ)
            if invalidated:
                assert differ[0].startswith(override.split("=")[0])
        tta = load_config(None, [f"refine.score={score}", "infer.tta=[0]"])
        assert not stale(folder, Lineage.of("refine", tta, previous="run"), tta)


# -- the cache follows its images' content --------------------------------------------------------------


@pytest.fixture(autouse=True)
def _fake_segmenter(monkeypatch):
    monkeypatch.setattr(build, "segment_image", fake_segment)


def _crops_of(cache: CellCache, image_id: str) -> np.ndarray:
    return cache.crops(np.flatnonzero(cache.cells["image_id"] == image_id))


def test_changed_images_are_cached_again_and_only_they(dataset, tmp_path, monkeypatch, capsys):
    cfg = _config(dataset, tmp_path / "cache")
    build.run(cfg)
    before = CellCache(cfg.cache_dir)
    fingerprint = cache_fingerprint(cfg.cache_dir)
    # img-a gets other pixels under its ID; img-c is written again with the same bytes (a new mtime)
    write_image(dataset / "train", "img-a", _blobs(np.random.default_rng(7), 6))
    write_image(dataset / "train", "img-c", read_image(dataset / "train", "img-c"))
    segmented = []
    monkeypatch.setattr(
        build, "segment_image", lambda image, c: segmented.append(1) or fake_segment(image, c)
    )
    capsys.readouterr()
    build.run(cfg)
    assert "(1 processed now, 1 re-cached (content changed), 6 cached before)" in capsys.readouterr().out
    assert len(segmented) == 1
    after = CellCache(cfg.cache_dir)
    image = read_image(dataset / "train", "img-a")
    masks = read_masks(cfg.cache_dir, "img-a")
    np.testing.assert_array_equal(
        _crops_of(after, "img-a"), cut_crops(image, masks.cells, masks.nuclei, after.crop_size)[0]
    )
    assert (after.cells["image_id"] == "img-a").sum() == 6  # the old rows are gone
    for image_id in ("img-b", "img-c", "img-d", "tst-a"):
        np.testing.assert_array_equal(_crops_of(after, image_id), _crops_of(before, image_id))
    assert cache_fingerprint(cfg.cache_dir) != fingerprint  # what runs trained on it record
    # a third run stats the files and reads none of them: the memo knows their hashes
    capsys.readouterr()
    build.run(cfg)
    assert "(0 processed now, 7 cached before)" in capsys.readouterr().out


def test_a_cache_from_before_content_hashes_is_judged_by_modification_times(dataset, tmp_path, capsys):
    """Rows committed before hashes were recorded stay finished while their files are older than their
    commit; files written since (a regenerated set) are cached again."""
    cfg = _config(dataset, tmp_path / "cache")
    build.run(cfg)
    for path in (cfg.cache_dir / SHARDS_DIR).glob("*.images.parquet"):
        table = pd.read_parquet(path).drop(columns="content_hash")
        stamp = path.stat().st_mtime_ns
        table.to_parquet(path, index=False)
        import os

        os.utime(path, ns=(stamp, stamp))
    shutil.rmtree(cfg.cache_dir.parent / "manifests")
    (cfg.cache_dir / "lineage.json").unlink()
    capsys.readouterr()
    build.run(cfg)
    assert "(0 processed now, 7 cached before)" in capsys.readouterr().out
    assert (pd.read_parquet(cfg.cache_dir / IMAGES_FILE)["content_hash"].str.len() == 32).all()  # adopted
    write_image(dataset / "test", "tst-b", _blobs(np.random.default_rng(3), 2))
    capsys.readouterr()
    build.run(cfg)
    assert "(1 processed now, 1 re-cached (content changed), 6 cached before)" in capsys.readouterr().out


# -- the pipeline: a regenerated synthetic set, a fold resumed -----------------------------------------


class Killed(RuntimeError):
    """Stands in for a kill in the middle of a fold."""


def test_resume_and_regenerated_data(tmp_path, monkeypatch, capsys):
    """A fold killed under train.folds=[0] resumes under a plain train; then the synthetic set is
    regenerated under the same IDs with other noise: the cache is made again from the new pixels and the
    run trained on the old ones refuses, naming the cache."""
    from weakcell import engine, fold_model
    from weakcell import folds as folds_stage
    from weakcell import train as train_stage
    from weakcell.synthetic import writer as data_stage
    from weakcell.training_set import load_training_set

    monkeypatch.undo()  # the real segmenter: the synthetic images need it
    root = tmp_path / "pipeline"
    overrides = [f"paths.root={root}", *TINY, "train.checkpoint_every=1", "train.batch_size=4"]
    cfg = load_config(None, overrides)
    data_stage.run(cfg)
    folds_stage.run(cfg)
    build.run(cfg)

    real_fit = engine.fit

    def killed_at_step_2(*args, **kwargs):
        def on_step(step: int) -> None:
            if step == 2:
                raise Killed

        return real_fit(*args, **kwargs, on_step=on_step)

    monkeypatch.setattr(fold_model, "fit", killed_at_step_2)
    with pytest.raises(Killed):
        train_stage.run(load_config(None, [*overrides, "train.folds=[0]"]))
    assert (cfg.run_dir / "fold0" / "cell" / "last.pt").is_file()
    monkeypatch.setattr(fold_model, "fit", real_fit)
    capsys.readouterr()
    metrics = train_stage.run(cfg)
    assert f"fit: resuming {cfg.run_dir / 'fold0' / 'cell'} at epoch 1, step 2" in capsys.readouterr().out
    assert metrics["folds"] == 3
    assert read_lineage(cfg.run_dir).upstream["cache"] == cache_fingerprint(cfg.cache_dir)

    # the same IDs, other pixels
    old = CellCache(cfg.cache_dir)
    noisier = load_config(None, [*overrides, "synthetic.noise=2.0"])
    data_stage.run(noisier)
    capsys.readouterr()
    build.run(noisier)
    n_images = len(old.images)
    assert (
        f"({n_images} processed now, {n_images} re-cached (content changed), 0 cached before)"
        in capsys.readouterr().out
    )
    new = CellCache(cfg.cache_dir)
    image_id = new.images.loc[new.images["n_cells"] > 0, "image_id"].iloc[0]
    image = read_image(cfg.data_dir / "train", image_id)
    masks = read_masks(cfg.cache_dir, image_id)
    np.testing.assert_array_equal(
        load_training_set(noisier).cache.crops(np.flatnonzero(new.cells["image_id"] == image_id)),
        cut_crops(image, masks.cells, masks.nuclei, new.crop_size)[0],
    )
    with pytest.raises(StageError, match=r"the cell cache changed.*FORCE=1") as err:
        train_stage.run(noisier)
    assert "\n" not in str(err.value)
    # the next synthetic setting change that leaves the training images as they were (more test images)
    more = load_config(None, [*overrides, "synthetic.noise=2.0", "synthetic.n_test=4"])
    data_stage.run(more)
    capsys.readouterr()
    build.run(more)
    assert "(1 processed now, 12 cached before)" in capsys.readouterr().out
