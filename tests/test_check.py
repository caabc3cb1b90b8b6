"""``weakcell check``: the data layout from headers, the backend, every weights file at once (issue 26)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from weakcell import check
from weakcell.cli import main
from weakcell.config import load_config
from weakcell.data.images import write_image
from weakcell.data.layout import channel_files, read_header, without_files


def _layout(root: Path, train: dict[str, tuple[int, int]], test: dict[str, tuple[int, int]]) -> Path:
    """An hpa2021 folder: blank images of the given (width, height), train.csv, sample_submission.csv."""
    for split, images in (("train", train), ("test", test)):
        for image_id, (width, height) in images.items():
            write_image(root / split, image_id, np.zeros((4, height, width), np.uint8))
    pd.DataFrame({"ID": list(train), "Label": ["0"] * len(train)}).to_csv(root / "train.csv", index=False)
    sample = pd.DataFrame(
        {
            "ID": list(test),
            "ImageWidth": [w for w, _ in test.values()],
            "ImageHeight": [h for _, h in test.values()],
            "PredictionString": "",
        }
    )
    sample.to_csv(root / "sample_submission.csv", index=False)
    return root


def _cfg(root: Path, tmp_path: Path, *overrides: str):
    return load_config(
        None, [f"paths.root={tmp_path}", "data.dataset=hpa2021", f"data.dir={root}", *overrides]
    )


def _problems(findings: list[check.Finding]) -> list[str]:
    return [f.text for f in findings if f.problem]


def test_channel_files_come_from_one_listing_and_headers_give_sizes_and_bits(tmp_path):
    write_image(tmp_path, "a", np.zeros((4, 12, 20), np.uint8))
    (tmp_path / "a_blue.png").unlink()
    cv2.imwrite(str(tmp_path / "a_blue.tif"), np.zeros((12, 20), np.uint16))  # 16-bit TIF: read too
    (tmp_path / "b_red.png").write_bytes(b"")  # a lone channel
    files = channel_files(tmp_path)
    assert sorted(files) == ["a", "b"] and files["a"]["blue"].name == "a_blue.tif"
    assert without_files(["a", "b", "c"], files) == ["b", "c"]
    header = read_header(files["a"]["blue"])
    assert (header.width, header.height, header.bits) == (20, 12, 16)
    assert read_header(files["a"]["red"]).bits == 8


def test_a_clean_layout_passes(tmp_path):
    root = _layout(tmp_path / "data", {"t1": (24, 24), "t2": (24, 24)}, {"s1": (32, 16)})
    findings = check.check_data(_cfg(root, tmp_path))
    assert _problems(findings) == []
    texts = " | ".join(f.text for f in findings)
    assert "train: 2 of 2 labelled images present (24x24 x 2; 8-bit x 8 files)" in texts
    assert "test: 1 of 1 sample-submission images present (32x16 x 1; 8-bit x 4 files)" in texts


def test_layout_faults_are_all_found(tmp_path):
    root = _layout(tmp_path / "data", {"t1": (24, 24), "t2": (24, 24)}, {"s1": (32, 16), "t2": (24, 24)})
    labels = pd.read_csv(root / "train.csv")
    ghosts = pd.DataFrame({"ID": ["g1", "g2"], "Label": ["3", "4"]})
    pd.concat([labels, ghosts]).to_csv(root / "train.csv", index=False)  # 2 of 4 labelled IDs lack files
    cv2.imwrite(str(root / "train" / "t1_yellow.png"), np.zeros((12, 24), np.uint8))  # a smaller channel
    sample = pd.read_csv(root / "sample_submission.csv")
    sample.loc[0, "ImageWidth"] = 2048  # the sample's size is not the file's
    sample.to_csv(root / "sample_submission.csv", index=False)
    problems = _problems(check.check_data(_cfg(root, tmp_path)))
    assert any("2 of 4 labelled IDs in train.csv lack channel files" in p and "g1, g2" in p for p in problems)
    assert any("channels of t1 differ in size" in p and "t1_yellow.png 24x12" in p for p in problems)
    assert any("s1: sample_submission.csv says 2048x16, s1_red.png is 32x16" in p for p in problems)
    assert any("1 test ID(s) are also labelled training images, e.g. t2" in p for p in problems)
    # within checks.max_missing_share, images without files are noted, not a problem
    relaxed = _problems(check.check_data(_cfg(root, tmp_path, "checks.max_missing_share=0.5")))
    assert not any("lack channel files" in p for p in relaxed)


def test_every_missing_weights_file_is_named_at_once(tmp_path, capsys, monkeypatch):
    """A config that needs the backbone's initial weights, Cellpose-SAM and SAM, none of them there: one
    check lists all three, each with where to get it; the stage exits 2 with one line."""
    monkeypatch.delenv("CELLPOSE_LOCAL_MODELS_PATH", raising=False)
    monkeypatch.delenv("WEAKCELL_SAM_WEIGHTS", raising=False)
    root = _layout(tmp_path / "data", {"t1": (24, 24)}, {"s1": (24, 24)})
    (tmp_path / "weights").mkdir()
    args = [
        f"paths.root={tmp_path}",
        "data.dataset=hpa2021",
        f"data.dir={root}",
        "model.pretrained_file=weights",
        "segment.backend=cellpose+sam",
        "segment.cellpose.weights=weights",
        "segment.sam.weights=weights",
    ]
    problems = _problems(check.check_weights(load_config(None, args)))
    assert [p.split(":")[0] for p in problems] == ["backbone", "cellpose", "sam"]
    assert "make weights" in problems[0] and "resnet18.pth" in problems[0]
    assert "cpsam from https://huggingface.co/mouseland/cellpose-sam" in problems[1]
    assert "sam_vit_b_01ec64.pth" in problems[2]
    assert main(["check", *args]) == 2
    captured = capsys.readouterr()
    assert captured.out.count("PROBLEM") == 3 and captured.err.count("\n") == 1
    assert "(and 2 more above)" in captured.err


def test_hpacellseg_weights_are_checked_too_both_files_named(tmp_path, monkeypatch):
    """The merge of hpacellseg: its two U-Nets are weights files `check` looks for, with where to get each
    (only the configured cell model, 2ch here)."""
    monkeypatch.delenv("WEAKCELL_HPACELLSEG_WEIGHTS", raising=False)
    root = _layout(tmp_path / "data", {"t1": (24, 24)}, {"s1": (24, 24)})
    (tmp_path / "weights").mkdir()
    args = [
        f"paths.root={tmp_path}",
        f"data.dir={root}",
        "segment.backend=hpacellseg",
        "segment.hpacellseg.weights=weights",
        "segment.hpacellseg.cell_model=2ch",
    ]
    problems = _problems(check.check_weights(load_config(None, args)))
    assert len(problems) == 1 and problems[0].startswith("hpacellseg: ")
    for name in (
        "dpn_unet_nuclei_v1.pth from https://zenodo.org",
        "dpn_unet_cell_v2.pth from https://zenodo.org",
    ):
        assert name in problems[0], name
    assert "dpn_unet_cell_3ch_v1" not in problems[0]


def test_an_unknown_backend_is_a_problem_of_the_segmentation_part(tmp_path):
    root = _layout(tmp_path / "data", {"t1": (24, 24)}, {"s1": (24, 24)})
    findings = check.check_segmentation(_cfg(root, tmp_path, "segment.backend=cellpos"))
    assert _problems(findings) == [
        "segment.backend='cellpos': unknown segmentation backend 'cellpos'; known: cellpose, classical, hpacellseg"
    ]


@pytest.mark.parametrize("dataset", ["hpa2021", "synthetic"])
def test_a_missing_dataset_folder_says_how_to_get_it(tmp_path, dataset):
    cfg = load_config(None, [f"paths.root={tmp_path}", f"data.dataset={dataset}"])
    (problem,) = _problems(check.check_data(cfg))
    assert ("make data" if dataset == "synthetic" else "make download") in problem


# -- data.sources ----------------------------------------------------------------------------------------


def _external(root: Path, train: dict[str, tuple[int, int]], labelled: list[str]) -> Path:
    """An external set in the hpa2021 layout: blank training images, ``labelled`` in its train.csv."""
    for image_id, (width, height) in train.items():
        write_image(root / "train", image_id, np.zeros((4, height, width), np.uint8))
    root.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"ID": labelled, "Label": ["0"] * len(labelled)}).to_csv(root / "train.csv", index=False)
    return root


def test_each_source_folder_is_checked_like_the_competitions(tmp_path):
    root = _layout(tmp_path / "data", {"t1": (24, 24)}, {"s1": (32, 16)})
    good = _external(tmp_path / "ext-good", {"e1": (48, 48), "e2": (48, 48)}, ["e1", "e2"])
    assert (
        check.check_sources(_cfg(root, tmp_path))[0].text == "no data.sources: the competition's images alone"
    )
    findings = check.check_sources(_cfg(root, tmp_path, f"data.sources=[{{dir: {good}}}]"))
    assert _problems(findings) == []
    assert [f.text for f in findings] == [
        "ext-good: train: 2 of 2 labelled images present (48x48 x 2; 8-bit x 8 files)"
    ]
    # a missing folder, a partial set, and an ID that is also the competition's: each named, at once
    partial = _external(tmp_path / "ext-partial", {"p1": (48, 48)}, ["p1", "p2", "p3"])
    sources = f"data.sources=[{{dir: {tmp_path / 'nowhere'}}}, {{dir: {good}}}, {{dir: {partial}}}]"
    problems = _problems(check.check_sources(_cfg(root, tmp_path, sources)))
    assert len(problems) == 2
    assert problems[0].startswith(
        f"data.sources: {tmp_path / 'nowhere'} has no train/ folder (source nowhere)"
    )
    assert problems[1].startswith("ext-partial: 2 of 3 labelled IDs in train.csv lack channel files")
    assert "download them (make external)" in problems[1]
    clash = _external(tmp_path / "ext-clash", {"t1": (48, 48)}, ["t1"])
    problems = _problems(check.check_sources(_cfg(root, tmp_path, f"data.sources=[{{dir: {clash}}}]")))
    assert problems == [
        "image t1 is in the label files of competition and ext-clash; image IDs must be unique over the "
        "sources (drop it from one of them)"
    ]
