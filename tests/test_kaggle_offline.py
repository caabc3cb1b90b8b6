"""Every generated kernel (inference, cellpose, cellpose-sam, hpacellseg, train), run as Kaggle runs it: in a replica of
Kaggle's Python image (``make kaggle-env``: Python 3.12 and the versions of requirements/kaggle-image.txt),
internet off, nothing but the image's packages and the attached inputs.

A tiny synthetic run is trained and predicted locally (its backbone starts from a random 3-channel
checkpoint, so the 4-channel stem adaptation runs too); ``make wheels``, ``make weights-dataset``,
``make backbone-dataset`` and ``make kernels`` then fill an ``input/`` laid out like a Kaggle session: the
competition folder (the synthetic set in the 2021 layout), the datasets, and random Cellpose-SAM (ViT-B) and
SAM (ViT-B) weight files and HPA-Cell-Segmentation U-Nets (``tests/hpacellseg_models.py``) made here. Each kernel runs in a fresh environment on the image replica (a venv
whose .pth names the image's site-packages: pip installs into the kernel's venv, never into the image),
under ``unshare -rn`` (a network namespace without interfaces) plus a socket guard. Every
``submission.csv`` must validate against the sample submission; the inference kernel's must equal the
local inference. The same run with a whole-image model added after training (its saved config has it off)
gets its own weights dataset and inference kernel from a config that submits with it: the kernel must find
the packed model and predict what local inference with the same settings predicts. The image replica is
required: without it these tests fail, naming ``make kaggle-env``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import timm
import torch

from tests.conftest import REPO, TINY, TINY_IMAGE_MODEL
from tests.hpacellseg_models import save_weights, thresholding_state
from weakcell import folds as folds_stage
from weakcell import image_model as image_model_stage
from weakcell import infer as infer_stage
from weakcell import thresholds as thresholds_stage
from weakcell import train as train_stage
from weakcell.cache import build as cache_stage
from weakcell.config import Config, load_config
from weakcell.kagglekit import datasets, kernels, naming
from weakcell.submission import validate_cell_level
from weakcell.synthetic import writer as data_stage

IMAGE_REQUIREMENTS = REPO / "requirements" / "kaggle-image.txt"
KAGGLE_PYTHON = Path(os.environ.get("WEAKCELL_KAGGLE_PYTHON") or REPO / ".venv-kaggle" / "bin" / "python")
# kernels run two at a time on a 2-core machine, each on one thread (WEAKCELL_KERNEL_JOBS=1: one by one)
KERNEL_JOBS = int(os.environ.get("WEAKCELL_KERNEL_JOBS", "2"))

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


def pins(path: Path) -> dict[str, str]:
    """``name -> version`` of every ``name==version`` line (names PEP 503-normalized)."""
    found = {}
    for line in path.read_text().splitlines():
        requirement = line.split("#")[0].strip()
        if "==" in requirement:
            name, version = requirement.split("==")
            found[datasets.normalize(name)] = version.strip()
    return found


def image_versions(python: Path) -> dict[str, str]:
    """The Python and every distribution of an environment, as it reports them."""
    code = (
        "import importlib.metadata as m, json, platform; "
        "d = {x.metadata['Name']: x.version for x in m.distributions()}; "
        "d['python'] = platform.python_version(); print(json.dumps(d))"
    )
    out = subprocess.run([python, "-c", code], check=True, capture_output=True, text=True).stdout
    return {datasets.normalize(k): v for k, v in json.loads(out).items()}


@pytest.fixture(scope="module")
def image_python() -> Path:
    """The image replica's python, checked against requirements/kaggle-image.txt; a failure (not a skip)
    when it is missing or stale, so CI cannot pass without running the kernels."""
    if not KAGGLE_PYTHON.is_file():
        pytest.fail(
            f"no Kaggle image replica at {KAGGLE_PYTHON}: `make kaggle-env` builds it (`make test` does it "
            "first; it needs Python 3.12, see tools/find-python), or set WEAKCELL_KAGGLE_PYTHON"
        )
    installed = image_versions(KAGGLE_PYTHON)
    wanted = pins(IMAGE_REQUIREMENTS)
    stale = {name: (version, installed.get(name)) for name, version in wanted.items()}
    stale = {name: pair for name, pair in stale.items() if pair[0] != pair[1]}
    assert not stale, f"{KAGGLE_PYTHON} differs from {IMAGE_REQUIREMENTS} (wanted, installed): {stale}"
    assert installed["python"].startswith("3.12."), installed["python"]
    assert "weakcell" not in installed and "iterative-stratification" not in installed
    print(
        "kaggle image replica: Python "
        + installed["python"]
        + ", "
        + ", ".join(f"{name} {installed[name]}" for name in sorted(wanted))
    )
    return KAGGLE_PYTHON


def kernel_venv(folder: Path, image_python: Path) -> Path:
    """A fresh environment for one kernel session on the image replica; returns its python. The image's
    site-packages come in through a .pth (pip never uninstalls what lies outside the environment it
    installs into, so the image stays as built)."""
    subprocess.run([image_python, "-m", "venv", "--without-pip", str(folder)], check=True)
    python = folder / "bin" / "python"
    paths = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    image_site = subprocess.run([image_python, "-c", paths], check=True, capture_output=True, text=True)
    own_site = subprocess.run([python, "-c", paths], check=True, capture_output=True, text=True)
    site = Path(own_site.stdout.strip())
    (site / "kaggle_image.pth").write_text(image_site.stdout.strip() + "\n")
    (site / "sitecustomize.py").write_text(SOCKET_GUARD)
    return python


def random_backbone_checkpoint(path: Path, name: str) -> Path:
    """An ImageNet-like 3-channel checkpoint of timm model ``name`` (random weights, its classifier kept)."""
    torch.manual_seed(0)
    torch.save(timm.create_model(name, pretrained=False, in_chans=3).state_dict(), path)
    return path


def random_segmentation_weights(folder: Path) -> dict[str, Path]:
    """A Cellpose-SAM (ViT-B encoder) and a SAM ViT-B file under their official names, random but for
    Cellpose's readout: its zero weights and a bias that paints flows toward the centre of every 8-px
    patch (cell probability logit 5), so Cellpose finds one cell per patch and SAM has cells to refine;
    and the two HPA-Cell-Segmentation U-Nets as thresholds of the input intensity."""
    from segment_anything import sam_model_registry

    from weakcell.segment.cellpose_backend import PATCH, _cpsam_skeleton

    torch.manual_seed(0)
    net = _cpsam_skeleton("vit_b").to_empty(device="cpu")
    for parameter in net.parameters():
        torch.nn.init.normal_(parameter, std=0.02)
    with torch.no_grad():
        # W2 scatters readout channel c * 64 + 8 * i + j to output c at pixel (i, j) of the patch
        net.W2.copy_(torch.eye(3 * PATCH**2).reshape(3 * PATCH**2, 3, PATCH, PATCH))
        net.out.weight.zero_()
        rows, cols = torch.meshgrid(torch.arange(PATCH) - 3.5, torch.arange(PATCH) - 3.5, indexing="ij")
        length = torch.sqrt(rows**2 + cols**2)  # flows are unit vectors x 5 in Cellpose's units
        net.out.bias.copy_(
            torch.stack([-5 * rows / length, -5 * cols / length, torch.full_like(rows, 5.0)]).flatten()
        )
        net.diam_labels.fill_(30.0)
        net.diam_mean.fill_(30.0)
    cellpose = folder / "cellpose" / "cpsam"
    cellpose.parent.mkdir(parents=True)
    torch.save(net.state_dict(), cellpose)
    sam = folder / "sam" / "sam_vit_b_01ec64.pth"
    sam.parent.mkdir(parents=True)
    torch.save(sam_model_registry["vit_b"](None).state_dict(), sam)
    hpacellseg = save_weights(folder / "hpacellseg", thresholding_state(), thresholding_state())
    return {"cellpose": cellpose.parent, "sam": sam.parent, "hpacellseg": hpacellseg}


@dataclass
class Session:
    """What one kernel run left: its working folder, the kernel's venv, exit code, log and seconds."""

    variant: str
    working: Path
    python: Path
    returncode: int
    log: str
    seconds: float


@dataclass
class Prepared:
    cfg: Config
    local_csv: Path
    input: Path
    wheels: Path
    sessions: dict[str, Session]
    offline: list[str]
    image_cfg: Config  # the run submitting with its whole-image model (the "image-model" session)


# A whole-image model the submission uses: in the cell confidence (product) and as image_level.csv's source.
IMAGE_MODEL = [
    *TINY_IMAGE_MODEL,
    "infer.image_model_rule=product",
    "infer.image_level=image_model",
]


def with_image_model(overrides: list[str]) -> tuple[Config, Path]:
    """The run of ``overrides`` (trained without it) with a whole-image model added: trained, thresholds
    tuned on it, predicted locally into ``submissions/image``, then its own weights dataset and inference
    kernel (in ``kernels-image/``). Returns that config and the kernel's script."""
    image_cfg = load_config(
        None,
        [
            *overrides,
            *IMAGE_MODEL,
            "kaggle.weights_dataset=weakcell-weights-{name}-image",
            "kaggle.variants=[inference]",
            "paths.kernels=kernels-image",
            "infer.output=image",
        ],
    )
    image_model_stage.run(image_cfg)
    thresholds_stage.run(image_cfg)
    infer_stage.run(image_cfg)
    datasets.weights_dataset(image_cfg)
    folder = kernels.run(image_cfg)[0]
    return image_cfg, folder / kernels.kernel_metadata(image_cfg, "inference")["code_file"]


def session_env(tmp: Path, working: Path, input_dir: Path) -> dict[str, str]:
    return {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp / "home"),
        "LANG": "C.UTF-8",
        "KAGGLE_INPUT": str(input_dir),
        "KAGGLE_WORKING": str(working),
        "PIP_CONFIG_FILE": os.devnull,  # no index, find-links or constraints of this machine
        "PYTHONNOUSERSITE": "1",
        "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // KERNEL_JOBS)),
    }


def run_kernel(
    variant: str, script: Path, tmp: Path, image_python: Path, input_dir: Path, offline: list[str]
):
    working = tmp / variant / "working"
    working.mkdir(parents=True)
    python = kernel_venv(tmp / variant / "venv", image_python)
    start = time.perf_counter()
    result = subprocess.run(
        [*offline, str(python), str(script)],
        cwd=working,
        env=session_env(tmp, working, input_dir),
        capture_output=True,
        text=True,
        timeout=1200,
    )
    return Session(
        variant,
        working,
        python,
        result.returncode,
        result.stdout + result.stderr,
        time.perf_counter() - start,
    )


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, image_python) -> Prepared:
    """The local run, the datasets, the kernels, and every kernel run once in its own offline session."""
    tmp = tmp_path_factory.mktemp("kaggle-offline")
    local = tmp / "local"
    backbone = random_backbone_checkpoint(tmp / "test_resnet.pth", "test_resnet")
    overrides = [
        f"paths.root={local}",
        *TINY,
        f"model.pretrained_file={backbone}",
        "name=kaggle-e2e",
        "refine.rounds=0",
        "kaggle.owner=tester",
        # the random segmentation weights are ViT-B sized (the official cpsam is ViT-L, 1.2 GB); the
        # synthetic cells are ~4x smaller in pixels than HPA's: upstream's sizes at 1/4, its U-Nets at 64²
        "kaggle.kernel_overrides=[segment.cellpose.backbone=vit_b,hpacellseg:segment.reference_size=1024,"
        "hpacellseg:segment.hpacellseg.network_scale=0.0625]",
    ]
    cfg = load_config(None, overrides)
    data_stage.run(cfg)
    folds_stage.run(cfg)
    cache_stage.run(cfg)
    train_stage.run(cfg)
    thresholds_stage.run(cfg)
    local_csv = infer_stage.run(cfg) / "cell_level.csv"

    wheels_dir = datasets.wheels(cfg)
    weights_dir = datasets.weights_dataset(cfg)
    backbone_dir = datasets.backbone_dataset(cfg)
    folders = {folder.name: folder for folder in kernels.run(cfg)}
    assert sorted(folders) == sorted(kernels.VARIANTS)
    image_cfg, image_script = with_image_model(overrides)

    # /kaggle/input as a session with the competition and every dataset attached
    input_dir = tmp / "input"
    competition = input_dir / naming.competition_slug(cfg)
    for split in ("train", "test"):
        shutil.copytree(cfg.data_dir / split, competition / split)
    for name in ("sample_submission.csv", "train.csv"):
        shutil.copy2(cfg.data_dir / name, competition / name)
    segmentation = random_segmentation_weights(tmp / "segmentation")
    attached = {
        naming.wheels_slug(cfg): wheels_dir,
        naming.weights_slug(cfg): weights_dir,
        naming.weights_slug(image_cfg): naming.datasets_root(cfg) / naming.weights_slug(image_cfg),
        naming.backbone_slug(cfg): backbone_dir,
        naming.slug_of(cfg.kaggle.cellpose_dataset): segmentation["cellpose"],
        naming.slug_of(cfg.kaggle.sam_dataset): segmentation["sam"],
        naming.slug_of(cfg.kaggle.hpacellseg_dataset): segmentation["hpacellseg"],
    }
    for slug, folder in attached.items():
        shutil.copytree(folder, input_dir / slug, copy_function=os.link)

    offline = unshare_prefix()
    scripts = {
        variant: folder / kernels.kernel_metadata(cfg, variant)["code_file"]
        for variant, folder in folders.items()
    }
    scripts["image-model"] = image_script  # the inference kernel of the run with its whole-image model
    # the slowest first: with two at a time the pair ends closer together
    order = ["cellpose-sam", "train", "hpacellseg", "cellpose", "image-model", "inference"]
    with ThreadPoolExecutor(max_workers=KERNEL_JOBS) as pool:
        futures = {
            variant: pool.submit(run_kernel, variant, scripts[variant], tmp, image_python, input_dir, offline)
            for variant in order
        }
        sessions = {variant: future.result() for variant, future in futures.items()}
    print(
        f"kernels offline ({'unshare -rn' if offline else 'socket guard only'}, {KERNEL_JOBS} at a time): "
        + ", ".join(f"{s.variant} {s.seconds:.0f} s" for s in sessions.values())
    )
    # the HPA-Cell-Segmentation U-Nets are 1 GB; the kernels have run (pytest keeps its last folders)
    shutil.rmtree(segmentation["hpacellseg"])
    shutil.rmtree(input_dir / naming.slug_of(cfg.kaggle.hpacellseg_dataset))
    return Prepared(cfg, local_csv, input_dir, wheels_dir, sessions, offline, image_cfg)


def parse(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def assert_same_predictions(kernel_csv: Path, local_csv: Path) -> None:
    """Same IDs, sizes, labels and masks; confidences equal within float noise of another torch build."""
    kernel, local = parse(kernel_csv), parse(local_csv)
    assert kernel[["ID", "ImageWidth", "ImageHeight"]].equals(local[["ID", "ImageWidth", "ImageHeight"]])
    for image_id, ours, theirs in zip(kernel["ID"], kernel["PredictionString"], local["PredictionString"]):
        a, b = ours.split(), theirs.split()
        assert len(a) == len(b), image_id
        assert a[0::3] == b[0::3] and a[2::3] == b[2::3], f"labels or masks differ for {image_id}"
        np.testing.assert_allclose(np.array(a[1::3], float), np.array(b[1::3], float), rtol=2e-3, atol=1e-6)


def installed(python: Path) -> set[str]:
    """Distributions installed into a kernel's own venv (not the image's)."""
    site = next((python.parent.parent / "lib").glob("python3*/site-packages"))
    return {datasets.normalize(p.name.split("-")[0]) for p in site.glob("*.dist-info")}


def finished(prepared: Prepared, variant: str) -> Session:
    session = prepared.sessions[variant]
    assert session.returncode == 0, f"kernel {variant} failed:\n{session.log[-8000:]}"
    submission = session.working / "submission.csv"
    validate_cell_level(
        submission, prepared.input / naming.competition_slug(prepared.cfg) / "sample_submission.csv"
    )
    return session


def test_the_image_replica_is_offline_and_lacks_what_the_wheels_bring(tmp_path, image_python):
    python = kernel_venv(tmp_path / "venv", image_python)
    env = session_env(tmp_path, tmp_path, tmp_path)
    offline = unshare_prefix()

    def runs(code: str) -> bool:
        return (
            subprocess.run([*offline, str(python), "-c", code], env=env, capture_output=True).returncode == 0
        )

    assert runs(
        "import sys, torch, timm; assert sys.version_info[:2] == (3, 12); assert timm.__version__ == '1.0.26'"
    )
    assert runs("import torch; assert torch.__version__.startswith('2.10.0')")
    for missing in ("weakcell", "iterstrat", "cellpose", "fastremap", "fill_voids", "imagecodecs", "roifile"):
        assert not runs(f"import {missing}"), f"{missing} must come from the wheels dataset"
    assert not runs("import socket; socket.create_connection(('pypi.org', 443), timeout=5)")
    assert not runs("import urllib.request; urllib.request.urlopen('https://pypi.org', timeout=5)")


def test_inference_kernel_equals_local_inference(prepared):
    session = finished(prepared, "inference")
    assert_same_predictions(session.working / "submission.csv", prepared.local_csv)
    assert {"weakcell", "iterative-stratification"} <= installed(session.python)
    assert "cellpose" not in installed(session.python)  # plain weakcell: no segmentation extras


def test_the_inference_kernel_predicts_with_the_packed_image_model(prepared):
    """Issue 24: before, the weights dataset held no image_model/ and the kernel could not find it offline."""
    cfg = prepared.image_cfg
    packed = prepared.input / naming.weights_slug(cfg) / cfg.name / "image_model"
    folds = [
        f"fold{k}/{name}" for k in range(cfg.folds.n_splits) for name in ("model.pt", "oof_image.parquet")
    ]
    assert sorted(p.relative_to(packed).as_posix() for p in packed.rglob("*") if p.is_file()) == sorted(
        ["lineage.json", "thresholds.json", *folds]
    )
    session = finished(prepared, "image-model")
    local = cfg.submission_dir
    assert_same_predictions(session.working / "submission.csv", local / "cell_level.csv")
    # it predicted with the packed model: the same image probabilities, and cells scored other than without it
    kernel_images = pd.read_parquet(session.working / "submissions" / cfg.name / "pred_image_model.parquet")
    local_images = pd.read_parquet(local / "pred_image_model.parquet")
    assert kernel_images["image_id"].tolist() == local_images["image_id"].tolist()
    np.testing.assert_allclose(kernel_images.iloc[:, 1:], local_images.iloc[:, 1:], rtol=2e-3, atol=1e-6)
    alone = parse(prepared.local_csv)["PredictionString"]
    assert parse(local / "cell_level.csv")["PredictionString"].tolist() != alone.tolist()


@pytest.mark.parametrize("variant", ["cellpose", "cellpose-sam"])
def test_segmentation_kernels_install_their_wheels_and_segment_with_the_attached_weights(prepared, variant):
    session = finished(prepared, variant)
    assert {"weakcell", "cellpose", "fastremap", "fill-voids", "imagecodecs", "roifile"} <= installed(
        session.python
    )
    backend = "cellpose+sam" if variant == "cellpose-sam" else "cellpose"
    cache = session.working / "cache" / "hpa2021" / backend
    assert (cache / "images.parquet").is_file(), sorted(
        p.name for p in (session.working / "cache").rglob("*")
    )
    assert len(pd.read_parquet(cache / "images.parquet")) == prepared.cfg.synthetic.n_test
    cells = pd.read_parquet(cache / "cells.parquet")
    assert cells["image_id"].nunique() == prepared.cfg.synthetic.n_test and len(cells) >= 30, len(cells)
    predicted = parse(session.working / "submission.csv")["PredictionString"].str.split().str.len()
    assert (predicted > 0).all()  # every image got cell predictions from the Cellpose cells
    # the compiled wheels installed were the ones for this interpreter
    site = next((session.python.parent.parent / "lib").glob("python3*/site-packages"))
    wheel_tags = {p.name: (p / "WHEEL").read_text() for p in site.glob("fastremap-*.dist-info")}
    assert any("cp312-cp312-manylinux" in text for text in wheel_tags.values()), wheel_tags


def test_hpacellseg_kernel_segments_with_the_attached_unets_without_the_segment_extra(prepared):
    session = finished(prepared, "hpacellseg")
    assert "weakcell" in installed(session.python) and "cellpose" not in installed(session.python)
    cache = session.working / "cache" / "hpa2021" / "hpacellseg"
    assert len(pd.read_parquet(cache / "images.parquet")) == prepared.cfg.synthetic.n_test
    cells = pd.read_parquet(cache / "cells.parquet")
    assert cells["image_id"].nunique() == prepared.cfg.synthetic.n_test, cells
    predicted = parse(session.working / "submission.csv")["PredictionString"].str.split().str.len()
    assert (predicted > 0).all()


def test_train_kernel_trains_from_the_attached_backbone_dataset(prepared):
    session = finished(prepared, "train")
    config = (session.working / "runs" / prepared.cfg.name / "config.yaml").read_text()
    backbone_input = prepared.input / naming.backbone_slug(prepared.cfg)
    match = re.search(r"pretrained_file: (.+)", config)
    assert match and match.group(1).strip() == str(backbone_input), config
    assert str(prepared.cfg.paths.root) not in config  # nothing of this machine's paths
    # the 3-channel checkpoint went into the 4-channel stem on Kaggle's timm (no adapt_input_conv base_chans)
    assert re.search(r"stem adapted: \S+ 3->4", session.log), session.log[-3000:]


def test_wheels_dataset_serves_every_target_python(prepared):
    versions, platforms = prepared.cfg.kaggle.python_version, prepared.cfg.kaggle.platforms
    assert versions == ["3.12", "3.13"]
    assert datasets.unmatched_wheels(prepared.wheels, versions, platforms) == []
    names = sorted(p.name for p in prepared.wheels.glob("*.whl"))
    compiled = [n for n in names if "-none-any" not in n]
    for package in ("fastremap", "fill_voids"):  # compiled per interpreter: one wheel each
        for tag in ("cp312", "cp313"):
            assert any(n.startswith(f"{package}-") and f"-{tag}-" in n for n in compiled), (
                package,
                tag,
                names,
            )
    print("wheels dataset:", ", ".join(names))


def test_kernels_ran_without_network_interfaces(prepared):
    if not prepared.offline:
        pytest.skip("unshare -rn is not allowed here: the kernels ran behind the socket guard only")
    assert prepared.offline == ["unshare", "-rn"]
