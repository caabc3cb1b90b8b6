from __future__ import annotations

import numpy as np
import pytest
import tifffile

from tests.conftest import HPA2021_IDS, shared_path
from weakcell.constants import CHANNELS, HPA2018_CLASSES, HPA2021_CLASSES
from weakcell.data.datasets import DATASETS, get_dataset
from weakcell.data.images import (
    ImageReadError,
    composite_rgb,
    list_image_ids,
    read_channel,
    read_image,
    to_uint8,
    write_channel,
    write_image,
)
from weakcell.data.labels import LabelError, format_labels, parse_labels, read_label_file, to_multi_hot

HPA2021 = get_dataset("hpa2021")
HPA2018 = get_dataset("hpa2018")


# -- labels -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("spec", "text"), [(HPA2021, "7|1|2|0"), (HPA2018, "7 1 2 0")])
def test_labels_parse_and_format_both_ways(spec, text):
    labels = parse_labels(text, spec.label_sep, spec.n_classes)
    assert labels == [0, 1, 2, 7]
    assert parse_labels(format_labels(labels, spec.label_sep), spec.label_sep, spec.n_classes) == labels


def test_duplicate_labels_in_a_string_collapse():
    # the real 2021 train.csv has rows such as "13|0|13"
    assert parse_labels("13|0|13", "|", 19) == [0, 13]


@pytest.mark.parametrize(("text", "problem"), [("19", "out of range"), ("3|x", "not a class"), ("", "empty")])
def test_bad_label_strings_fail_clearly(text, problem):
    with pytest.raises(LabelError, match=problem):
        parse_labels(text, "|", 19)


def test_label_file_errors_name_rows(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("ID,Label\na,1|2\nb,19\nc,\na,3\n")
    with pytest.raises(LabelError) as err:
        read_label_file(path, HPA2021)
    message = str(err.value)
    assert str(path) in message
    assert "row 2 (b): class 19 is out of range" in message
    assert "row 3 (c): empty label string" in message
    assert "duplicate ID a on rows [1, 4]" in message


def test_label_file_wrong_columns(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("Id,Target\na,1 2\n")
    with pytest.raises(LabelError, match="missing column"):
        read_label_file(path, HPA2021)
    assert read_label_file(path, HPA2018)["labels"].tolist() == [[1, 2]]


def test_class_tables_defined_once():
    assert len(HPA2021_CLASSES) == 19 and HPA2021_CLASSES[18] == "Negative"
    assert len(HPA2018_CLASSES) == 28
    assert DATASETS["synthetic"].classes is HPA2021_CLASSES
    with pytest.raises(KeyError, match="known"):
        get_dataset("hpa2019")


def test_multi_hot():
    assert to_multi_hot([[0, 2], [1]], 3).tolist() == [[1, 0, 1], [0, 1, 0]]


def test_real_hpa2021_label_files(hpa2021_dir):
    labels = read_label_file(hpa2021_dir / "train.csv", HPA2021)
    assert len(labels) == 21806
    by_id = dict(zip(labels["ID"], labels["labels"]))
    for image_id, expected in HPA2021_IDS.items():
        assert by_id[image_id] == expected


def test_real_hpa2018_label_file():
    labels = read_label_file(shared_path("hpa2018", "train.csv"), HPA2018)
    assert len(labels) == 31072
    assert max(max(row) for row in labels["labels"]) <= 27


# -- images -------------------------------------------------------------------------------------------


def _write_set(folder, image_id, planes):
    for channel, plane in zip(CHANNELS, planes):
        write_channel(folder / f"{image_id}_{channel}.png", plane)


def test_image_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (4, 40, 30), dtype=np.uint8)
    write_image(tmp_path, "abc", image)
    assert list_image_ids(tmp_path) == ["abc"]
    np.testing.assert_array_equal(read_image(tmp_path, "abc"), image)


def test_sixteen_bit_scaled_consistently(tmp_path):
    plane16 = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    assert to_uint8(plane16).tolist() == [[0, 1, 128, 255]]
    tifffile.imwrite(tmp_path / "x_red.tif", plane16)
    write_channel(tmp_path / "x_green.png", plane16)  # 16-bit PNG
    assert read_channel(tmp_path / "x_red.tif").tolist() == [[0, 1, 128, 255]]
    assert read_channel(tmp_path / "x_green.png").tolist() == [[0, 1, 128, 255]]


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_rgba_channel_file_reads_its_colour_not_its_alpha(tmp_path, suffix):
    """An opaque RGBA channel file (alpha 255 everywhere) reads as its brightest colour component."""
    stain = np.array([[0, 40], [200, 7]], dtype=np.uint8)
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[..., 1] = stain  # green in both BGR(A) and RGB(A) order
    rgba[..., 0] = stain // 2  # a dimmer component that must not win
    rgba[..., 3] = 255  # opaque
    path = tmp_path / f"x_green{suffix}"
    if suffix == ".png":
        import cv2

        assert cv2.imwrite(str(path), rgba)
    else:
        tifffile.imwrite(path, rgba, photometric="rgb", extrasamples=["unassalpha"])
    assert read_channel(path).tolist() == [[0, 40], [200, 7]]


def test_missing_channel_names_file(tmp_path):
    planes = np.zeros((4, 8, 8), dtype=np.uint8)
    _write_set(tmp_path, "img", planes)
    (tmp_path / "img_yellow.png").unlink()
    with pytest.raises(ImageReadError, match=r"img_yellow"):
        read_image(tmp_path, "img")


def test_corrupt_png_names_file(tmp_path):
    _write_set(tmp_path, "img", np.zeros((4, 8, 8), dtype=np.uint8))
    (tmp_path / "img_blue.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(ImageReadError, match=r"img_blue\.png"):
        read_image(tmp_path, "img")


def test_mismatched_sizes_name_files(tmp_path):
    _write_set(tmp_path, "img", np.zeros((4, 8, 8), dtype=np.uint8))
    write_channel(tmp_path / "img_red.png", np.zeros((8, 9), dtype=np.uint8))
    with pytest.raises(ImageReadError, match=r"differ in size.*img_red\.png 9x8"):
        read_image(tmp_path, "img")


def test_real_hpa2021_image(hpa2021_dir):
    image_id = next(iter(HPA2021_IDS))
    image = read_image(hpa2021_dir / "train", image_id)
    assert image.shape == (4, 2048, 2048) and image.dtype == np.uint8
    # nuclei (blue) are a minority of pixels but clearly brighter than background
    blue = image[2]
    assert np.percentile(blue, 99) > 4 * max(np.median(blue), 1)
    assert composite_rgb(image[:, :64, :64]).shape == (64, 64, 3)


def test_real_dsb_uint16_tif():
    plane = read_channel(shared_path("dsb2018_nuclei", "img2d.tif"))
    raw = tifffile.imread(shared_path("dsb2018_nuclei", "img2d.tif"))
    assert plane.shape == raw.shape == (512, 512) and plane.dtype == np.uint8
    assert int(plane.max()) == round(int(raw.max()) / 257)
