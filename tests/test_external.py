"""``make external`` against a fake HPA site on 127.0.0.1 (tests/fake_hpa.py): real planes of
../shared/data/hpa2021/train (generated ones when it is absent) served as JPEG and 16-bit .tif.gz, with a
corrupt JPEG, 404s, a 500 that succeeds on retry, a stalled answer, a truncated body and a killed run."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

pytest.importorskip(
    "urllib3", reason="the downloader's extra (pip install weakcell[external]) is not installed"
)

from tests.conftest import REPO, SHARED_DATA
from tests.fake_hpa import FakeSite, Route, jpeg, serve, source_images, tif_gz
from weakcell.cli import split_args
from weakcell.config import load_config
from weakcell.constants import CHANNELS
from weakcell.data.datasets import get_dataset
from weakcell.data.decode import decode_channel
from weakcell.data.images import ImageReadError
from weakcell.errors import StageError
from weakcell.external import stage
from weakcell.external.convert import ImageRejected, to_stored
from weakcell.external.lists import ListError, channel_file, read_image_list
from weakcell.external.locations import LOCATION_TABLES, map_locations

REAL_TRAIN = SHARED_DATA / "hpa2021" / "train"
HOST = "https://images.proteinatlas.org"


def write_list(path: Path, rows: list[tuple[str, str, str, str]]) -> Path:
    """The hosts' list form: Image, Cellline, in_trainset, Label (location names, comma-separated)."""
    table = pd.DataFrame(rows, columns=["Image", "Cellline", "in_trainset", "Label"])
    table.to_csv(path, sep="\t", index=False)
    return path


def config(tmp_path: Path, site: FakeSite, image_list: Path, *extra: str):  # type: ignore[no-untyped-def]
    return load_config(
        None,
        [
            f"paths.root={tmp_path}",
            "data.dataset=hpa2021",
            f"external.image_list={image_list}",
            f"external.base_url={site.base}",
            "external.timeout_s=0.5",
            "external.retries=2",
            "external.backoff_s=0.01",
            "external.rate=1000",
            "external.workers=3",
            *extra,
        ],
    )


def stored(folder: Path, image_id: str) -> np.ndarray:
    return np.stack([cv2.imread(str(folder / f"{image_id}_{c}.png"), cv2.IMREAD_UNCHANGED) for c in CHANNELS])


def served(site: FakeSite, path: str) -> np.ndarray:
    """The plane a client decodes from what the site serves at ``path``."""
    body = site.routes[path].body
    assert body is not None
    return decode_channel(body, path)


@pytest.fixture(scope="module")
def planes() -> list[np.ndarray]:
    return source_images(REAL_TRAIN if REAL_TRAIN.is_dir() else None, 8)


def test_faults_fallbacks_filters_and_a_rerun(tmp_path, planes, capsys):
    site = FakeSite()
    stems = ["10001/1_A1_1", "10002/1_B2_1", "10003/1_C3_1", "10004/1_D4_1", "10005/1_E5_1", "10006/1_F6_1"]
    for stem, image in zip([*stems, "10011/1_K1_1", "10012/1_L2_1"], planes):
        site.add_image(stem, image)
    green_b = site.routes["/10002/1_B2_1_green.jpg"].body
    assert green_b is not None
    # a JPEG that does not decode (served whole: its Content-Length is its own)
    site.routes["/10002/1_B2_1_green.jpg"] = Route(green_b[: len(green_b) // 2])
    site.routes["/10003/1_C3_1_blue.jpg"] = Route(None)
    site.routes["/10003/1_C3_1_blue.tif.gz"] = Route(None)
    site.routes["/10004/1_D4_1_red.jpg"].fault, site.routes["/10004/1_D4_1_red.jpg"].fail = "500", 1
    site.routes["/10005/1_E5_1_yellow.jpg"].fault, site.routes["/10005/1_E5_1_yellow.jpg"].fail = "stall", -1
    site.routes["/10006/1_F6_1_green.jpg"].fault, site.routes["/10006/1_F6_1_green.jpg"].fail = "truncate", 1
    site.routes["/10012/1_L2_1_red.jpg"].fault, site.routes["/10012/1_L2_1_red.jpg"].fail = "truncate", -1
    image_list = write_list(
        tmp_path / "kaggle_2021.tsv",
        [
            (f"{HOST}/10001/1_A1_1", "U-2 OS", "False", "Nucleoplasm,Vesicles"),
            (f"{HOST}/10002/1_B2_1", "A-431", "False", "Cell Junctions"),
            (f"{HOST}/10003/1_C3_1", "HeLa", "False", "Golgi apparatus"),
            (f"{HOST}/10004/1_D4_1", "HeLa", "False", "No staining"),
            (f"{HOST}/10005/1_E5_1", "A549", "False", "Nucleoli, Rods & Rings"),
            (f"{HOST}/10006/1_F6_1", "PC-3", "False", "Focal adhesion sites,Actin filaments"),
            (f"{HOST}/10007/1_G7_1", "U-2 OS", "True", "Nucleoplasm"),  # in the competition's train set
            (f"{HOST}/10008/1_H8_1", "U-2 OS", "False", ""),  # empty label
            (f"{HOST}/10009/1_I9_1", "U-2 OS", "False", "Rods & Rings"),  # no 2021 class
            (f"{HOST}/10010/1_J1_1", "MCF7", "False", "Cytosol"),  # another cell line
            (f"{HOST}/10011/1_K1_1", "MCF7", "False", "Mitotic spindle"),  # kept: class 11 from any line
            (f"{HOST}/10012/1_L2_1", "HeLa", "False", "Cytosol"),
        ],
    )
    with serve(site):
        cfg = config(tmp_path, site, image_list, "external.keep_classes=[11]")
        tally = stage.run(cfg)
        out = capsys.readouterr().out
        first_counts = dict(site.requests)
        assert tally is not None and tally.stored == 7 and tally.fallback == 3
        folder = tmp_path / "data" / "hpa2021-external"
        labels = pd.read_csv(folder / "train.csv", dtype=str)
        assert labels.to_dict("list") == {
            "ID": [
                "10001_1_A1_1",
                "10002_1_B2_1",
                "10004_1_D4_1",
                "10005_1_E5_1",
                "10006_1_F6_1",
                "10011_1_K1_1",
                "10012_1_L2_1",
            ],
            "Label": ["0|17", "13", "18", "2", "9", "11", "16"],
        }
        sources = pd.read_csv(folder / "sources.csv", dtype=str, keep_default_na=False).set_index("ID")
        assert sources.loc["10003_1_C3_1", "status"] == "failed"
        assert sources.loc["10003_1_C3_1", "reason"] == "blue: jpg: HTTP 404; tif.gz: HTTP 404"
        assert sources.loc["10002_1_B2_1", "format"] == "jpg|tif.gz|jpg|jpg"
        assert sources.loc["10002_1_B2_1", "reason"] == "green: jpg: does not decode"
        assert sources.loc["10005_1_E5_1", "reason"] == "yellow: jpg: timeout"
        assert sources.loc["10004_1_D4_1", "reason"] == ""  # retried, not a fallback
        assert sources.loc["10012_1_L2_1", "reason"] == "red: jpg: broken or truncated body"
        assert sources.loc["10005_1_E5_1", "format"] == "jpg|jpg|jpg|tif.gz"
        assert (
            sources.loc["10002_1_B2_1", "bit_depth"] == "16"
            and sources.loc["10001_1_A1_1", "bit_depth"] == "8"
        )
        assert sources.loc["10001_1_A1_1", "antibody"] == "10001"
        assert sources.loc["10001_1_A1_1", "url_stem"] == f"{site.base}/10001/1_A1_1"
        for image_id in labels["ID"]:
            for color in CHANNELS:
                path = folder / "train" / f"{image_id}_{color}.png"
                assert (
                    sources.loc[image_id, f"sha256_{color}"] == hashlib.sha256(path.read_bytes()).hexdigest()
                )
        # the TIFF fallback is the plane itself (v * 257 scaled back); a JPEG channel is its decoded file
        b_planes = stored(folder / "train", "10002_1_B2_1")
        assert np.array_equal(b_planes[1], planes[1][1])
        assert np.array_equal(b_planes[0], served(site, "/10002/1_B2_1_red.jpg"))
        # retries: the 500 once, the truncated body once, the stalled answer 1 + 2 retries, then its TIFF
        assert first_counts["/10004/1_D4_1_red.jpg"] == 2
        assert first_counts["/10006/1_F6_1_green.jpg"] == 2
        assert first_counts["/10005/1_E5_1_yellow.jpg"] == 3
        assert first_counts["/10005/1_E5_1_yellow.tif.gz"] == 1
        assert first_counts["/10012/1_L2_1_red.jpg"] == 3
        # a failed channel stops its image: the yellow of 10003 is never asked for
        assert site.count("10003/1_C3_1") == 4 and "/10003/1_C3_1_yellow.jpg" not in first_counts
        assert site.count("10007/1_G7_1") == 0 and site.count("10010/1_J1_1") == 0
        for line in (
            "dropped 1: in the competition's train set",
            "dropped 1: empty label",
            "dropped 1: no location of the class table",
            "dropped 1: other cell lines",
            "Rods & Rings (2)",
            "7 images stored (3 with a TIFF fallback)",
            "1 failed (blue: jpg: HTTP 404; tif.gz: HTTP 404: 1)",
        ):
            assert line in out, line

        # a rerun asks only for the failed image again
        stage.run(cfg)
        again = {path: n - first_counts.get(path, 0) for path, n in site.requests.items()}
        assert {path for path, n in again.items() if n} == {
            "/10003/1_C3_1_red.jpg",
            "/10003/1_C3_1_green.jpg",
            "/10003/1_C3_1_blue.jpg",
            "/10003/1_C3_1_blue.tif.gz",
        }
        assert "7 already done" in capsys.readouterr().out


def test_a_killed_run_resumes_without_refetching(tmp_path, planes):
    site = FakeSite()
    stems = [f"2000{k}/3_A{k}_1" for k in range(8)]
    for stem, image in zip(stems, planes):
        site.add_image(stem, image)
        for color in CHANNELS:
            site.routes[f"/{stem}_{color}.jpg"].delay = 0.05  # about 0.2 s an image: time to kill it midway
    image_list = write_list(
        tmp_path / "list.tsv", [(f"{HOST}/{stem}", "HeLa", "False", "Cytosol") for stem in stems]
    )
    folder = tmp_path / "data" / "hpa2021-external"
    log = folder / stage.LOG
    with serve(site):
        cfg = config(tmp_path, site, image_list, "external.workers=1")
        overrides = [
            f"paths.root={tmp_path}",
            "data.dataset=hpa2021",
            f"external.image_list={image_list}",
            f"external.base_url={site.base}",
            "external.workers=1",
            "external.rate=1000",
        ]
        env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
        child = subprocess.Popen(
            [sys.executable, "-m", "weakcell", "external", *overrides],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (not log.is_file() or len(log.read_text().splitlines()) < 3):
            time.sleep(0.02)
        child.send_signal(signal.SIGKILL)
        child.wait()
        finished = [line.split('"ID": "')[1].split('"')[0] for line in log.read_text().splitlines()]
        assert 3 <= len(finished) < len(stems), "the run was not killed midway"
        before = {stem: site.count(stem) for stem in stems}
        stage.run(cfg)
    for image_id in finished:
        stem = f"{image_id.split('_')[0]}/{image_id.split('_', 1)[1]}"
        assert before[stem] == site.count(stem) == len(CHANNELS), f"{stem} was fetched again"
    labels = pd.read_csv(folder / "train.csv", dtype=str)
    assert len(labels) == len(stems) and set(labels["Label"]) == {"16"}
    assert not list((folder / "train").glob("*.tmp"))
    for stem, image_id in zip(stems, labels["ID"]):
        assert np.array_equal(stored(folder / "train", image_id)[3], served(site, f"/{stem}_yellow.jpg"))


def test_dry_run_fetches_nothing_and_estimates(tmp_path, capsys):
    site = FakeSite()
    image_list = write_list(
        tmp_path / "list.tsv",
        [(f"{HOST}/1/2_A1_1", "HeLa", "False", "Cytosol"), (f"{HOST}/1/2_A2_1", "HeLa", "False", "Nucleoli")],
    )
    with serve(site):
        argv_overrides = split_args(["--dry-run"])[1]
        assert argv_overrides == ["external.dry_run=true"]
        assert stage.run(config(tmp_path, site, image_list, *argv_overrides)) is None
    out = capsys.readouterr().out
    assert not site.requests and not (tmp_path / "data").exists()
    # 2 images x 4 channels x 5.12 Mpx x 0.138 B/px = 5.65 MB; at 1000 requests/s 8 requests take 0 min
    assert "8 JPEG requests" in out and "about 0.0 GB" in out and "dry run, nothing fetched" in out


def test_disk_check_refuses_with_the_fix(tmp_path, monkeypatch):
    site = FakeSite()
    image_list = write_list(tmp_path / "list.tsv", [(f"{HOST}/1/2_A1_1", "HeLa", "False", "Cytosol")])
    monkeypatch.setattr(stage, "_free_bytes", lambda folder: 1000)
    with serve(site), pytest.raises(StageError, match=r"external.check_disk=false"):
        stage.run(config(tmp_path, site, image_list))
    assert not site.requests


def test_hpav18_list_and_unsafe_rows(tmp_path):
    v18 = tmp_path / "HPAv18RBGY_wodpl.csv"
    pd.DataFrame({"Id": ["10580_1610_C1_1", "7_99_H12_3"], "Target": ["0 25", "22 27"]}).to_csv(
        v18, index=False
    )
    images, fmt = read_image_list(v18)
    assert fmt.name == "hpav18"
    assert images["url_stem"].tolist() == [
        "http://v18.proteinatlas.org/images/10580/1610_C1_1",
        "http://v18.proteinatlas.org/images/7/99_H12_3",
    ]
    assert images["antibody"].tolist() == ["10580", "7"]
    assert images["locations"].tolist() == [["Nucleoplasm", "Cytosol"], ["Cell junctions", "Rods & rings"]]
    for bad in (
        f"{HOST}/../etc/passwd",
        f"{HOST}/1/2_A1_1?x=1",
        "ftp://host/1/2_A1_1",
        f"{HOST}/1/2 A1_1",
        f"{HOST}/1",
    ):
        bad_list = write_list(tmp_path / "bad.tsv", [(bad, "HeLa", "False", "Cytosol")])
        with pytest.raises(ListError, match="row 1"):
            read_image_list(bad_list)
    with pytest.raises(ListError, match="unsafe file name"):
        channel_file(tmp_path, "../x_1_1", "red")
    with pytest.raises(ListError, match="unsafe file name"):
        channel_file(tmp_path, "1_2_A1_1", "red/../../x")


def test_external_ids_follow_the_one_id_rule(tmp_path):
    """An external image's ID is ``weakcell.data.ids.safe_stem`` of its public name, never cut short; its
    channel files are built by ``inside``; a ``sources.csv`` read back is checked like any label file."""
    from weakcell.data.ids import IdError, is_safe_id, safe_stem
    from weakcell.external.lists import image_id
    from weakcell.fold_groups import read_external_set

    assert image_id("10580", "1717_F9_1") == safe_stem("10580/1717_F9_1") == "10580_1717_F9_1"
    assert is_safe_id(image_id("10580", "1717_F9_1"))
    with pytest.raises(ListError, match="longer than an image ID may be"):
        image_id("1" * 64, "_".join(["2" * 64] * 3))
    assert channel_file(tmp_path, "10580_1717_F9_1", "red") == tmp_path / "10580_1717_F9_1_red.png"
    spec = get_dataset("hpa2021")
    (tmp_path / spec.label_file).write_text("ID,Label\n10580_1717_F9_1,0\n")
    (tmp_path / "sources.csv").write_text("ID,antibody\n10580_1717_F9_1,10580\n../../evil,1\n")
    with pytest.raises(IdError, match=r"sources\.csv row 2: ID '\.\./\.\./evil' is not a safe image ID"):
        read_external_set(tmp_path, spec)


def test_location_tables_by_hand():
    table_2021 = LOCATION_TABLES["hpa2021"][1]
    table_2018 = LOCATION_TABLES["hpa2018"][1]
    names = [
        "Vesicles",
        "Cell Junctions",
        "Rods & Rings",
        "No staining",
        "Centriolar satellite",
        "Nucleoplasm",
    ]
    assert map_locations(names, table_2021) == ([0, 12, 13, 17, 18], ["Rods & Rings"])
    assert map_locations(names, table_2018) == (
        [0, 22, 27],
        ["Vesicles", "No staining", "Centriolar satellite"],
    )


def test_sixteen_bit_rule_and_equal_sizes():
    container = np.array([[0, 200], [255, 7]], np.uint16)  # 8-bit values in a 16-bit file: kept
    wide = np.array([[0, 65535], [257, 129]], np.uint16)  # real 16-bit: round(v / 257)
    eight = np.array([[1, 2], [3, 4]], np.uint8)
    kept = to_stored([container, eight, eight, eight], None)
    assert kept.image[0].tolist() == [[0, 200], [255, 7]] and kept.bit_depth == 16
    # one image: the rule looks at both 16-bit planes together
    scaled = to_stored([wide, container, eight, eight], None)
    assert scaled.image[0].tolist() == [[0, 255], [1, 1]] and scaled.image[1].tolist() == [[0, 1], [1, 0]]
    assert to_stored([eight] * 4, None).bit_depth == 8
    resized = to_stored([np.full((8, 4), 9, np.uint8)] * 4, 4)
    assert resized.image.shape == (4, 4, 2) and resized.native == (8, 4)
    with pytest.raises(ImageRejected, match="differ in size"):
        to_stored([eight, eight, eight, np.zeros((3, 2), np.uint8)], None)


def test_decoding_is_strict(planes):
    plane = planes[0][2]
    good = jpeg(plane)
    assert decode_channel(good, "x_blue.jpg").shape == plane.shape
    with pytest.raises(ImageReadError, match=r"x_blue\.jpg"):
        decode_channel(good[: len(good) // 2], "x_blue.jpg")
    _, png = cv2.imencode(".png", plane)
    with pytest.raises(ImageReadError):
        decode_channel(png.tobytes()[:-40], "x_blue.png")
    sixteen = decode_channel(tif_gz(plane), "x_blue.tif.gz")
    assert sixteen.dtype == np.uint16 and np.array_equal(sixteen, plane.astype(np.uint16) * 257)
    with pytest.raises(ImageReadError):
        decode_channel(tif_gz(plane)[:100], "x_blue.tif.gz")
