"""The whole-image model: its downscaled image cache, the fold split it trains on, the rules that combine it
with the cell model, and the stage end to end on the tiny pipeline."""

from __future__ import annotations

import json
import typing

import numpy as np
import pandas as pd
import pytest

from tests.conftest import TINY, TINY_IMAGE_MODEL
from weakcell import cli
from weakcell.combine import (
    IMAGE_LEVELS,
    IMAGE_MODEL_RULES,
    CellTerms,
    combined_confidence,
    image_level_probs,
)
from weakcell.config import Config, InferConfig, load_config
from weakcell.data.images import write_channel, write_image
from weakcell.errors import StageError
from weakcell.image_cache import build_split, downscale

# -- the image cache ------------------------------------------------------------------------------------------


def _blocks(values: np.ndarray) -> np.ndarray:
    """A (4, 2h, 2w) image whose every 2x2 block is constant: ``values`` (4, h, w) repeated."""
    return values.repeat(2, axis=1).repeat(2, axis=2)


def test_area_downscaling_of_constant_blocks_gives_the_block_values():
    values = np.arange(4 * 3 * 3, dtype=np.uint8).reshape(4, 3, 3) * 7  # 0, 7, ..., 245
    assert np.array_equal(downscale(_blocks(values), 3), values)
    # a block that is not constant becomes its mean: (10 + 20 + 30 + 40) / 4 = 25
    image = np.zeros((4, 2, 2), np.uint8)
    image[:, 0, 0], image[:, 0, 1], image[:, 1, 0], image[:, 1, 1] = 10, 20, 30, 40
    assert downscale(image, 1)[:, 0, 0].tolist() == [25, 25, 25, 25]


def _layout(tmp_path, images: dict[str, np.ndarray]) -> Config:
    """An hpa2021 layout of ``images`` (train/ + train.csv) and a config reading it at 32 px."""
    data = tmp_path / "data"
    for image_id, image in images.items():
        write_image(data / "train", image_id, image)
    pd.DataFrame({"ID": list(images), "Label": ["0"] * len(images)}).to_csv(data / "train.csv", index=False)
    return load_config(
        None,
        [
            f"paths.root={tmp_path}",
            "data.dataset=hpa2021",
            f"data.dir={data}",
            "image_model.size=32",
            "cache.workers=1",
        ],
    )


def test_the_image_cache_holds_known_pixels_and_reads_16_bit_as_the_cell_cache(tmp_path):
    values = (np.arange(4 * 32 * 32) % 251).astype(np.uint8).reshape(4, 32, 32)
    other = np.full((4, 32, 32), 200, np.uint8)
    cfg = _layout(tmp_path, {"a": _blocks(values), "b": _blocks(other)})
    # b's red channel as a 16-bit file: 257 * 9 reads as 9 (round(v / 257)), as the cell cache reads it
    write_channel(cfg.data_dir / "train" / "b_red.png", np.full((64, 64), 257 * 9, np.uint16))
    cache = build_split(cfg, "train")
    assert cache.folder == tmp_path / "cache" / "hpa2021" / "images_32" / "train"
    assert cache.index["image_id"].tolist() == ["a", "b"]
    assert cache.index[["width", "height"]].to_numpy().tolist() == [[64, 64], [64, 64]]
    a, b = cache.crops(cache.rows(["a", "b"]))
    assert np.array_equal(a, values)
    assert (b[0] == 9).all() and (b[1:] == 200).all()
    assert np.array_equal(cache.crops([1, 0])[1], values)  # rows come back in the order asked


def test_the_image_cache_is_reused_until_an_image_changes(tmp_path, capsys):
    image = _blocks(np.full((4, 32, 32), 50, np.uint8))
    cfg = _layout(tmp_path, {"a": image})
    build_split(cfg, "train")
    build_split(cfg, "train")
    assert "reusing it" in capsys.readouterr().out
    write_image(cfg.data_dir / "train", "a", _blocks(np.full((4, 32, 32), 60, np.uint8)))
    cache = build_split(cfg, "train")
    assert "reusing it" not in capsys.readouterr().out
    assert (cache.crops([0]) == 60).all()


def test_a_missing_image_file_is_one_line_naming_it(tmp_path, capsys):
    cfg = _layout(tmp_path, {"a": np.zeros((4, 6, 6), np.uint8), "b": np.zeros((4, 6, 6), np.uint8)})
    missing = cfg.data_dir / "train" / "b_yellow.png"
    missing.unlink()
    args = [
        f"paths.root={tmp_path}",
        "data.dataset=hpa2021",
        f"data.dir={cfg.data_dir}",
        "image_model.enabled=true",
    ]
    assert cli.main(["image-model", *args]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and error.startswith("error: ")
    assert str(cfg.data_dir / "train" / "b_yellow") in error and "1 of 2 images" in error


# -- the rules ------------------------------------------------------------------------------------------------


def test_every_rule_and_image_level_of_the_schema_is_registered():
    fields = InferConfig.model_fields
    assert set(IMAGE_MODEL_RULES) == set(typing.get_args(fields["image_model_rule"].annotation))
    assert set(IMAGE_LEVELS) == set(typing.get_args(fields["image_level"].annotation))


def _terms(model: bool = True) -> CellTerms:
    return CellTerms(
        cell=np.array([[0.5, 0.2]]),
        mil=np.array([[0.8, 0.4]]),
        image_model=np.array([[0.5, 0.25]]) if model else None,
        image_ids=np.array(["x"]),
    )


@pytest.mark.parametrize(
    ("rule", "image_power", "model_power", "expected"),
    [
        ("none", 0.0, 1.0, [0.5, 0.2]),  # the cell alone
        ("none", 2.0, 1.0, [0.5 * 0.64, 0.2 * 0.16]),  # cell x MIL ** 2
        ("product", 0.0, 1.0, [0.5 * 0.5, 0.2 * 0.25]),  # cell x image model
        ("product", 2.0, 2.0, [0.32 * 0.25, 0.032 * 0.0625]),  # (cell x MIL ** 2) x image model ** 2
        ("mean", 0.0, 1.0, [0.5 * 0.65, 0.2 * 0.325]),  # cell x mean(MIL, image model)
        ("replace", 0.0, 2.0, [0.5 * 0.25, 0.2 * 0.0625]),  # cell x image model ** 2
    ],
)
def test_rules_on_hand_made_probabilities(rule, image_power, model_power, expected):
    infer = InferConfig(
        image_model_rule=rule, image_power=image_power, image_model_power=model_power, image_best_cell=0.0
    )
    assert combined_confidence(_terms(), infer)[0] == pytest.approx(expected)


def test_the_best_cell_share_mixes_into_the_replaced_term():
    """image term = 0.75 x image model + 0.25 x the image's best cell; two cells of one image."""
    terms = CellTerms(
        cell=np.array([[0.4], [0.8]]),
        mil=np.array([[0.9], [0.9]]),
        image_model=np.array([[0.2], [0.2]]),
        image_ids=np.array(["x", "x"]),
    )
    infer = InferConfig(image_model_rule="replace", image_best_cell=0.25)
    term = 0.75 * 0.2 + 0.25 * 0.8
    assert combined_confidence(terms, infer)[:, 0] == pytest.approx([0.4 * term, 0.8 * term])


def test_a_rule_that_needs_the_image_model_without_it_says_so():
    with pytest.raises(StageError, match=r"image_model\.enabled=true"):
        combined_confidence(_terms(model=False), InferConfig(image_model_rule="product"))


def test_image_levels_on_hand_made_tables():
    mil = pd.DataFrame({"image_id": ["x", "y"], "p_0": [0.8, 0.2], "fold": [0, 1]})
    model = pd.DataFrame({"image_id": ["y", "x"], "p_0": [0.6, 0.4]})

    def level(name: str, with_model: pd.DataFrame | None = model) -> dict[str, float]:
        cfg = Config(infer=InferConfig(image_level=name))
        return image_level_probs(cfg, mil, with_model).set_index("image_id")["p_0"].to_dict()

    assert level("mil") == {"x": 0.8, "y": 0.2}
    assert level("image_model") == {"y": 0.6, "x": 0.4}
    assert level("mean") == pytest.approx({"x": 0.6, "y": 0.4})
    with pytest.raises(StageError, match="make image-model"):
        level("image_model", None)
    with pytest.raises(AssertionError, match="different"):
        level("mean", model.iloc[:1])


# -- the stage end to end -----------------------------------------------------------------------------------


def _with(cfg: Config, *overrides: str) -> Config:
    return load_config(None, [f"paths.root={cfg.paths.root}", *TINY, *overrides])


def test_the_stage_trains_folds_that_never_see_their_images_and_infer_uses_them(tiny_run, capsys):
    from weakcell import image_model
    from weakcell import infer as infer_stage
    from weakcell import thresholds as thresholds_stage
    from weakcell.folds_record import read_folds

    base, _ = tiny_run
    cfg = _with(
        base,
        *TINY_IMAGE_MODEL,
        "infer.image_model_rule=product",
        "infer.image_level=image_model",
        "infer.output=im",
    )
    metrics = image_model.run(cfg)
    folds = read_folds(cfg.folds_file).set_index("ID")["fold"]
    oof = pd.read_parquet(cfg.image_model_dir / "oof_image.parquet")
    assert sorted(oof["image_id"]) == sorted(folds.index) and metrics["images"] == len(folds)
    assert (oof["fold"].to_numpy() == folds.loc[oof["image_id"]].to_numpy()).all()
    assert {"image_map", "f1_at_05"} <= set(json.loads((cfg.image_model_dir / "metrics.json").read_text()))
    for fold in range(3):  # no fold model learns from its own images' labels
        record = json.loads((cfg.image_model_dir / f"fold{fold}" / "images.json").read_text())
        assert sorted(record["held_out"]) == sorted(folds.index[folds == fold])
        assert sorted(record["trained_on"]) == sorted(folds.index[folds != fold])
        assert (cfg.image_model_dir / f"fold{fold}" / "model.pt").is_file()
    image_model.run(cfg)  # finished: reused
    assert capsys.readouterr().out.count("is finished") == 3
    changed = _with(base, *TINY_IMAGE_MODEL, "image_model.lr=0.01")
    with pytest.raises(StageError, match=r"image_model\.lr.*FORCE=1"):
        image_model.run(changed)

    thresholds_stage.run(cfg)  # tuned on the image model's OOF probabilities, into its own folder
    thresholds = json.loads((cfg.image_model_dir / "thresholds.json").read_text())
    assert thresholds["summary"]["image_level"] == "image_model"
    thresholds_stage.run(
        _with(base, *TINY_IMAGE_MODEL, "infer.image_level=mean")
    )  # MIL and image model, per image
    mean = json.loads((cfg.model_dir / "thresholds-mean.json").read_text())["summary"]
    assert mean["image_level"] == "mean" and mean["images"] == len(folds)
    out_dir = infer_stage.run(cfg)
    sample = pd.read_csv(cfg.data_dir / "sample_submission.csv")
    model_images = pd.read_parquet(out_dir / "pred_image_model.parquet").set_index("image_id")
    assert sorted(model_images.index) == sorted(sample["ID"])
    # image_level.csv holds the image model's classes at its thresholds
    cut = np.array([row["threshold"] for row in sorted(thresholds["classes"], key=lambda r: r["class"])])
    labels = pd.read_csv(out_dir / "image_level.csv", keep_default_na=False).set_index("ID")["Label"]
    for image_id, probs in model_images.iterrows():
        expected = set(np.flatnonzero(probs.to_numpy() >= cut).tolist())
        if len(expected) > 1:
            expected.discard(18)  # Negative never stands beside a class
        assert {int(c) for c in str(labels[image_id]).split("|") if c} == expected


def test_infer_refuses_an_image_model_rule_without_the_model(tiny_run, capsys):
    base, _ = tiny_run
    args = [f"paths.root={base.paths.root}", *TINY, "infer.image_model_rule=product", "infer.output=x"]
    assert cli.main(["infer", *args]) == 2
    assert "image_model.enabled=true" in capsys.readouterr().err


def test_what_the_image_model_and_a_submission_read(tmp_path):
    """The image model is its own section plus the engine's optimiser settings, not the cell model's
    epochs or learning rate; a submission reads the image model's section only when it uses it."""
    from weakcell.config import OUTPUT_INPUTS, changed_settings, save_config

    def stale(output: str, override: str, *base: str) -> bool:
        folder = tmp_path / "-".join(base or ("defaults",))
        save_config(load_config(None, list(base)), folder)
        return bool(changed_settings(folder, load_config(None, [*base, override]), OUTPUT_INPUTS[output]))

    assert stale("image_model", "image_model.lr=0.01") and stale("image_model", "train.ema=0.99")
    assert stale("image_model", "infer.tta=[0]")  # its OOF probabilities average the TTA views
    assert not stale("image_model", "train.epochs=7") and not stale("image_model", "train.lr=0.01")
    assert not stale("image_model", "image_model.enabled=true") and not stale(
        "image_model", "train.workers=2"
    )
    assert not stale("run", "image_model.lr=0.01")  # the cell model's folds never read it
    assert not stale("submission", "image_model.epochs=3")
    assert stale("submission", "image_model.epochs=3", "image_model.enabled=true")
    assert stale("image_cache", "image_model.size=128") and not stale("image_cache", "image_model.lr=0.1")
