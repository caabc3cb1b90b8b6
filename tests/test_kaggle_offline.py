"""The generated inference kernel, run as Kaggle runs it: internet off, a Python image that has torch & co.
but neither weakcell nor the packages of ``kaggle.wheels``, and only attached inputs.

A tiny synthetic run is trained and predicted locally; ``make wheels``, ``make weights-dataset`` and
``make kernels`` then fill a temporary ``input/`` laid out like a Kaggle session (the competition folder
holds the synthetic test split in the 2021 layout), and the kernel script runs in a fresh virtual
environment with the network cut (``unshare -rn`` where it works, and a socket guard in any case). Its
``working/submission.csv`` must be valid and match the local ``cell_level.csv`` of the same images.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import pandas as pd

from tests.test_train import TINY
from weakcell import folds as folds_stage
from weakcell import infer as infer_stage
from weakcell import thresholds as thresholds_stage
from weakcell import train as train_stage
from weakcell.cache import build as cache_stage
from weakcell.config import load_config
from weakcell.kagglekit import datasets, kernels, naming
from weakcell.submission import validate_cell_level
from weakcell.synthetic import writer as data_stage

# Loaded by the kernel's Python before anything else: any internet socket or name lookup fails.
SOCKET_GUARD = '''"""Offline test: the Kaggle kernel must not touch the network."""
import socket

_connect = socket.socket.connect


def _refuse(*args, **kwargs):
    raise OSError("network access blocked: a Kaggle kernel with internet off")


def _connect_offline(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        _refuse()
    return _connect(self, address)


socket.socket.connect = _connect_offline
socket.getaddrinfo = _refuse
socket.create_connection = _refuse
'''


def unshare_prefix() -> list[str]:
    """``unshare -rn`` (a new network namespace with no interface up) when this machine allows it."""
    if shutil.which("unshare") is None:
        return []
    probe = subprocess.run(["unshare", "-rn", "true"], capture_output=True)
    return ["unshare", "-rn"] if probe.returncode == 0 else []


def kaggle_image(folder: Path, lacking: list[str]) -> Path:
    """A fresh venv standing in for the Kaggle image; returns its python. It sees every package of this
    environment except weakcell and ``lacking``, through a .pth naming a folder of symlinks outside the
    venv (quick, and pip never uninstalls what lies outside the environment it installs into)."""
    venv = folder / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    excluded = set()
    for name in ["weakcell", *lacking]:
        files = importlib.metadata.distribution(name).files or []
        excluded |= {Path(str(f)).parts[0] for f in files if not str(f).startswith("..")}
    image = folder / "kaggle-image"
    image.mkdir()
    # this environment's site-packages, then any others on the path (the first holding a name wins)
    site_dirs = [Path(sysconfig.get_paths()[k]) for k in ("purelib", "platlib")]
    site_dirs += [Path(p) for p in sys.path if p.endswith("site-packages")]
    for site_dir in dict.fromkeys(d for d in site_dirs if d.is_dir()):
        for entry in site_dir.iterdir():
            skip = entry.suffix == ".pth" or entry.name == "__pycache__" or entry.name in excluded
            if skip or entry.name.startswith(("weakcell", "__editable__")) or (image / entry.name).exists():
                continue
            (image / entry.name).symlink_to(entry)
    (Path(purelib) / "kaggle_image.pth").write_text(f"{image}\n")
    (Path(purelib) / "sitecustomize.py").write_text(SOCKET_GUARD)
    return python


def parse(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def assert_same_predictions(kernel_csv: Path, local_csv: Path) -> None:
    """Same IDs, sizes, labels and masks; confidences equal to the 4 printed digits (last-digit slack)."""
    kernel, local = parse(kernel_csv), parse(local_csv)
    assert kernel[["ID", "ImageWidth", "ImageHeight"]].equals(local[["ID", "ImageWidth", "ImageHeight"]])
    for image_id, ours, theirs in zip(kernel["ID"], kernel["PredictionString"], local["PredictionString"]):
        a, b = ours.split(), theirs.split()
        assert len(a) == len(b), image_id
        assert a[0::3] == b[0::3] and a[2::3] == b[2::3], f"labels or masks differ for {image_id}"
        np.testing.assert_allclose(np.array(a[1::3], float), np.array(b[1::3], float), rtol=2e-3, atol=1e-6)


def test_generated_kernel_reproduces_local_inference_offline(tmp_path):
    local = tmp_path / "local"
    cfg = load_config(
        None,
        [
            f"paths.root={local}",
            *TINY,
            "name=kaggle-e2e",
            "refine.rounds=0",
            "kaggle.owner=tester",
            "kaggle.variants=[inference]",
        ],
    )
    data_stage.run(cfg)
    folds_stage.run(cfg)
    cache_stage.run(cfg)
    train_stage.run(cfg)
    thresholds_stage.run(cfg)
    local_csv = infer_stage.run(cfg) / "cell_level.csv"

    wheels_dir = datasets.wheels(cfg)
    weights_dir = datasets.weights_dataset(cfg)
    (kernel_dir,) = kernels.run(cfg)
    script = kernel_dir / kernels.kernel_metadata(cfg, "inference")["code_file"]

    # /kaggle/input and /kaggle/working, as a session with the competition and both datasets attached
    kaggle = tmp_path / "kaggle"
    competition = kaggle / "input" / naming.competition_slug(cfg)
    shutil.copytree(cfg.data_dir / "test", competition / "test")
    for name in ("sample_submission.csv", "train.csv"):
        shutil.copy2(cfg.data_dir / name, competition / name)
    shutil.copytree(wheels_dir, kaggle / "input" / naming.wheels_slug(cfg), copy_function=os.link)
    shutil.copytree(weights_dir, kaggle / "input" / naming.weights_slug(cfg), copy_function=os.link)
    working = kaggle / "working"
    working.mkdir()

    python = kaggle_image(tmp_path, cfg.kaggle.wheels)
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path / "home"),
        "LANG": "C.UTF-8",
        "KAGGLE_INPUT": str(kaggle / "input"),
        "KAGGLE_WORKING": str(working),
        "PIP_CONFIG_FILE": os.devnull,  # no index, find-links or constraints of this machine
        "PYTHONNOUSERSITE": "1",
    }
    offline = unshare_prefix()

    def image_runs(code: str) -> bool:
        return (
            subprocess.run([*offline, str(python), "-c", code], env=env, capture_output=True).returncode == 0
        )

    # the stand-in image has torch but neither weakcell nor iterative-stratification, and no network
    assert image_runs("import torch, timm, pandas") and not image_runs("import weakcell")
    assert not image_runs("import iterstrat")
    assert not image_runs("import socket; socket.create_connection(('pypi.org', 443), timeout=5)")
    start = time.perf_counter()
    result = subprocess.run(
        [*offline, str(python), str(script)],
        cwd=working,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    seconds = time.perf_counter() - start
    log = result.stdout[-4000:] + result.stderr[-4000:]
    assert result.returncode == 0, log
    print(result.stdout[-3000:])
    print(f"kernel run offline ({'unshare -rn' if offline else 'socket guard'}): {seconds:.1f} s")

    # weakcell and iterative-stratification came from the wheels dataset, into the kernel's environment
    purelib = next((tmp_path / "venv" / "lib").glob("python3*/site-packages"))
    installed = {p.name.split("-")[0].lower() for p in purelib.glob("*.dist-info")}
    assert {"weakcell", "iterative_stratification"} <= installed, installed

    submission = working / "submission.csv"
    validate_cell_level(submission, competition / "sample_submission.csv")
    assert_same_predictions(submission, local_csv)

    # the segmentation kernels' requirements install offline from the same wheels dataset
    install = ["-m", "pip", "install", "--no-index", "--find-links", str(wheels_dir), "--quiet"]
    segment = subprocess.run(
        [*offline, str(python), *install, "--disable-pip-version-check", "weakcell[segment]"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert segment.returncode == 0, segment.stdout[-3000:] + segment.stderr[-3000:]
    imports = subprocess.run(
        [
            *offline,
            str(python),
            "-c",
            "import cellpose, segment_anything, fastremap, fill_voids, imagecodecs",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert imports.returncode == 0, imports.stderr[-3000:]
