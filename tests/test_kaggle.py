"""The Kaggle commands without Kaggle: generated kernel metadata and scripts, the weights dataset's
contents, credential and network failures as short messages that never carry a key, dry runs, resumable
unzipping. The kernel itself runs offline in test_kaggle_offline.py."""

from __future__ import annotations

import json
import logging
import shutil
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from weakcell.cli import main
from weakcell.config import ConfigError, Inputs, all_keys, changed_settings, load_config, save_config
from weakcell.config.lineage import reads
from weakcell.errors import StageError
from weakcell.image_model import trained_folds
from weakcell.kagglekit import api, datasets, kernels, naming
from weakcell.lineage import Lineage, write_lineage
from weakcell.submission import publish
from weakcell.weights import WeightsError

SECRET = "f00dfeedc0ffee0123456789abcdef42"


def make_cfg(tmp_path: Path, *overrides: str):
    return load_config(None, [f"paths.root={tmp_path}", "kaggle.owner=tester", "name=run1", *overrides])


@pytest.fixture
def no_credentials(tmp_path, monkeypatch):
    """No token anywhere: an empty KAGGLE_CONFIG_DIR, no variables, a HOME without ~/.kaggle."""
    for name in ("KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_API_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    config_dir = tmp_path / "kaggle-config"
    config_dir.mkdir()
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(config_dir))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return config_dir


@pytest.fixture
def offline(monkeypatch):
    """Any internet connection or name lookup fails at once, as in a kernel with internet off."""

    def refuse(*args, **kwargs):
        raise OSError("network is unreachable (blocked by the test)")

    real_connect = socket.socket.connect

    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            refuse()
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_importing_weakcell_never_imports_kaggle():
    code = (
        "import sys, weakcell, weakcell.cli, weakcell.kagglekit.api, weakcell.kagglekit.datasets, "
        "weakcell.kagglekit.kernels; assert 'kaggle' not in sys.modules, 'kaggle was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_config_section_and_ids(tmp_path):
    assert {"kaggle.owner", "kaggle.wheels", "kaggle.dry_run"} <= set(all_keys())
    cfg = make_cfg(tmp_path, "name=My_Run.v2")
    assert naming.weights_slug(cfg) == "weakcell-weights-my-run-v2"
    assert naming.title_of(naming.kernel_slug(cfg, "cellpose-sam")) == "weakcell cellpose sam"
    assert naming.slugify(naming.title_of("weakcell-weights-my-run-v2")) == "weakcell-weights-my-run-v2"
    assert naming.dataset_id(cfg, "someone/cpsam") == "someone/cpsam"
    assert naming.competition_slug(cfg) == "hpa-single-cell-image-classification"  # synthetic -> 2021
    hpa2018 = make_cfg(tmp_path, "data.dataset=hpa2018")
    assert naming.competition_slug(hpa2018) == "human-protein-atlas-image-classification"
    with pytest.raises(ValueError, match=r"\{name\} and \{variant\}"):
        naming.weights_slug(make_cfg(tmp_path, "kaggle.weights_dataset=w-{nmae}"))


def test_owner_from_kaggle_json_never_reads_the_key(tmp_path, no_credentials):
    (no_credentials / "kaggle.json").write_text(json.dumps({"username": "alice", "key": SECRET}))
    cfg = load_config(None, [f"paths.root={tmp_path}"])
    assert naming.resolve_owner(cfg) == "alice"
    assert kernels.kernel_metadata(cfg, "inference")["id"] == "alice/weakcell-inference"


def test_kernel_metadata_is_offline_with_gpu_and_sources(tmp_path):
    cfg = make_cfg(tmp_path, "kaggle.extra_datasets=[bob/backbones]")
    meta = {variant: kernels.kernel_metadata(cfg, variant) for variant in kernels.VARIANTS}
    for variant, m in meta.items():
        assert m["enable_internet"] is False and m["enable_gpu"] is True, variant
        assert m["machine_shape"] == "NvidiaTeslaT4", variant  # enable_gpu alone has given P100s
        assert m["competition_sources"] == ["hpa-single-cell-image-classification"]
        assert m["kernel_type"] == "script" and m["language"] == "python"
        assert m["id"] == f"tester/weakcell-{variant}" and naming.slugify(m["title"]) == f"weakcell-{variant}"
        assert m["dataset_sources"][0] == "tester/weakcell-wheels" and "bob/backbones" in m["dataset_sources"]
    assert meta["inference"]["dataset_sources"] == [
        "tester/weakcell-wheels",
        "tester/weakcell-weights-run1",
        "bob/backbones",
    ]
    assert "tester/cellpose-sam" in meta["cellpose"]["dataset_sources"]
    assert {"tester/cellpose-sam", "tester/segment-anything"} <= set(meta["cellpose-sam"]["dataset_sources"])
    assert "tester/weakcell-weights-run1" not in meta["train"]["dataset_sources"]


def test_machine_shape_follows_the_gpu_switch(tmp_path):
    assert (
        kernels.kernel_metadata(make_cfg(tmp_path, "kaggle.machine_shape=NvidiaL4"), "train")["machine_shape"]
        == "NvidiaL4"
    )
    assert "machine_shape" not in kernels.kernel_metadata(make_cfg(tmp_path, "kaggle.gpu=false"), "inference")
    assert "machine_shape" not in kernels.kernel_metadata(
        make_cfg(tmp_path, "kaggle.machine_shape=null"), "train"
    )


def test_train_kernel_reads_backbone_weights_from_a_dataset(tmp_path):
    """A local model.pretrained_file never reaches the kernel: the backbone dataset is attached instead and
    the key points at it; without a file, nothing is attached."""
    local_file = tmp_path / "weights" / "resnet18.pth"
    cfg = make_cfg(tmp_path, f"model.pretrained_file={local_file}")
    meta = kernels.kernel_metadata(cfg, "train")
    assert "tester/weakcell-backbone-run1" in meta["dataset_sources"]
    assert "tester/weakcell-backbone-run1" not in kernels.kernel_metadata(cfg, "inference")["dataset_sources"]
    script = kernels.kernel_script(cfg, "train")
    assert str(local_file) not in script and str(tmp_path) not in script
    assert '"model.pretrained_file": "weakcell-backbone-run1"' in script
    assert "pretrained_file: null" in script
    assert 'INSTALL = "weakcell"' in script  # backbone weights need no segmentation extras
    other = make_cfg(tmp_path, f"model.pretrained_file={local_file}", "kaggle.backbone_dataset=bob/r18")
    assert "bob/r18" in kernels.kernel_metadata(other, "train")["dataset_sources"]
    plain = kernels.kernel_metadata(make_cfg(tmp_path), "train")
    assert not any("backbone" in d for d in plain["dataset_sources"])


def test_backbone_dataset_packs_the_weights_file(tmp_path):
    import torch

    with pytest.raises(ValueError, match=r"model\.pretrained_file is not set"):
        datasets.backbone_dataset(make_cfg(tmp_path))
    source = tmp_path / "weights" / "resnet18.pth"
    source.parent.mkdir()
    torch.save({"conv1.weight": torch.zeros(2, 3, 1, 1)}, source)
    folder = datasets.backbone_dataset(make_cfg(tmp_path, f"model.pretrained_file={source.parent}"))
    assert folder == tmp_path / "dist" / "kaggle" / "weakcell-backbone-run1"
    assert sorted(p.name for p in folder.iterdir()) == ["dataset-metadata.json", "resnet18.pth"]
    metadata = json.loads((folder / "dataset-metadata.json").read_text())
    assert metadata["id"] == "tester/weakcell-backbone-run1" and "1 tensors" in metadata["description"]
    source.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError):
        datasets.backbone_dataset(make_cfg(tmp_path, f"model.pretrained_file={source}"))


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (None, ["3.12", "3.13"]),
        ("kaggle.python_version=3.12", ["3.12"]),  # a YAML float
        ("kaggle.python_version=[3.12,3.13]", ["3.12", "3.13"]),
        ("kaggle.python_version='3.10'", ["3.10"]),
        ("kaggle.python_version=3", ["3"]),
    ],
)
def test_python_versions_accept_numbers(tmp_path, override, expected):
    cfg = make_cfg(tmp_path, *([override] if override else []))
    assert cfg.kaggle.python_version == expected


def test_python_version_that_a_number_cannot_say_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"quote the version, e.g. '3.10'"):
        make_cfg(tmp_path, "kaggle.python_version=3.10")
    with pytest.raises(ConfigError, match="not a Python version"):
        make_cfg(tmp_path, "kaggle.python_version=[py312]")


def test_platform_tags_expand_glibc_downward():
    tags = datasets.platform_tags(["manylinux_2_28_x86_64"])
    assert tags[0] == "manylinux_2_28_x86_64" and tags[-1] == "manylinux1_x86_64"
    assert {"manylinux_2_24_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"} <= set(tags)
    assert "manylinux_2_29_x86_64" not in tags and len(tags) == 24 + 3  # 2.28 .. 2.5, three legacy names
    assert datasets.platform_tags(["linux_x86_64"]) == ["linux_x86_64"]


def fake_wheels(folder: Path, names: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"")
    return folder


def test_every_compiled_wheel_must_match_every_target(tmp_path):
    """Tags by hand: a cp311 wheel (what this machine downloads by itself) serves no 3.12 kernel; an abi3
    wheel from cp311 serves both; a manylinux_2_34 wheel does not fit a 2.28 system."""
    linux = ["manylinux_2_28_x86_64"]
    good = fake_wheels(
        tmp_path / "good",
        [
            "weakcell-0.1.0-py3-none-any.whl",
            "fastremap-1.21.0-cp312-cp312-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl",
            "fastremap-1.21.0-cp313-cp313-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl",
            "imagecodecs-2026.3.6-cp311-abi3-manylinux_2_28_x86_64.whl",
            "fill_voids-2.1.2-cp312-cp312-manylinux2014_x86_64.whl",
            "Fill_Voids-2.1.2-cp313-cp313-manylinux_2_17_x86_64.whl",
        ],
    )
    assert datasets.unmatched_wheels(good, ["3.12", "3.13"], linux) == []
    bad = fake_wheels(
        tmp_path / "bad",
        [
            "fastremap-1.21.0-cp311-cp311-manylinux_2_28_x86_64.whl",
            "fastremap-1.21.0-cp312-cp312-manylinux_2_28_x86_64.whl",
            "fill_voids-2.1.2-cp313-cp313-manylinux_2_34_x86_64.whl",
            "roifile-2026.2.10-py3-none-any.whl",
        ],
    )
    assert datasets.unmatched_wheels(bad, ["3.12", "3.13"], linux) == [
        "fastremap: Python 3.13",
        "fill-voids: Python 3.12",
        "fill-voids: Python 3.13",
    ]
    assert datasets.unmatched_wheels(bad, ["3.11"], linux) == ["fill-voids: Python 3.11"]
    assert datasets.unmatched_wheels(bad, ["3.13"], ["manylinux_2_35_x86_64"]) == ["fastremap: Python 3.13"]


def test_kernel_scripts_install_offline_and_run_the_cli(tmp_path):
    cfg = make_cfg(tmp_path, "refine.rounds=0", "kaggle.kernel_overrides=[cache.workers=2]")
    folders = kernels.run(cfg)
    assert [f.name for f in folders] == cfg.kaggle.variants
    for folder in folders:
        meta = json.loads((folder / "kernel-metadata.json").read_text())
        assert sorted(p.name for p in folder.iterdir()) == sorted(["kernel-metadata.json", meta["code_file"]])
        source = (folder / meta["code_file"]).read_text()
        compile(source, meta["code_file"], "exec")
        assert "generated by `make kernels`" in source
        assert '"pip", "install", "--no-index", "--find-links"' in source
        assert str(tmp_path) not in source  # nothing of this machine leaks into a kernel
    inference = (folders[0] / "weakcell-inference.py").read_text()
    assert 'STAGES = ["cache", "infer"]' in inference
    assert '"cache.splits=[test]"' in inference and '"cache.workers=2"' in inference
    assert 'INSTALL = "weakcell"' in inference
    cellpose = (tmp_path / "kernels" / "cellpose" / "weakcell-cellpose.py").read_text()
    assert 'INSTALL = "weakcell[segment]"' in cellpose and '"segment.backend=cellpose"' in cellpose
    assert '{"segment.cellpose.weights": "cellpose-sam"}' in cellpose
    train = (tmp_path / "kernels" / "train" / "weakcell-train.py").read_text()
    assert 'STAGES = ["folds", "cache", "train", "thresholds", "infer"]' in train
    # a stale file of an earlier generation disappears: the folders are generated, never edited
    (folders[0] / "notes.txt").write_text("hand edit")
    kernels.run(cfg)
    assert not (folders[0] / "notes.txt").exists()


def test_unknown_variant_fails_before_writing(tmp_path):
    cfg = make_cfg(tmp_path, "kaggle.variants=[inference,cellpsoe]")
    with pytest.raises(KeyError, match=r"cellpsoe.*known: inference"):
        kernels.run(cfg)
    assert not (tmp_path / "kernels").exists()


def fake_run(cfg, rounds: int = 0) -> Path:
    """A run folder as train (and refine) leave it: weights, resumable checkpoints, logs, OOF tables."""
    run_dir = cfg.run_dir
    model_dirs = [run_dir] + [run_dir / f"round{r}" for r in range(1, rounds + 1)]
    for model_dir in model_dirs:
        for fold in range(2):
            for head in ("cell", "mil"):
                head_dir = model_dir / f"fold{fold}" / head
                head_dir.mkdir(parents=True)
                for name in ("model.pt", "last.pt", "epochs.csv", "curves.png"):
                    (head_dir / name).write_bytes(b"x")
            (model_dir / f"fold{fold}" / "oof_embeddings.npz").write_bytes(b"x")
        for name in ("thresholds.json", "oof_image.parquet", "oof_cell.parquet", "metrics.json"):
            (model_dir / name).write_text("{}")
    (run_dir / "config.yaml").write_text("name: run1\n")
    (run_dir / "run.json").write_text("{}")
    return run_dir


@pytest.mark.parametrize("rounds", [0, 1])
def test_weights_dataset_holds_weights_only(tmp_path, rounds):
    cfg = make_cfg(tmp_path, f"refine.rounds={rounds}")
    fake_run(cfg, rounds)
    folder = datasets.weights_dataset(cfg)
    assert folder == tmp_path / "dist" / "kaggle" / "weakcell-weights-run1"
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    prefix = "run1/" + (f"round{rounds}/" if rounds else "")
    expected = ["dataset-metadata.json", "run1/config.yaml", "run1/run.json", f"{prefix}thresholds.json"]
    expected.append("run1/packed.json")  # what it holds, for the kernel to compare before any work
    expected += [f"{prefix}fold{k}/{head}/model.pt" for k in range(2) for head in ("cell", "mil")]
    assert files == sorted(expected)
    metadata = json.loads((folder / "dataset-metadata.json").read_text())
    assert metadata["id"] == "tester/weakcell-weights-run1" and metadata["title"] == "weakcell weights run1"
    # on Kaggle paths.runs=<mounted dataset> and the same name reproduce cfg.model_dir
    mounted = cfg.model_copy(update={"paths": cfg.paths.model_copy(update={"runs": str(folder)})})
    assert (mounted.model_dir / "fold0" / "mil" / "model.pt").is_file()


def test_weights_dataset_config_builds_the_trained_networks_on_kaggle(tmp_path):
    """The backbone's initial weights file is local: the packed config drops it, and nothing else, so the
    kernel (which runs on the packed config) builds the same networks and passes infer's settings check."""
    trained = make_cfg(tmp_path, "refine.rounds=0", "model.pretrained_file=weights/resnet18.pth")
    fake_run(trained)
    save_config(trained, trained.run_dir)
    folder = datasets.weights_dataset(trained)
    packed = folder / "run1" / "config.yaml"
    kernel_cfg = load_config(packed, [f"paths.runs={folder}", "paths.root=/kaggle/working"])
    assert kernel_cfg.model.pretrained_file is None
    assert changed_settings(kernel_cfg.run_dir, kernel_cfg, Inputs(("model.", "mil.", "cache."))) == []
    assert changed_settings(trained.run_dir, kernel_cfg) == [
        "model.pretrained_file: 'weights/resnet18.pth' -> None",
        f"paths.root: {str(tmp_path)!r} -> '/kaggle/working'",
        f"paths.runs: 'runs' -> {str(folder)!r}",
    ]


def test_weights_dataset_without_thresholds_says_what_to_run(tmp_path):
    cfg = make_cfg(tmp_path, "refine.rounds=0")
    fake_run(cfg)
    (cfg.run_dir / "thresholds.json").unlink()
    with pytest.raises(FileNotFoundError, match="make thresholds"):
        datasets.weights_dataset(cfg)
    assert main(["weights-dataset", f"paths.root={tmp_path}", "name=nothing"]) == 2


# -- the whole-image model in the weights dataset (issue 24) -------------------------------------------------

IMAGE_MODEL = ["image_model.enabled=true", "infer.image_model_rule=product"]


def fake_image_model(cfg) -> Path:
    """``runs/<name>/image_model/`` as ``make image-model`` and ``make thresholds`` leave it: two finished
    folds (weights, resumable checkpoint, logs, OOF table), the OOF summary, metrics, thresholds and the
    lineage record of the network ``cfg`` builds."""
    out_dir = cfg.image_model_dir
    for fold in range(2):
        fold_dir = out_dir / f"fold{fold}"
        fold_dir.mkdir(parents=True)
        for name in ("model.pt", "last.pt", "epochs.csv", "oof_image.parquet", "images.json", "fold.json"):
            (fold_dir / name).write_bytes(b"x")
    for name in ("oof_image.parquet", "metrics.json", "thresholds.json"):
        (out_dir / name).write_text("{}")
    (cfg.model_dir / "thresholds-mean.json").write_text("{}")  # infer.image_level=mean's
    write_lineage(out_dir, Lineage("image_model", reads("image_model", cfg)))
    return out_dir


def dataset_files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


@pytest.mark.parametrize(
    "level, thresholds",
    [
        ("mil", "thresholds.json"),
        ("image_model", "image_model/thresholds.json"),
        ("mean", "thresholds-mean.json"),
    ],
)
def test_weights_dataset_packs_the_image_model_the_submission_uses(tmp_path, level, thresholds):
    """Before, the dataset never held image_model/ (nor an image level's own thresholds file), so a kernel of
    a config with the image model could not find it offline. The run was trained before the image model was
    enabled: its saved config says enabled=false, the packed one what the submission uses."""
    cfg = make_cfg(tmp_path, "refine.rounds=0", *IMAGE_MODEL, f"infer.image_level={level}")
    fake_run(cfg)
    save_config(
        make_cfg(tmp_path, "refine.rounds=0", "image_model.pretrained_file=weights/r.pth"), cfg.run_dir
    )
    fake_image_model(cfg)
    folder = datasets.weights_dataset(cfg)
    expected = ["dataset-metadata.json", "run1/config.yaml", "run1/run.json", "run1/packed.json"]
    expected += [f"run1/{thresholds}", "run1/image_model/lineage.json"]
    expected += [f"run1/fold{k}/{head}/model.pt" for k in range(2) for head in ("cell", "mil")]
    # weights and the table that marks a fold finished; never last.pt, logs or the training OOF summary
    expected += [
        f"run1/image_model/fold{k}/{name}" for k in range(2) for name in ("model.pt", "oof_image.parquet")
    ]
    assert dataset_files(folder) == sorted(expected)
    metadata = json.loads((folder / "dataset-metadata.json").read_text())
    assert "the whole-image model's 2 folds" in metadata["description"]
    # the kernel's config: the image model on, joined as the config says, no local file; it finds the folds
    kernel_cfg = load_config(
        folder / "run1" / "config.yaml", [f"paths.runs={folder}", "paths.root=/kaggle/working"]
    )
    assert kernel_cfg.image_model.enabled and kernel_cfg.image_model.pretrained_file is None
    assert (kernel_cfg.infer.image_model_rule, kernel_cfg.infer.image_level) == ("product", level)
    assert [p.name for p in trained_folds(kernel_cfg)] == ["fold0", "fold1"]
    packed = json.loads((folder / "run1" / "packed.json").read_text())
    assert packed["image_model"] == (
        "mobilenetv3_small_100 at 256 px, infer.image_model_rule=product, infer.image_model_power=1.0, "
        f"infer.image_level={level}"
    )


def test_an_image_model_the_submission_does_not_use_stays_behind(tmp_path):
    """Enabled under rule none and level mil the model changes nothing: nothing of it is packed, and the
    packed config turns it off (before, it stayed on and the kernel looked for folds that were not there)."""
    cfg = make_cfg(tmp_path, "refine.rounds=0", "image_model.enabled=true")
    fake_run(cfg)
    save_config(
        make_cfg(
            tmp_path, "refine.rounds=0", "image_model.enabled=true", "image_model.pretrained_file=w.pth"
        ),
        cfg.run_dir,
    )
    fake_image_model(cfg)
    folder = datasets.weights_dataset(cfg)
    assert not [name for name in dataset_files(folder) if "image_model" in name]
    kernel_cfg = load_config(folder / "run1" / "config.yaml", [f"paths.runs={folder}"])
    assert kernel_cfg.image_model.enabled is False and kernel_cfg.image_model.pretrained_file is None
    assert json.loads((folder / "run1" / "packed.json").read_text())["image_model"] == "none"


def test_weights_dataset_without_the_image_model_says_to_train_it(tmp_path, capsys):
    fake_run(make_cfg(tmp_path, "refine.rounds=0"))
    args = [f"paths.root={tmp_path}", "kaggle.owner=tester", "name=run1", "refine.rounds=0", *IMAGE_MODEL]
    assert main(["weights-dataset", *args]) == 2
    err = capsys.readouterr().err
    assert "no trained whole-image model" in err and "make image-model" in err and err.count("\n") == 1
    assert not (tmp_path / "dist" / "kaggle" / "weakcell-weights-run1").exists()


def test_a_kernel_that_expects_the_image_model_refuses_a_dataset_without_it(tmp_path, no_credentials, capsys):
    args = [
        f"paths.root={tmp_path}",
        "kaggle.owner=tester",
        "name=run1",
        "kaggle.dry_run=true",
        "refine.rounds=0",
    ]
    fake_run(make_cfg(tmp_path, "refine.rounds=0"))
    fake_image_model(make_cfg(tmp_path, "refine.rounds=0", *IMAGE_MODEL))
    model = (
        "mobilenetv3_small_100 at 256 px, infer.image_model_rule=product, infer.image_model_power=1.0, "
        "infer.image_level=mil"
    )
    dataset, kernel = tmp_path / "dist/kaggle/weakcell-weights-run1", tmp_path / "kernels/inference"
    assert main(["weights-dataset", *args]) == 0  # from a config without the image model
    capsys.readouterr()
    assert main(["kernels", *args, *IMAGE_MODEL]) == 2
    err = capsys.readouterr().err
    assert (
        f"image_model: {tmp_path / 'runs/run1'} says {model}, {dataset} none" in err and err.count("\n") == 1
    )
    # the kernel made with it, then the dataset rebuilt without it: submit and the script itself refuse
    assert main(["weights-dataset", *args, *IMAGE_MODEL]) == 0
    assert main(["kernels", *args, *IMAGE_MODEL]) == 0
    assert main(["weights-dataset", *args]) == 0
    capsys.readouterr()
    assert main(["submit", *args]) == 2
    err = capsys.readouterr().err
    assert f"image_model: {dataset} says none, {kernel} {model}" in err and err.count("\n") == 1
    namespace: dict = {"__name__": "kernel"}
    exec(compile((kernel / "weakcell-inference.py").read_text(), "kernel", "exec"), namespace)  # generated
    with pytest.raises(
        SystemExit, match=r"image_model: the kernel expects 'mobilenetv3_small_100 at 256 px, "
    ):
        namespace["check_packed"](dataset)


def test_the_train_kernel_trains_the_image_model_the_submission_uses(tmp_path):
    plain = make_cfg(tmp_path, "refine.rounds=0")
    assert kernels.stages(plain, "train") == ["folds", "cache", "train", "thresholds", "infer"]
    used = make_cfg(tmp_path, "refine.rounds=0", "image_model.enabled=true", "infer.image_level=mean")
    assert kernels.stages(used, "train") == ["folds", "cache", "train", "image-model", "thresholds", "infer"]


def test_download_without_credentials_is_one_short_message(tmp_path, no_credentials, capsys):
    loaded = "kaggle" in sys.modules
    assert main(["download", f"paths.root={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 3
    assert str(no_credentials / "kaggle.json") in err and "KAGGLE_USERNAME" in err
    assert "https://www.kaggle.com/competitions/hpa-single-cell-image-classification/data" in err
    assert str(tmp_path / "data" / "hpa2021") in err  # where to place the data by hand
    assert loaded or "kaggle" not in sys.modules  # nothing was imported to find that out


def test_credentials_never_appear_in_any_output(
    tmp_path, monkeypatch, no_credentials, offline, capsys, caplog
):
    pytest.importorskip("kaggle")
    (no_credentials / "kaggle.json").write_text(json.dumps({"username": "tester", "key": SECRET[::-1]}))
    (no_credentials / "kaggle.json").chmod(0o600)
    # the variables win over the file; both values must stay hidden
    monkeypatch.setenv("KAGGLE_USERNAME", "tester")
    monkeypatch.setenv("KAGGLE_KEY", SECRET)
    caplog.set_level(logging.DEBUG)
    image_level = tmp_path / "submissions" / "run1" / "image_level.csv"
    image_level.parent.mkdir(parents=True)
    image_level.write_text("Id,Predicted\na,0 3\nb,\n")
    codes = [
        main(["download", f"paths.root={tmp_path}"]),
        main(["submit", f"paths.root={tmp_path}", "name=run1", "kaggle.competition=hpa2018"]),
    ]
    out = capsys.readouterr()
    text = out.out + out.err + caplog.text
    assert codes == [2, 2]
    assert "could not reach kaggle.com" in out.err and "Traceback" not in out.err
    assert SECRET not in text and SECRET[::-1] not in text
    assert api.scrub(f"token {SECRET} and {SECRET[::-1]}") == "token *** and ***"


def test_submit_dry_run_pushes_nothing_and_prints_the_steps(tmp_path, no_credentials, capsys):
    cfg_args = [f"paths.root={tmp_path}", "kaggle.owner=tester", "name=run1"]
    assert main(["submit", *cfg_args, "kaggle.dry_run=true"]) == 2  # no kernels yet
    assert "make kernels" in capsys.readouterr().err
    assert main(["kernels", *cfg_args]) == 0
    capsys.readouterr()
    assert main(["submit", *cfg_args, "kaggle.dry_run=true"]) == 2  # no weights dataset of the run yet
    assert "make weights-dataset" in capsys.readouterr().err
    fake_run(make_cfg(tmp_path), rounds=1)
    assert main(["weights-dataset", *cfg_args]) == 0
    capsys.readouterr()
    assert main(["submit", *cfg_args, "kaggle.dry_run=true"]) == 0
    out = capsys.readouterr().out
    assert f"kaggle kernels push -p {tmp_path / 'kernels' / 'inference'}" in out
    assert "https://www.kaggle.com/code/tester/weakcell-inference" in out
    assert "https://www.kaggle.com/competitions/hpa-single-cell-image-classification/submit" in out
    assert "tester/weakcell-wheels, tester/weakcell-weights-run1" in out


def test_submit_kernel_dry_run_names_kernel_and_version(tmp_path, no_credentials, capsys):
    cfg_args = [f"paths.root={tmp_path}", "kaggle.owner=tester", "name=run1", "kaggle.dry_run=true"]
    assert main(["submit-kernel", *cfg_args, "kaggle.kernel_version=3"]) == 2  # no kernels yet
    assert "make kernels" in capsys.readouterr().err
    assert main(["kernels", *cfg_args]) == 0
    capsys.readouterr()
    assert main(["submit-kernel", *cfg_args]) == 2
    assert "make submit-kernel VERSION=<n>" in capsys.readouterr().err
    assert main(["submit-kernel", *cfg_args, "kaggle.kernel_version=3"]) == 0
    out = capsys.readouterr().out
    assert (
        "would run `kaggle competitions submit hpa-single-cell-image-classification "
        "-k tester/weakcell-inference -f submission.csv -v 3 -m 'weakcell run1'`"
    ) in out
    assert main(["submit-kernel", *cfg_args, "kaggle.kernel_version=3", "kaggle.competition=hpa2018"]) == 2
    assert "make submit" in capsys.readouterr().err


def test_make_submit_kernel_dry_run(tmp_path, no_credentials):
    """`make submit-kernel VERSION=n` end to end, as a user types it (dry run: no network)."""
    args = f"paths.root={tmp_path} kaggle.owner=tester name=run1"
    assert main(["kernels", *args.split()]) == 0
    result = subprocess.run(
        ["make", "--no-print-directory", "submit-kernel", "VERSION=7", f"ARGS={args} kaggle.dry_run=true"],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "-k tester/weakcell-inference -f submission.csv -v 7 " in result.stdout


def test_submit_without_owner_refuses_before_any_network(tmp_path, no_credentials, capsys):
    assert main(["kernels", f"paths.root={tmp_path}", "kaggle.variants=[inference]"]) == 0
    assert naming.PLACEHOLDER_OWNER in capsys.readouterr().out
    assert main(["submit", f"paths.root={tmp_path}"]) == 2
    assert "kaggle.owner=<you>" in capsys.readouterr().err


def test_file_submission_dry_run_validates_first(tmp_path, capsys):
    args = [f"paths.root={tmp_path}", "name=run1", "kaggle.competition=hpa2018", "kaggle.dry_run=true"]
    assert main(["submit", *args]) == 2
    assert "make infer" in capsys.readouterr().err
    path = tmp_path / "submissions" / "run1" / "image_level.csv"
    path.parent.mkdir(parents=True)
    staged = tmp_path / "staged.csv"
    staged.write_text("Id,Predicted\na,0 27\nb,\n")
    publish(path.parent, {"image_level.csv": staged})  # as `make infer` publishes it
    assert main(["submit", *args]) == 2  # without the sample submission, the rows cannot be checked
    assert "make download" in capsys.readouterr().err
    sample = tmp_path / "data" / "hpa2018" / "sample_submission.csv"
    sample.parent.mkdir(parents=True)
    sample.write_text("Id,Predicted\na,0\nb,0\n")
    assert main(["submit", *args]) == 0
    out = capsys.readouterr().out
    assert f"kaggle competitions submit -c human-protein-atlas-image-classification -f {path}" in out
    staged.write_text("Id,Predicted\na,0 28\nb,\n")  # class 28 does not exist in 2018
    publish(path.parent, {"image_level.csv": staged})
    assert main(["submit", *args]) == 2
    path.write_text("Id,Predicted\na,0\nb,\n")  # valid, but not what `make infer` published
    assert main(["submit", *args]) == 2
    assert "is not the file" in capsys.readouterr().err


def test_download_dry_run_and_finished_folders(tmp_path, no_credentials, capsys):
    args = [f"paths.root={tmp_path}", "kaggle.download=[hpa2021,hpa2018]", "kaggle.dry_run=true"]
    target = tmp_path / "data" / "hpa2018"
    target.mkdir(parents=True)
    (target / api.COMPLETE_MARKER).write_text(
        json.dumps({"competition": "human-protein-atlas-image-classification"})
    )
    assert main(["download", *args]) == 0
    out = capsys.readouterr().out
    assert (
        f"kaggle competitions download -c hpa-single-cell-image-classification -p {tmp_path / 'data' / 'hpa2021'}"
        in out
    )
    assert "human-protein-atlas-image-classification is already in" in out


def test_unzip_resumes_and_refuses_paths_outside(tmp_path):
    archive = tmp_path / "c.zip"
    with zipfile.ZipFile(archive, "w") as bundle:
        bundle.writestr("train/a_red.png", b"a" * 100)
        bundle.writestr("train.csv", b"ID,Label\n")
    folder = tmp_path / "data"
    (folder / "train").mkdir(parents=True)
    (folder / "train" / "a_red.png").write_bytes(b"a" * 40)  # cut short by an interrupted run
    assert api.unzip(archive, folder) == 2
    assert (folder / "train" / "a_red.png").read_bytes() == b"a" * 100
    assert not list(folder.rglob("*.part"))
    with zipfile.ZipFile(archive, "a") as bundle:
        bundle.writestr("../evil.txt", b"x")
    with pytest.raises(ValueError, match="outside"):
        api.unzip(archive, folder)


def test_a_run_trained_with_external_sources_predicts_without_them(tmp_path):
    sources = "data.sources=[{dir: data/hpa2021-external}]"
    cfg = make_cfg(tmp_path, sources, "kaggle.variants=[inference]")
    inference = (kernels.run(cfg)[0] / "weakcell-inference.py").read_text()
    assert '"data.sources=[]"' in inference  # the test split is the competition's: nothing else is cached
    shutil.rmtree(tmp_path / "kernels")
    with pytest.raises(StageError, match=r"data.sources \(data/hpa2021-external\) is not attached"):
        kernels.run(make_cfg(tmp_path, sources, "kaggle.variants=[inference,train]"))
    assert not (tmp_path / "kernels").exists()  # refused before the inference kernel was written


def test_a_stale_kernel_is_refused_before_it_reaches_kaggle(tmp_path, no_credentials, capsys):
    """Issue 26, stumble 1: a run trained without refinement, its weights dataset built from that config,
    kernels generated from a config that still says refine.rounds=1. Before, `make submit` (dry run) said
    nothing and the kernel died on Kaggle after caching the whole test set; now each side is compared."""
    cfg_args = [f"paths.root={tmp_path}", "kaggle.owner=tester", "name=run1", "kaggle.dry_run=true"]
    fake_run(make_cfg(tmp_path, "refine.rounds=0"), rounds=0)
    assert main(["weights-dataset", *cfg_args, "refine.rounds=0"]) == 0
    capsys.readouterr()
    packed = json.loads((tmp_path / "dist/kaggle/weakcell-weights-run1/run1/packed.json").read_text())
    assert (packed["round"], packed["folds"], packed["backbone"]) == (0, [0, 1], "resnet18")
    # kernels from the default config (refine.rounds=1): the run has no round 1
    assert main(["kernels", *cfg_args]) == 2
    err = capsys.readouterr().err
    assert "round1 holds no trained folds" in err and "refine.rounds=1" in err
    # a kernel made for round 1 anyway (an older one, or another config): submit names both sides
    assert main(["kernels", *cfg_args, "refine.rounds=0"]) == 0
    script = tmp_path / "kernels/inference/weakcell-inference.py"
    script.write_text(script.read_text().replace("'round': 0", "'round': 1"))
    capsys.readouterr()
    assert main(["submit", *cfg_args, "refine.rounds=0"]) == 2
    err = capsys.readouterr().err
    assert (
        f"round: {tmp_path / 'dist/kaggle/weakcell-weights-run1'} says 0, {tmp_path / 'kernels/inference'} 1"
        in err
    )
    assert err.count("\n") == 1
    # another backbone in the config than the run was trained with: weights-dataset refuses, naming both
    assert main(["weights-dataset", *cfg_args, "refine.rounds=0", "model.backbone=resnet34"]) == 2
    err = capsys.readouterr().err
    assert f"backbone: the config says resnet34, {tmp_path / 'runs/run1'} resnet18" in err


def test_the_inference_kernel_compares_the_weights_dataset_before_any_work(tmp_path):
    """The generated script stops with one line naming both sides when packed.json differs from EXPECT."""
    cfg = make_cfg(tmp_path, "refine.rounds=0")
    fake_run(cfg, rounds=0)
    datasets.weights_dataset(cfg)
    kernels.run(cfg.model_copy(update={"kaggle": cfg.kaggle.model_copy(update={"variants": ["inference"]})}))
    source = (tmp_path / "kernels/inference/weakcell-inference.py").read_text()
    namespace: dict = {"__name__": "kernel"}
    exec(compile(source, "kernel", "exec"), namespace)  # the generated file, not user input
    runs = tmp_path / "dist/kaggle/weakcell-weights-run1"
    namespace["check_packed"](runs)  # the dataset it was made with: fine
    packed = runs / "run1/packed.json"
    packed.write_text(packed.read_text().replace('"round": 0', '"round": 1'))
    with pytest.raises(
        SystemExit, match=r"round: the kernel expects 0, the weights dataset weakcell-weights-run1 holds 1"
    ):
        namespace["check_packed"](runs)


def test_the_token_path_the_error_names_is_the_one_the_readme_gives(tmp_path, monkeypatch):
    """Issue 26: on Linux without ~/.kaggle the error named ~/.config/kaggle/kaggle.json while the README
    says ~/.kaggle/kaggle.json (the client reads the latter whenever the folder exists)."""
    for name in ("KAGGLE_CONFIG_DIR", "KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_API_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    message = api.no_credentials_message("by hand")
    assert f"kaggle.json as {naming.TOKEN_HOME} (chmod 600)" in message
    assert f"save as `{naming.TOKEN_HOME}`" in readme and f"`{naming.TOKEN_HOME}`" in readme
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "cfg"))
    assert f"kaggle.json as {tmp_path / 'cfg' / 'kaggle.json'}" in api.no_credentials_message("by hand")
