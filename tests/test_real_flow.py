"""The README's "Real 2021 data, start to finish" block, run as written on a real-layout folder (issue 26).

The folder is built here from ``../shared/data/hpa2021``: 4 of its real training images and 1 test image
(a fifth real image under its own ID, listed in a one-row ``sample_submission.csv``), all area-downscaled
from 2048² to 512² to keep the run near a minute of CPU, with the rows of the real ``train.csv``. The
block's lines run in one bash script through ``make``, except those that need the network (``download``,
``wheels``, the real ``submit``); the project config ``make init`` writes gets the settings a 512² folder of
four images needs (nuclei a quarter the size, 2 folds, one epoch) and ``refine.rounds=0``, the choice
the issue found had to be repeated on every command.

The submission is then scored with ``weakcell score`` against a truth folder built from the
HPA-Cell-Segmentation masks of the test image (``<id>_cells.png`` + ``cells.csv``): every cell of the
mask is given the image's labels, a truth of the right shape for the metric, not real cell labels.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from tests.conftest import HPA2021_IDS, REPO, shared_path
from weakcell.data.images import read_image, write_image

SIDE = 512  # 2048² real images area-downscaled by 4
TEST_ID = "5c27f04c-bb99-11e8-b2b9-ac1f6b6435d0"  # 8|5|0: class 0 is also in the training images
SECTION = "## Real 2021 data, start to finish"
NEEDS_NETWORK = ("make download", "make wheels")
# what a 512² folder of four images needs, given to `make init` beside the README's data.dir
TINY_PROJECT = [
    "refine.rounds=0",
    "segment.classical.nucleus_diameter=45",
    "segment.classical.working_scale=0.5",
    "folds.n_splits=2",
    "cache.workers=1",
    "train.epochs=1",
    "train.batch_size=16",
    "train.checkpoint_every=0",
    "mil.epochs=2",
    "mil.batch_size=2",
    "infer.tta=[0]",
    "evaluate.attention_images=1",
]


def readme_block() -> list[str]:
    """The shell lines of the section's first bash block."""
    text = (REPO / "README.md").read_text()
    section = text[text.index(SECTION) :]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, f"no bash block in README section {SECTION!r}"
    return [line for line in block.group(1).splitlines() if line.strip()]


def as_script(lines: list[str], project: Path, data_dir: Path) -> str:
    """The block with the project and data folders of this test, the tiny settings added to `make init`,
    and without the lines that need the network."""
    out = ["set -euo pipefail"]
    for line in lines:
        command = line.split("#", 1)[0].strip()
        if command.startswith(NEEDS_NETWORK) or (
            command.startswith("make submit") and "dry_run" not in command
        ):
            continue
        command = command.replace("~/hpa/data/hpa2021", str(data_dir)).replace("~/hpa", str(project))
        if command.startswith("make init"):
            command = command.replace(
                f'ARGS="data.dir={data_dir}', f'ARGS="data.dir={data_dir} {" ".join(TINY_PROJECT)}'
            )
        out += [f"echo '>>> {command}'", command]
    return "\n".join(out) + "\n"


def _downscale(image: np.ndarray) -> np.ndarray:
    return np.stack([cv2.resize(plane, (SIDE, SIDE), interpolation=cv2.INTER_AREA) for plane in image])


def real_layout(root: Path) -> tuple[Path, Path]:
    """``root/data/hpa2021`` in Kaggle's layout and ``root/truth`` for the test image; returns both."""
    source = shared_path("hpa2021")
    data = root / "data" / "hpa2021"
    labels = pd.read_csv(source / "train.csv", dtype=str).set_index("ID")
    train_ids = [i for i in HPA2021_IDS if i != TEST_ID][:4]
    for image_id in train_ids:
        write_image(data / "train", image_id, _downscale(read_image(source / "train", image_id)))
    labels.loc[train_ids].reset_index().to_csv(data / "train.csv", index=False)
    write_image(data / "test", TEST_ID, _downscale(read_image(source / "train", TEST_ID)))
    sample = pd.DataFrame(
        {
            "ID": [TEST_ID],
            "ImageWidth": [SIDE],
            "ImageHeight": [SIDE],
            "PredictionString": ["0 1 eNoLCAgIMAEABJkBdQ=="],
        }
    )
    sample.to_csv(data / "sample_submission.csv", index=False)

    truth = root / "truth"
    truth.mkdir()
    mask = cv2.imread(str(source / "hpacellseg_masks" / f"{TEST_ID}_predictedmask.png"), cv2.IMREAD_UNCHANGED)
    cells = cv2.resize(mask, (SIDE, SIDE), interpolation=cv2.INTER_NEAREST)
    cv2.imwrite(str(truth / f"{TEST_ID}_cells.png"), cells)
    cell_ids = [int(c) for c in np.unique(cells) if c]
    label = labels.loc[TEST_ID, "Label"]
    pd.DataFrame({"image_id": TEST_ID, "cell_id": cell_ids, "Label": label}).to_csv(
        truth / "cells.csv", index=False
    )
    return data, truth


@pytest.mark.skipif(sys.platform != "linux", reason="the Makefile's shell steps are tested on Linux")
def test_the_readme_real_2021_section_runs_as_written(tmp_path):
    data, truth = real_layout(tmp_path)
    project = tmp_path / "hpa"
    script = tmp_path / "readme.sh"
    script.write_text(as_script(readme_block(), project, data))
    env = {
        **os.environ,
        "VENV": sys.prefix,  # the Makefile's python: the one running this test
        "PYTHONPATH": str(REPO / "src"),
        "KAGGLE_CONFIG_DIR": str(tmp_path / "no-kaggle-token"),
        "KAGGLE_USERNAME": "tester",
    }
    run = subprocess.run(
        ["bash", str(script)], cwd=REPO, env=env, capture_output=True, text=True, timeout=900
    )
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-6000:]

    # the one config decided every step: no refinement anywhere
    submission = project / "submissions" / "hpa2021"
    packed = json.loads((project / "dist/kaggle/weakcell-weights-hpa2021/hpa2021/packed.json").read_text())
    assert (packed["round"], packed["folds"]) == (0, [0, 1])
    kernel = (project / "kernels/inference/weakcell-inference.py").read_text()
    assert '"refine.rounds=0"' in kernel and "'round': 0" in kernel
    assert "refine: refine.rounds=0, nothing to do" in log
    assert "would run `kaggle kernels push -p" in log  # the dry run passed the agreement check
    # 4 training images: the thresholds could not be tuned, and say so
    thresholds = json.loads((project / "runs/hpa2021/thresholds.json").read_text())
    assert thresholds["warnings"] and "WARNING" in log
    assert (submission / "image_level.csv").read_text().startswith("ID,Label\n")

    validate = [sys.executable, "-m", "weakcell", "validate", str(submission / "cell_level.csv")]
    checked = subprocess.run(
        [*validate, "--sample", str(data / "sample_submission.csv"), "--published"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert checked.returncode == 0, checked.stderr
    score_json = tmp_path / "score.json"
    scored = subprocess.run(
        [
            sys.executable,
            "-m",
            "weakcell",
            "score",
            str(submission / "cell_level.csv"),
            "--truth",
            str(truth),
            "--json",
            str(score_json),
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert scored.returncode == 0, scored.stderr
    score = json.loads(score_json.read_text())
    assert 0.0 <= score["map"] <= 1.0
    judged = {c for c, ap in score["ap"].items() if ap is not None}
    assert judged == {"0", "5", "8"}  # the test image's classes, every cell of the truth carrying them
